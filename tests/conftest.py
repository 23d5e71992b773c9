"""Test-wide settings: every test starts from the same random state (no order-dependent flakes),
and hypothesis draws the same examples on every run (a CI failure can be reproduced; set
``HYPOTHESIS_PROFILE=explore`` to draw new ones); checks that need an interpreter of their own
run in the background from the start of the session (``subprocess_check``)."""
from __future__ import annotations

import itertools
import os
import random
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


_test_number = itertools.count()


@pytest.fixture(autouse=True)
def _build_failures_recorded_apart(monkeypatch, tmp_path_factory):
    """Tests whose C++ build fails through ``_cpp.get()`` (a replaced ``_build``) record the
    failure in a folder of their own, one per test (made only where a record is written): in the
    extensions directory the record would keep later processes from building the kernels for an
    hour, and a test's record would stop the next test's build (``spatialattn.ops._cpp``)."""
    from spatialattn.ops import _cpp

    folder = tmp_path_factory.getbasetemp() / "build_failures" / str(next(_test_number))
    monkeypatch.setattr(_cpp, "_RECORD_DIR", str(folder))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


# --- Checks that run in their own interpreter, started in the background -------------------------
# Some checks need a fresh interpreter (Triton reads TRITON_INTERPRET when it is imported) and take
# minutes in Triton's interpreter, which is single-threaded Python. A test marked
# ``@pytest.mark.subprocess_check(cmd, env=..., timeout=...)`` has its command started as soon as the
# session knows it will run, at the lowest CPU priority, so it overlaps the rest of the suite on the
# cores the suite leaves idle; the test, moved to the end of the run, takes the finished process from
# the ``subprocess_check`` fixture and checks it.

_BACKGROUND = pytest.StashKey[dict]()


def _lower_priority(pid: int) -> None:
    # The suite's own OpenMP teams (2 threads on CI's 2 cores) wait at every parallel region for a
    # thread the scheduler gave to a background check: small-op tests (gradcheck, double backward)
    # took 6-15x their time alone beside two checks at the normal priority (the whole suite 420 s
    # against 325-347 s with the checks at the lowest priority, which then take the idle cores).
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except (AttributeError, OSError):  # not POSIX, or the process has already gone
        pass


class _BackgroundRun:
    def __init__(self, cmd: list[str], env: dict[str, str] | None, cwd: str | None, timeout: float):
        self.cmd, self.timeout, self.started = cmd, timeout, time.monotonic()
        self._out = tempfile.TemporaryFile(mode="w+")
        self._err = tempfile.TemporaryFile(mode="w+")
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=self._out, stderr=self._err, text=True)
        _lower_priority(self.proc.pid)

    def result(self):
        """Wait (up to the timeout counted from the start) and return a ``CompletedProcess``."""
        left = self.timeout - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(left, 0.0))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self._out.read(), self._err.read())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.kill()
        self._out.close()
        self._err.close()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "subprocess_check(cmd, env=None, cwd=None, timeout=600): run cmd in the background from the "
        "start of the session; the test gets the finished process from the subprocess_check fixture")
    config.stash[_BACKGROUND] = {}


def _start_background(config, item) -> _BackgroundRun:
    runs = config.stash[_BACKGROUND]
    if item.nodeid not in runs:
        marker = item.get_closest_marker("subprocess_check")
        cmd = marker.args[0] if marker.args else marker.kwargs["cmd"]
        runs[item.nodeid] = _BackgroundRun(list(cmd), marker.kwargs.get("env"), marker.kwargs.get("cwd"),
                                           marker.kwargs.get("timeout", 600))
    return runs[item.nodeid]


def pytest_collection_modifyitems(session, config, items):
    # The checks' tests wait for their processes: last, so the rest of the suite runs meanwhile.
    items.sort(key=lambda item: item.get_closest_marker("subprocess_check") is not None)


def pytest_collection_finish(session):
    # Called after deselection (-k, -m, --lf), so only checks that will run are started. Not under
    # --collect-only.
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.get_closest_marker("subprocess_check") is not None:
            _start_background(session.config, item)


def pytest_sessionfinish(session):
    for run in session.config.stash.get(_BACKGROUND, {}).values():
        run.close()


@pytest.fixture
def subprocess_check(request):
    """The finished ``subprocess.CompletedProcess`` (text stdout / stderr) of this test's marked command."""
    if request.node.get_closest_marker("subprocess_check") is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses subprocess_check without the subprocess_check marker")
    return _start_background(request.config, request.node).result()
