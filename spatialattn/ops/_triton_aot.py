"""The Triton kernels compiled for a GPU without one, and what the compiler made of them.

Triton's interpreter (the CPU test-suite's way of running the kernels) checks their numbers,
not that they compile for a GPU nor what the compiled code does. This module

1. runs a workload through the public API on CPU tensors with the dispatch pointed at the
   Triton path and every kernel launch replaced by a recorder (:func:`record_launches`):
   nothing is launched, each launch's specialisation is computed exactly as Triton's JIT
   computes it on a GPU (argument types; integers equal to 1 made constants; pointers and
   integers that are multiples of 16 marked so), for a given target;
2. compiles each distinct specialisation ahead of time with Triton's own compiler and the
   ``ptxas`` it ships, down to a cubin (:func:`compile_launch`), and reads off registers,
   local memory (spills), shared memory and the width of every global load and store in
   the PTX;
3. counts the kernel launches a call would make on a GPU (:func:`kernel_launches`): the
   Triton launches plus the torch operators that launch a kernel, inside the custom ops
   too. On small maps and at GPU bandwidth a launch (several microseconds of host time)
   can cost more than the data it moves.

No GPU or driver is needed. Used by ``tests/ops/test_triton_compile.py`` and
``benchmarks/triton_report.py``. Relies on Triton's JIT internals
(``create_function_from_signature``, ``JITFunction._pack_args``; present in Triton 3.x):
:func:`supported` says whether this Triton has them.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import _triton

def supported() -> Tuple[bool, str]:
    """``(ok, why not)``: Triton importable with the internals used here."""
    if not _triton.available():
        return False, "triton is not importable"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:  # pragma: no cover - other Triton versions
        return False, f"this Triton lacks an internal used for ahead-of-time compilation: {e}"
    if not hasattr(JITFunction, "_pack_args"):  # pragma: no cover
        return False, "this Triton's JITFunction has no _pack_args"
    return True, ""


def kernels() -> Dict[str, object]:
    """The ``@triton.jit`` kernels of :mod:`._triton` (launched ones and helpers), by name."""
    from triton.runtime.jit import JITFunction

    return {name: k for name, k in vars(_triton).items() if isinstance(k, JITFunction)}


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


@dataclass
class Launch:
    """One distinct specialisation of a kernel, as Triton's JIT would compile it."""

    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[tuple, object]
    attrs: Dict[tuple, list]
    options: Dict[str, object]
    grids: List[tuple] = field(default_factory=list)  # grids it was launched with

    def constants(self) -> Dict[str, object]:
        """Compile-time arguments by name (Triton's own specialisation of 1s included)."""
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items()}

    def aligned(self) -> List[str]:
        """Arguments Triton knows to be multiples of 16 (pointers: addresses; integers: values)."""
        names = list(self.signature)
        return [names[path[0]] for path, value in self.attrs.items() if value]

    def describe(self) -> str:
        skip = {"BC", "BP"}
        const = ", ".join(f"{k}={v}" for k, v in self.constants().items() if k not in skip)
        return f"{self.kernel}({self.signature.get('x_ptr', '?')}; {const})"


@contextlib.contextmanager
def triton_dispatch_on_cpu() -> Iterator[None]:
    """The public ops take the Triton path for CPU float32 / float16 / bfloat16 tensors (the
    custom ops under ``torch.compile``), as they do for CUDA tensors; with
    ``TRITON_INTERPRET=1`` the kernels then run on the CPU."""
    import spatialattn.ops as ops
    from . import _library as lib

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    saved = ops._fast_device, lib._cpp_ok, lib._triton_ok, ops._CPU_STANDS_FOR_GPU
    ops._fast_device = lambda x: ("op" if torch.compiler.is_compiling() else "triton") if x.dtype in dtypes else None
    lib._cpp_ok = lambda x: False
    lib._triton_ok = lambda x: x.dtype in dtypes
    ops._CPU_STANDS_FOR_GPU = True  # (host-side choices as for CUDA tensors: no value reads)
    try:
        yield
    finally:
        ops._fast_device, lib._cpp_ok, lib._triton_ok, ops._CPU_STANDS_FOR_GPU = saved


