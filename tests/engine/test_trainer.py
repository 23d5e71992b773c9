"""Training engine: tiny runs lower the loss, resume is exact, DDP (2 gloo ranks), config,
atomic checkpoints."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from spatialattn.engine.checkpoint import atomic_save, load_checkpoint
from spatialattn.engine.config import DEFAULTS, load_config, parse_overrides
from spatialattn.engine.trainer import train

TINY = {"epochs": 2, "batch_size": 4, "train_images": 8, "val_images": 4, "image_size": 64,
        "attention_images": 1, "progress": False, "warmup_iters": 2, "lr": 0.003}


def _cfg(tmp_path, name, **kw):
    return load_config(None, dict(TINY, out=str(tmp_path), name=name, **kw))


def test_config_overrides_and_file(tmp_path):
    assert parse_overrides(["lr=1e-3", "amp=off", "name=null", "epochs=3", "progress=false"]) == \
        {"lr": 1e-3, "amp": "off", "name": None, "epochs": 3, "progress": False}
    with pytest.raises(KeyError, match="unknown config key 'lrr'"):
        parse_overrides(["lrr=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        parse_overrides(["epochs=2.5"])
    with pytest.raises(ValueError, match="expected key=value"):
        parse_overrides(["epochs"])
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\nlr: 0.01\nattention: cbam\n")
    cfg = load_config(str(p), {"lr": 0.02})
    assert (cfg["epochs"], cfg["lr"], cfg["attention"], cfg["batch_size"]) == (7, 0.02, "cbam", DEFAULTS["batch_size"])
    p.write_text("epochs: [1]\n")
    with pytest.raises(ValueError, match="c.yaml: config epochs: expected an integer"):
        load_config(str(p))
    p.write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(str(p))


def test_config_base_without_newer_keys(tmp_path):
    """A checkpoint's config written before a key existed takes that key's default."""
    old = {k: v for k, v in DEFAULTS.items() if k != "cache_gb"}
    cfg = load_config(None, {"epochs": 3}, base=dict(old, epochs=5, lr=0.1))
    assert (cfg["epochs"], cfg["lr"], cfg["cache_gb"]) == (3, 0.1, DEFAULTS["cache_gb"])
    with pytest.raises(ValueError, match="config cache_gb: expected >= 0, got -1.0"):
        load_config(None, {"cache_gb": -1})


def test_cli_flags_reach_config(tmp_path):
    from spatialattn.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\n")
    rc = main(["train", "--config", str(p), "--epochs", "3", "--set", "lr=0.5", "--attention", "cbam",
               "--print-config"])
    assert rc == 0


def test_cli_print_config_output(tmp_path, capsys):
    from spatialattn.cli import main

    assert main(["train", "--batch-size", "8", "--set", "optimizer=sgd", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["batch_size"] == 8 and cfg["optimizer"] == "sgd" and cfg["epochs"] == DEFAULTS["epochs"]
    assert main(["train", "--set", "nope=1"]) == 2


def test_atomic_checkpoint_keeps_previous_file_on_failure(tmp_path):
    path = str(tmp_path / "last.pt")
    atomic_save({"model": {"w": torch.ones(3)}, "spec": {}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"model": {"w": torch.zeros(3)}, "spec": {}, "bad": Boom()}, path)
    ck = load_checkpoint(path)
    assert torch.equal(ck["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_load_checkpoint_rejects_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    torch.save({"model": {}, "spec": {}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="not a loadable"):
        load_checkpoint(str(path))


def test_training_lowers_loss_writes_run_and_resumes_exactly(tmp_path):
    # uninterrupted run: 2 epochs x 2 steps
    full_losses = []
    res = train(_cfg(tmp_path, "full"), step_callback=lambda s, d: full_losses.append(d["loss"]))
    run = tmp_path / "full"
    for f in ("config.yaml", "last.pt", "best.pt", "metrics.json"):
        assert (run / f).is_file(), f
    assert any(n.endswith("_attention.png") for n in os.listdir(run / "attention"))
    assert yaml.safe_load((run / "config.yaml").read_text())["train_images"] == 8
    assert full_losses[-1] < full_losses[0]
    ck = load_checkpoint(str(run / "last.pt"))
    assert ck["epoch"] == 2 and set(ck) >= {"optimizer", "scheduler", "scaler", "rng", "spec", "config"}
    # interrupted after epoch 1, then resumed
    part_losses = []
    train(_cfg(tmp_path, "part"), stop_epoch=1, step_callback=lambda s, d: part_losses.append(d["loss"]))
    assert load_checkpoint(str(tmp_path / "part" / "last.pt"))["epoch"] == 1
    res_losses = []
    res2 = train(load_checkpoint(str(tmp_path / "part" / "last.pt"))["config"],
                 resume=str(tmp_path / "part" / "last.pt"), step_callback=lambda s, d: res_losses.append(d["loss"]))
    assert part_losses + res_losses == full_losses  # bitwise equal, step for step
    for k, v in res["model"].state_dict().items():
        assert torch.equal(v, res2["model"].state_dict()[k]), k
    assert res2["metrics"]["AP"] == res["metrics"]["AP"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_match_and_evaluate_like_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), worker, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == 2
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["metrics"] == r1["metrics"]
    # one process evaluating the saved model gives the same numbers
    from spatialattn.engine.evaluator import evaluate, make_eval_loader, open_dataset
    from spatialattn.engine.models import build_model

    ck = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    model = build_model(ck["spec"])
    model.load_state_dict(ck["model"])
    for k, v in r0["state"].items():
        assert torch.equal(v, ck["model"][k])
    ds = open_dataset(ck["config"], "val_split", "val_images", train=False)
    m = evaluate(model, make_eval_loader(ds, 3), ds, torch.device("cpu"))
    assert {k: float(m[k]) for k in ("AP", "AP50", "AP75")} == r0["metrics"]
    assert "loss" in proc.stdout