def record_launches(workload: Callable[[], None], arch: int = 90) -> List[Launch]:
    """The distinct kernel specialisations ``workload`` launches, for target ``sm_<arch>``.

    Every launch is recorded instead of run, so the kernels' outputs stay uninitialised
    (the workload must not depend on their values, only on shapes)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    found: Dict[str, Launch] = {}

    def recorder(name: str, kernel):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)

        def run(*args, grid, warmup, **kwargs):
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            key = repr((name, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                        sorted(options.__dict__.items())))
            launch = found.setdefault(key, Launch(name, signature, constexprs, attrs, dict(options.__dict__)))
            launch.grids.append(tuple(grid))
            return None

        return run

    jitted = kernels()
    for name, kernel in jitted.items():
        kernel.run = recorder(name, kernel)  # instance attribute: shadows JITFunction.run
    try:
        with triton_dispatch_on_cpu():
            workload()
    finally:
        for kernel in jitted.values():
            kernel.__dict__.pop("run", None)
    return list(found.values())


# torch operators that launch no kernel: views, allocations, metadata; `to` / `contiguous`
# launch one only when they return new storage (checked per call)
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "as_strided", "empty", "empty_like", "empty_strided",
              "detach", "alias", "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice",
              "lift_fresh", "split", "unbind", "new_empty", "new_empty_strided", "_reshape_alias", "resize_",
              "as_strided_", "split_with_sizes", "view_as", "expand_as", "detach_", "set_"}
_MAYBE_KERNEL = {"to", "contiguous", "type_as", "_to_copy"}


def kernel_launches(workload: Callable[[], None]) -> collections.Counter:
    """Kernel launches ``workload`` would make on a GPU through the Triton path, by name
    (Triton kernels by their function name, torch operators as ``aten.<name>``), counted on
    CPU tensors: Triton launches are recorded as in :func:`record_launches`; torch operators
    through a dispatch mode that also looks inside this library's custom ops."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "spatialattn":
                with self:  # the custom op's own body, whose operators this mode must see too
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in _MAYBE_KERNEL:
                first = args[0] if args else None
                same = isinstance(first, torch.Tensor) and isinstance(out, torch.Tensor) and \
                    out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                if not same:
                    counts["aten." + name] += 1
            elif name not in _NO_KERNEL:
                counts["aten." + name] += 1
            return out

    def run() -> None:
        with _Count():
            workload()

    for launch in record_launches(run):
        counts[launch.kernel] += len(launch.grids)
    return counts


Case = Tuple[Tuple[int, int, int, int], torch.dtype, int]  # (shape, dtype, programs per SM)
ALL_ORDERS = (("max", "mean"), ("mean", "max"), ("max",), ("mean",))


def api_workload(cases: Sequence[Case], orders: Sequence[Sequence[str]] = ALL_ORDERS) -> Callable[[], None]:
    """A workload calling every Triton-backed path of the public API: the fused SAM (pooling
    ``orders``, with and without a channel scale, forward and backward), the fused
    training-BatchNorm SAM (``SpatialAttention`` in training), ``CBAM`` in training and eval
    (global pooling with tie counts, the in-place pooling gradient), ``global_pool``,
    ``channel_pool`` and ``gate_multiply`` with their gradients; both layouts; half dtypes as half tensors and as
    under autocast (half maps, float32 parameters); the one-launch forward and backward, with a
    training BatchNorm for the first case only (32 more compiles for all of them: 3 minutes of
    the compile tests on 2 cores), and for that case too the default training-BatchNorm
    launches with the fold of their partial rows (``_FOLD_ROWS``) that large maps take. Each case is a shape, a dtype and the ``_PROGRAMS_PER_SM`` to
    run under (0: no loop split)."""
    from spatialattn import ops
    from spatialattn.nn import CBAM, SpatialAttention

    def run() -> None:
        saved = _triton._PROGRAMS_PER_SM
        try:
            for i, (shape, dtype, programs_per_sm) in enumerate(cases):
                _triton._PROGRAMS_PER_SM = programs_per_sm
                for cl in (False, True):
                    _api_calls(ops, CBAM, SpatialAttention, shape, dtype, cl, orders, band_batchnorm=i == 0)
        finally:
            _triton._PROGRAMS_PER_SM = saved

    return run


def _api_calls(ops, CBAM, SpatialAttention, shape, dtype, cl, orders, band_batchnorm: bool = True) -> None:
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)

    def leaf(*size, dt=dtype):
        t = torch.randn(*size, generator=g).to(dt)
        if cl and t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()

    def batchnorm_step() -> None:  # SpatialAttention in training: its BatchNorm with batch statistics
        x = leaf(*shape)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = SpatialAttention(c).train()(x)
        torch.autograd.grad(y, x, torch.ones_like(y))

    for order in orders:
        for scaled in (False, True):
            x = leaf(*shape)
            s = leaf(n, c, 1, 1) if scaled else None
            wt = leaf(1, len(order), 7, 7, dt=torch.float32)
            y = ops.spatial_attention_fused(x, wt, order=order, channel_scale=s)
            torch.autograd.grad(y, [t for t in (x, s, wt) if t is not None], torch.ones_like(y))
    # a bias, another kernel size and a dilation (the gate's compile-time variants)
    x, wt, b = leaf(*shape), leaf(1, 2, 3, 3, dt=torch.float32), leaf(1, dt=torch.float32)
    y = ops.spatial_attention_fused(x, wt, b, dilation=2)
    torch.autograd.grad(y, (x, wt, b), torch.ones_like(y))
    # the forward and backward in one launch each (off by default): without and with a scale
    # (and its gradient), bias, norm and a gradient of the returned attention
    with _triton.band_launches():
        x, s, wt = leaf(*shape), leaf(n, c, 1, 1), leaf(1, 2, 7, 7, dt=torch.float32)
        y = ops.spatial_attention_fused(x, wt)
        torch.autograd.grad(y, (x, wt), torch.ones_like(y))
        one = torch.ones(1, requires_grad=True)
        y, attn = ops.spatial_attention_fused(x, wt, one, order=("mean", "max"), channel_scale=s, norm_scale=one,
                                              norm_shift=one, return_attention=True)
        torch.autograd.grad((y, attn), (x, s, wt, one), (torch.ones_like(y), torch.ones_like(attn)))
        if band_batchnorm:  # a training-mode BatchNorm on the logits: two launches forward, two backward
            batchnorm_step()
    if band_batchnorm:  # the default training-BatchNorm launches with their partial rows folded first
        with _triton.fold_rows(0):
            batchnorm_step()
    x = leaf(*shape)
    p = ops.channel_pool(x, ("max", "mean"), dtype=torch.float32)
    torch.autograd.grad(p, x, torch.ones_like(p))
    x = leaf(*shape)  # the global pooling's gradient written (not added in place)
    p = ops.global_pool(x, ("mean", "max"), dtype=torch.float32)
    torch.autograd.grad(p, x, torch.ones_like(p))
    x, a, s = leaf(*shape), leaf(n, 1, h, w), leaf(n, c, 1, 1)
    y = ops.gate_multiply(x, a, s)
    torch.autograd.grad(y, (x, a, s), torch.ones_like(y))
    for module in (SpatialAttention(c), CBAM(c, reduction=min(c, 4), preset="official")):
        half = dtype != torch.float32
        for train in (True, False):
            module.train(train)
            x = leaf(*shape)
            with torch.autocast("cpu", dtype=dtype, enabled=half), torch.set_grad_enabled(train):
                y = module(x)
            if train:
                torch.autograd.grad(y, x, torch.ones_like(y))


@dataclass
class Compiled:
    """What the compiler made of one :class:`Launch` for one architecture."""

    launch: Launch
    arch: int
    registers: int
    local_bytes: int  # local memory per thread: register spills (0 wanted)
    shared_bytes: int
    num_warps: int
    loads: collections.Counter  # bytes moved per thread by one ld.global -> how many in the PTX
    stores: collections.Counter  # the same for st.global
    atomics: int  # atom.* / red.* instructions in the PTX (run-to-run order of additions)

    def widest_load(self) -> int:
        return max(self.loads, default=0)

    def narrowest_store(self) -> int:
        return min(self.stores, default=0)


_ATOMIC = re.compile(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", re.MULTILINE)
_MEM_OP = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.([bfsu])(\d+)\b")


def access_widths(ptx: str) -> Tuple[collections.Counter, collections.Counter]:
    """``(loads, stores)``: for the global loads and stores in ``ptx``, how many of each width
    in bytes per thread (``ld.global.v4.b32``: 16)."""
    loads: collections.Counter = collections.Counter()
    stores: collections.Counter = collections.Counter()
    for op, vec, _kind, bits in _MEM_OP.findall(ptx):
        width = int(vec or 1) * int(bits) // 8
        (loads if op == "ld" else stores)[width] += 1
    return loads, stores


def _tool(name: str) -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``REG`` / ``STACK`` / ``SHARED`` / ``LOCAL`` of the kernel in ``cubin`` (``cuobjdump``)."""
    tool = _tool("cuobjdump")
    if tool is None:  # pragma: no cover - Triton without its CUDA tools
        raise RuntimeError("cuobjdump not found next to Triton's ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:  # pragma: no cover
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-500:]}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    """Compile ``launch`` for ``sm_<arch>`` down to a cubin (no GPU needed)."""
    import triton
    from triton.compiler import ASTSource

    kernel = kernels()[launch.kernel]
    src = ASTSource(kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(src, target=_target(arch), options=launch.options)
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    loads, stores = access_widths(ptx)
    return Compiled(launch, arch, usage["REG"], usage["LOCAL"], usage["SHARED"], compiled.metadata.num_warps,
                    loads, stores, len(_ATOMIC.findall(ptx)))


def contiguous_alignment(launch: Launch) -> int:
    """Bytes of ``x`` that Triton may move per vector access along its contiguous axis: the
    power of two dividing that axis' extent (``C_DIV`` channels_last, ``HW_DIV`` NCHW) times
    the element size, at most 16; 0 where ``x``'s address is not known to be aligned."""
    if "x_ptr" not in launch.aligned():
        return 0
    const = launch.constants()
    elems = const.get("C_DIV" if const.get("CL") else "HW_DIV", 1)
    size = {"fp32": 4, "fp16": 2, "bf16": 2}[launch.signature["x_ptr"].lstrip("*")]
    return min(16, elems * size)
