"""Fast paths behind :mod:`spatialattn.functional`.

Every primitive here has one public entry point that picks an implementation by
context (export, autograd, device, dtype, layout) and a plain PyTorch reference
(:mod:`spatialattn.ops.reference`) that is always available.

* :func:`channel_pool` -- max / mean over channels of ``x * channel_scale``.
* :func:`gate_multiply` -- ``(x * channel_gate) * spatial_gate``.
* :func:`channel_mlp_gate` -- CBAM's channel gate (shared MLP, sum over the pools,
  sigmoid) from globally pooled maps, forward and backward in one call each.
* :func:`spatial_attention_fused` -- the whole CBAM SAM with a sigmoid gate
  (pool -> k x k conv + bias -> optional affine norm -> sigmoid -> multiply) in
  one op, forward and backward.

Implementations, in order of preference:

1. ONNX / ``torch.export`` tracing, ``torch.func`` transforms, forward-mode AD and
   :func:`decomposed` blocks (double backward): the plain reference decomposition
   (standard operators only; no ArgMax).
2. CPU float32 / float64 / float16 / bfloat16: C++ kernels (:mod:`._cpp`, built
   on first use) through the ``spatialattn::*`` custom ops of :mod:`._library`
   (eager calls without autograd skip the custom-op layer and call the kernels
   directly). Half inputs are read and written in their own format; the kernels
   compute in float32 and return the small maps in float32.
3. CUDA float16 / bfloat16 / float32 with Triton: Triton kernels (:mod:`._triton`).
4. Otherwise the memory-lean pure-PyTorch ``autograd.Function`` s (:mod:`.lean`)
   or, without autograd, the reference.

``SPATIALATTN_DISABLE_CPP=1`` turns the C++ kernels off (then CPU uses 4.).
:func:`backend` names the implementation a tensor gets; :func:`backend_report` (the
``spatialattn kernels`` command) reports them for this machine, with the reason where the C++
kernels are not used.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _cpp, lean, reference
from . import _library as _lib

__all__ = [
    "channel_pool",
    "gate_multiply",
    "spatial_attention_fused",
    "spatial_attention_fused_batchnorm",
    "batchnorm_train_fusable",
    "global_pool",
    "with_global_pool",
    "channel_mlp_gate",
    "batchnorm_affine",
    "clear_batchnorm_cache",
    "is_exporting",
    "backend",
    "backend_report",
    "decomposed",
]

_KINDS: dict = {}
_HALF = (torch.float16, torch.bfloat16)
_CPU_DTYPES = _lib._CPP_DTYPES  # what the C++ kernels take


def is_exporting() -> bool:
    """True while ``torch.jit.trace`` / ``torch.onnx.export`` / ``torch.export`` trace the model.

    The TorchScript tracer (``torch.jit.trace`` and the TorchScript-based ONNX exporter)
    records only torch operators: the C++ kernels would be called untraced, leaving
    uninitialised outputs in the graph. The dynamo-based exporter sets ``is_exporting``.
    (``torch.onnx.is_in_onnx_export`` is not asked: its imports cost about 1 us a call,
    and every ONNX export it reports runs under one of the two.)
    """
    return torch._C._get_tracing_state() is not None or _export_flag()


# torch.export's flag itself where torch has it: the Dynamo of torch 2.9.1 (and earlier) folded a
# call of torch.compiler.is_exporting() to True in every graph it traced, torch.compile's
# included (its table of "tracing state" functions), so compiled models took the plain
# decomposition instead of the fused ops. A read of the module global is what torch 2.14's
# Dynamo does for the call, and what Dynamo guards on.
if hasattr(torch.compiler, "_is_exporting_flag"):
    def _export_flag() -> bool:
        return torch.compiler._is_exporting_flag
else:  # pragma: no cover - a torch without the flag
    _export_flag = torch.compiler.is_exporting


_functorch_level = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


def _torch_ops_only() -> bool:
    """True where only torch operators may run: while a graph is traced for export (see
    :func:`is_exporting`), under a ``torch.func`` transform (``grad``, ``vmap``,
    ``jacrev``, ``functional_call`` inside them...), which cannot see into our autograd
    Functions or custom ops (they have no functorch rules), and inside a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``; the Functions have no ``jvp``); then the
    plain reference decomposition runs (0.05 us to ask)."""
    if is_exporting() or _forward_ad._current_level >= 0 or _decomposed_depth:
        return True
    return not torch.compiler.is_compiling() and _functorch_level() is not None


_decomposed_depth = 0


@contextlib.contextmanager
def decomposed() -> Iterator[None]:
    """Within this block every op (and so every module) runs the plain PyTorch decomposition
    (:mod:`spatialattn.ops.reference`: ``amax`` / ``mean``, ``conv2d``, ``sigmoid``, products)
    instead of the fused kernels: same values to rounding, the memory and speed of eager
    PyTorch, and graphs that torch can differentiate any number of times.

    For double backward through the attention layers (``create_graph=True``: gradient
    penalties, Hessian-vector products), which the fused kernels do not support: their
    backward raises :data:`spatialattn.ops._library.DOUBLE_BACKWARD_ERROR` when differentiated
    a second time. Run the forward in the block; the backward may run anywhere. Process-wide
    (all threads) while any such block is open.

    Example::

        with spatialattn.ops.decomposed():
            loss = model(x).square().sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        g.square().sum().backward()  # second order through the attention layers
    """
    global _decomposed_depth
    _decomposed_depth += 1
    try:
        yield
    finally:
        _decomposed_depth -= 1


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kinds(order: Sequence[str]) -> list:
    key = tuple(order)
    kinds = _KINDS.get(key)
    if kinds is None:
        unknown = [k for k in key if k not in _lib.KIND]
        if unknown or not key:
            raise ValueError(f"pooling order {key!r}: expected one or more of 'max', 'mean' (normalised; "
                             "spatialattn.functional.normalize_pool_order maps 'avg' and the like)")
        kinds = _KINDS[key] = [_lib.KIND[k] for k in key]
    return kinds


_dispatch_modes = torch._C._len_torch_dispatch_stack


def _fast_device(x: Tensor) -> Optional[str]:
    """'cpp' / 'triton' / 'op' (let the custom op decide) or None.

    'op' while compiling, and also in eager mode where the kernels must not be called directly:
    ``x`` a tensor subclass (a ``FakeTensor``, say, whose data is not there) or a
    ``TorchDispatchMode`` active (``FakeTensorMode`` for shape inference, ``FlopCounterMode``,
    a debugging mode): the custom ops pass through the mode and have fake implementations,
    where a direct kernel call would read unallocated memory or go unseen (0.05 us to ask)."""
    if torch.compiler.is_compiling() or type(x) is not Tensor or _dispatch_modes():
        if x.device.type == "cpu" and x.dtype in _CPU_DTYPES:
            return "op"
        if x.device.type == "cuda" and x.dtype in (torch.float32,) + _HALF:
            return "op"
        return None
    if x.is_cpu:  # (is_cpu / is_cuda: 0.05 us; x.device.type builds a torch.device, 0.3 us)
        if x.dtype in _CPU_DTYPES and _cpp.get() is not None:
            return "cpp"
        return None
    if x.is_cuda and x.dtype in (torch.float32,) + _HALF and _lib._triton_ok(x):
        return "triton"
    return None


def backend(x: Tensor) -> str:
    """Name of the implementation the ops would use for ``x``: ``"cpp"``, ``"triton"`` or ``"torch"``."""
    return _fast_device(x) or "torch"


def backend_report() -> dict:
    """What the ops run on this machine, and why: loads the C++ kernels (building them on first use,
    about 1-2 minutes) and asks every device and dtype which implementation :func:`backend` picks.

    Returns ``{"torch", "cpu_capability", "threads", "cpp": {"available", "name", "path", "isa",
    "openmp", "lto", "error", "seconds"} (:func:`._cpp.describe`, and the seconds it took),
    "triton": {"available", "version"}, "cuda_devices": [names], "backends": {device: {dtype name: "cpp" | "triton" | "torch"}}}``; ``cpp["error"]`` says why
    the C++ kernels are not used (disabled, no compiler, the compiler's error), which the ops
    themselves only log at DEBUG level.
    """
    import time

    from . import _triton

    t0 = time.perf_counter()
    cpp = _cpp.describe()
    cpp["seconds"] = round(time.perf_counter() - t0, 3)
    triton_version = None
    if _triton.available():
        import triton

        triton_version = getattr(triton, "__version__", "unknown")
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    backends = {}
    for device in ["cpu"] + [f"cuda:{i}" for i in range(len(cuda))]:
        backends[device] = {str(d).replace("torch.", ""): backend(torch.empty(1, 1, 1, 1, dtype=d, device=device))
                            for d in dtypes}
    return {
        "torch": torch.__version__,
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": torch.get_num_threads(),
        "cpp": cpp,
        "triton": {"available": _triton.available(), "version": triton_version},
        "cuda_devices": cuda,
        "backends": backends,
    }


def _reject_x(x: Tensor, name: str = "x") -> None:
    """Raise the error for an ``x`` that is not a floating-point ``Tensor[N, C, H, W]`` (the
    PyTorch fallbacks would otherwise fail deep inside torch, or pool over the wrong dims of
    a 3-D tensor). Callers test ``x.dim() != 4 or not x.is_floating_point()`` first."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}")
    raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _scale_ok(x: Tensor, s: Optional[Tensor]) -> bool:
    return s is None or (s.shape == (x.shape[0], x.shape[1], 1, 1) and s.device == x.device)


def channel_pool(
    x: Tensor,
    order: Sequence[str] = ("max", "mean"),
    *,
    channel_scale: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Max / mean over channels: ``Tensor[N, C, H, W] -> Tensor[N, len(order), H, W]``.

    ``order`` must already be normalised to ``"max"`` / ``"mean"`` entries;
    ``channel_scale`` (``Tensor[N, C, 1, 1]``, same dtype as ``x``) multiplies ``x``
    first without keeping the product for backward.
    """
    if x.dim() != 4 or not x.is_floating_point():
        _reject_x(x)
    dtype = x.dtype if dtype is None else dtype
    if _torch_ops_only():
        return reference.channel_pool(x, order, channel_scale, dtype)
    grad = _needs_autograd(x, channel_scale)
    fast = _fast_device(x) if x.shape[1] > 0 else None
    if fast is not None and _scale_ok(x, channel_scale) and (
        dtype == x.dtype or (x.dtype in _HALF and dtype == torch.float32)
    ):
        if fast == "triton" and not grad:  # pooled in the requested dtype in one launch
            from . import _triton

            return _triton.pool_forward(x, channel_scale, _kinds(order), dtype)
        if fast in ("cpp", "triton"):  # pooled in the kernels' compute dtype (float32 for half x)
            kernels = _lib.eager_kernels(fast)
            if not grad:
                pooled = kernels.pool_forward(_lib._dense(x), channel_scale, _kinds(order))
            else:
                pooled = _lib.EagerChannelPool.apply(x, channel_scale, _kinds(order), kernels)
            return pooled if pooled.dtype == dtype else pooled.to(dtype)
        return _lib.channel_pool_op(x, channel_scale, _kinds(order), dtype)
    if not grad:
        return reference.channel_pool(x, order, channel_scale, dtype)
    return lean.channel_pool(x, order, channel_scale, dtype)


def gate_multiply(x: Tensor, spatial_gate: Tensor, channel_gate: Optional[Tensor] = None) -> Tensor:
    """``(x * channel_gate) * spatial_gate`` in ``x.dtype``; saves only ``x`` and the gates.

    The reference casts the gates to ``x.dtype``; the C++ kernels compute float16 / bfloat16
    inputs in float32 and round the product once.

    Shapes: ``x`` ``[N, C, H, W]``, ``spatial_gate`` ``[N, 1, H, W]``, ``channel_gate``
    ``[N, C, 1, 1]`` or ``None`` (other broadcastable shapes take the PyTorch path).
    """
    if _torch_ops_only():
        return reference.gate_multiply(x, spatial_gate, channel_gate)
    grad = _needs_autograd(x, spatial_gate, channel_gate)
    fast = _fast_device(x) if x.dim() == 4 else None
    if (
        fast is not None
        and spatial_gate.shape == (x.shape[0], 1, x.shape[2], x.shape[3])
        and spatial_gate.device == x.device
        and _scale_ok(x, channel_gate)
    ):
        if fast in ("cpp", "triton"):
            kernels = _lib.eager_kernels(fast)
            if not grad:
                return kernels.gate_forward(_lib._dense(x), spatial_gate, channel_gate, None)
            return _lib.EagerGateMultiply.apply(x, spatial_gate, channel_gate, kernels)
        return _lib.gate_multiply_op(x, spatial_gate, channel_gate)
    if not grad:
        return reference.gate_multiply(x, spatial_gate, channel_gate)
    return lean.gate_multiply(x, spatial_gate, channel_gate)


def _global_pool_backend(x: Tensor, dtype: torch.dtype) -> Optional[str]:
    """'cpp' / 'triton' where the fused global pooling runs, else None."""
    if _torch_ops_only() or x.dim() != 4 or x.shape[2] * x.shape[3] == 0:
        return None
    fast = _fast_device(x)
    if fast == "cpp" and dtype == _lib._acc(x):
        return fast
    if fast == "triton" and (dtype == x.dtype or (x.dtype in _HALF and dtype == torch.float32)):
        return fast
    return None


def global_pool(x: Tensor, order: Sequence[str] = ("mean", "max"), *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Max / mean over ``H, W`` (CBAM's channel-gate pooling): ``Tensor[N, C, H, W] -> Tensor[len(order), N, C]``.

    Both maps in one read of ``x`` on the C++ (CPU) and Triton (CUDA) paths, and in eager
    autograd a fused backward (tie counts, then one write of the gradient); under
    ``torch.compile``, for export, or elsewhere: ``amax`` / ``mean``. Either way ties share
    the max gradient evenly.
    ``dtype``: dtype of the result; the mean is accumulated in it.
    """
    if x.dim() != 4 or not x.is_floating_point():
        _reject_x(x)
    dtype = x.dtype if dtype is None else dtype
    fast = _global_pool_backend(x, dtype)
    if fast is not None and not _needs_autograd(x):
        if fast == "cpp":
            return _cpp.get().global_pool(_lib._dense(x), _kinds(order))
        return _lib._global_pool_forward(_lib._dense(x), _kinds(order), dtype, fast, count=False)[0]
    if fast is not None:
        return _lib.GlobalPool.apply(x, _kinds(order), dtype, fast)
    maps = [x.amax(dim=(2, 3)).to(dtype) if k == "max" else x.mean(dim=(2, 3), dtype=dtype) for k in order]
    return torch.stack(maps, dim=0)


def with_global_pool(
    x: Tensor,
    body: Callable[[Tensor, Tensor], Sequence[Tensor]],
    *,
    order: Sequence[str] = ("mean", "max"),
    dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, ...]:
    """``body(x, global_pool(x, order, dtype=dtype))``, for a ``body`` that also reads ``x``
    (CBAM: the channel gate from the pooled maps, the spatial attention of ``x`` scaled by it).

    Same values and gradients as calling the two directly. In eager training on the fused
    paths (C++ on CPU, Triton on CUDA; ``x`` requiring grad) the pooling's backward adds its
    gradient in place into the gradient w.r.t. ``x`` that ``body`` produced (one read-modify-
    write), instead of writing a second full-size gradient for autograd to add: two passes
    over memory fewer per training step. ``body``'s gradient w.r.t. its first argument must
    be a tensor of its own (true of every op in this library: it is not the upstream
    gradient or a view of one). Returns ``body``'s outputs as a tuple.
    """
    if x.dim() != 4 or not x.is_floating_point():
        _reject_x(x)
    dtype = x.dtype if dtype is None else dtype
    fast = _global_pool_backend(x, dtype)
    if fast is not None and x.requires_grad and torch.is_grad_enabled():
        slot = _lib.GradSlot()
        pooled = _lib.GlobalPool.apply(x, _kinds(order), dtype, fast, slot)
        xt, pooled = _lib.GradTap.apply(x.detach(), pooled, slot)
        return tuple(body(xt, pooled))
    return tuple(body(x, global_pool(x, order, dtype=dtype)))


def channel_mlp_gate(
    pooled: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
) -> Tensor:
    """CBAM's channel gate from pooled maps: ``sigmoid(sum_p fc2(relu(fc1(pooled[p]))))``.

    ``pooled``: ``Tensor[P, N, C]`` (what :func:`global_pool` returns); Linear weights
    ``weight1`` ``Tensor[R, C]``, ``weight2`` ``Tensor[C, R]``, biases ``[R]`` / ``[C]`` or
    None; with ``weight2=None`` the MLP is the single layer ``fc1`` (``weight1``
    ``Tensor[C, C]``). Returns ``Tensor[N, C]`` in ``pooled``'s dtype.

    On CPU (float32 / float64, all tensors of one dtype, eager) the C++ kernels compute the
    forward in one call and, under autograd, the whole backward in another: about a dozen
    tensor ops and their autograd nodes fewer per call, which is most of a CBAM's cost on
    small maps. On CUDA with Triton (float32, two layers, hidden width <= 256, eager) one
    launch forward and two backward instead of about 6 and 12. Elsewhere (``torch.compile``,
    export, ``torch.func``, other dtypes) the plain decomposition
    :func:`spatialattn.ops.reference.channel_mlp_gate`.
    """
    if pooled.dim() != 3:
        raise ValueError(f"pooled: expected a [P, N, C] tensor, got shape {tuple(pooled.shape)}")
    parts = (weight1, bias1, weight2, bias2)
    fast = _fast_device(pooled)
    if fast == "cpp" and pooled.dtype in (torch.float32, torch.float64):
        ok = all(t is None or (t.is_cpu and t.dtype == pooled.dtype) for t in parts)
    elif fast == "triton":
        from . import _triton

        ok = _triton.mlp_supported(pooled, weight1, weight2) and all(
            t is None or (t.device == pooled.device and t.dtype == pooled.dtype) for t in parts)
    else:
        ok = False
    if ok and not _torch_ops_only():
        if _needs_autograd(pooled, *parts):
            return _lib.ChannelMlpGate.apply(pooled, weight1, bias1, weight2, bias2, fast)
        if fast == "cpp":
            return _cpp.get().channel_mlp_forward(pooled, weight1, bias1, weight2, bias2, False)[0]
        return _triton.mlp_gate_forward(pooled, weight1, bias1, weight2, bias2)[0]
    return reference.channel_mlp_gate(pooled, weight1, bias1, weight2, bias2)


def _is_frozen_batchnorm(norm) -> bool:
    """``norm`` is a frozen BatchNorm (torchvision's ``ops.misc.FrozenBatchNorm2d``, detectron2's
    and the like, by name and buffers): ``t * w * rsqrt(var + eps) + (b - mean * ...)`` with
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` buffers, in training too. Detector
    code freezes every BatchNorm of a model this way, the attention modules' included."""
    if type(norm).__name__ != "FrozenBatchNorm2d" or not isinstance(norm, torch.nn.Module):
        return False
    b = norm._buffers
    return all(b.get(k) is not None for k in ("weight", "bias", "running_mean", "running_var")) and (
        isinstance(getattr(norm, "eps", None), float))


def _batchnorm_tensors(norm) -> Optional[Tuple[Optional[Tensor], ...]]:
    """``(running_mean, running_var, weight, bias)`` of a BatchNorm or a frozen one
    (:func:`_is_frozen_batchnorm`, whose weight and bias are buffers), from the dicts
    (``nn.Module.__getattr__`` costs about 0.6 us a name); None for other modules and where the
    weight or bias is parametrized (computed on access: not folded)."""
    if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        params = norm._parameters
    elif _is_frozen_batchnorm(norm):
        params = norm._buffers
    else:
        return None
    if "weight" not in params or "bias" not in params:
        return None
    b = norm._buffers
    return b.get("running_mean"), b.get("running_var"), params["weight"], params["bias"]


def _batchnorm_values(mean: Optional[Tensor], var: Optional[Tensor], gamma: Optional[Tensor],
                      beta: Optional[Tensor]) -> tuple:
    """A cache key for what a BatchNorm fold computes from its one-element CPU tensors: their
    values (0.12 us a read) and dtypes. Not their versions: torch's BatchNorm updates its running
    statistics in training without bumping them, and writes through ``.data`` do not either.
    (Written out: a generator over the four cost 0.5 us more; more than one element: ``item``
    raises RuntimeError.)"""
    return (None if mean is None else (mean.dtype, mean.item()), None if var is None else var.item(),
            None if gamma is None else (gamma.dtype, gamma.item()), None if beta is None else beta.item())


def batchnorm_affine(norm, dtype: Optional[torch.dtype] = None) -> Optional[Tuple[Tensor, Tensor]]:
    """``(scale, shift)`` such that ``norm(t) == t * scale + shift`` for an eval-mode
    ``BatchNorm2d(1)`` with running statistics, or a frozen one in either mode
    (:func:`_is_frozen_batchnorm`); ``None`` when that does not hold (training mode, no running
    stats, other modules). Differentiable in the affine
    parameters, so the fused op trains gamma / beta (not the statistics).

    ``dtype``: the pair's dtype, computed from the statistics and parameters converted to it
    (float32 for a BatchNorm held in float16 / bfloat16, as torch's BatchNorm computes in
    float32 internally); default: the BatchNorm's own dtype."""
    if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.training:
        return None
    four = _batchnorm_tensors(norm)
    if four is None:
        return None
    mean, var, gamma, beta = four
    if mean is None or var is None or mean.numel() != 1:
        return None
    # Without autograd (inference) the pair is cached on the module: six small tensor ops cost
    # about 17 us, the SAM of a 13x13 map 25 us. On the CPU the key holds the four values
    # (0.12 us a read): torch's own BatchNorm updates its running statistics in training
    # without bumping their version counters, and so do writes through `.data` (a key of
    # versions kept a stale pair after such training, until the fifty-second session). On
    # other devices a read would wait for the device: there the key holds the tensors'
    # versions, and the attention modules drop the pair at every train() / eval() (what
    # follows training through torch's or a SyncBatchNorm); a functional caller with its own
    # BatchNorm trained that way should call spatialattn.ops.clear_batchnorm_cache(norm).
    # Not while a graph is captured, which must record the computation.
    key = None
    by_value = mean.is_cpu and not _CPU_STANDS_FOR_GPU
    if not (torch.compiler.is_compiling() or _torch_ops_only() or (torch.is_grad_enabled() and (
            (gamma is not None and gamma.requires_grad) or (beta is not None and beta.requires_grad)))):
        if by_value:
            key = (norm.eps, dtype) + _batchnorm_values(mean, var, gamma, beta)
        else:
            try:
                key = (norm.eps, dtype, _tensor_state(mean), _tensor_state(var), _tensor_state(gamma),
                       _tensor_state(beta))
            except RuntimeError:  # inference tensors have no version counter: no cache
                pass
    if key is not None:
        hit = norm.__dict__.get(_AFFINE_CACHE)
        if hit is not None and hit[0] == key:
            _, _, scale, shift, versions = hit
            if (scale._version, shift._version) == versions:  # not written into by a caller
                return scale, shift
    if key is None:
        return _affine_pair(mean, var, gamma, beta, norm.eps, dtype)
    # a pair for the cache must serve any later mode: ordinary tensors (not inference
    # tensors, which autograd cannot save, should a later call need the input's gradient)
    with torch.inference_mode(False), torch.no_grad():
        scale, shift = _affine_pair(mean, var, gamma, beta, norm.eps, dtype)
    # (a key of versions keeps the tensors, and aliases of their storages: a `.data =` swap frees
    # the old storage, whose address a later one could take: the same key for other data)
    held = None if by_value else (mean, var, gamma, beta, [t.detach() for t in four if t is not None])
    norm.__dict__[_AFFINE_CACHE] = (key, held, scale, shift, (scale._version, shift._version))
    return scale, shift


def clear_batchnorm_cache(norm) -> None:
    """Drop the affine pair :func:`batchnorm_affine` cached on ``norm``. Needed only off the
    CPU, after ``norm``'s statistics changed without a version bump (torch's BatchNorm in
    training, writes through ``.data``) while it stayed outside an attention module, whose
    ``train()`` / ``eval()`` drops it."""
    norm.__dict__.pop(_AFFINE_CACHE, None)


def _affine_pair(mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 eps: float, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    if dtype is not None and mean.dtype != dtype:  # (differentiable in gamma / beta)
        mean, var = mean.to(dtype), var.to(dtype)
        gamma = None if gamma is None else gamma.to(dtype)
        beta = None if beta is None else beta.to(dtype)
    inv = torch.rsqrt(var + eps)
    scale = inv if gamma is None else gamma * inv
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return scale.reshape(1), shift.reshape(1)


_AFFINE_CACHE = "_spatialattn_affine"
# True while CPU tensors stand for CUDA ones (``_triton_aot.triton_dispatch_on_cpu``: the
# Triton path checked through the interpreter, launches counted): host-side choices then
# follow the GPU's (the BatchNorm pair's key on versions, not on values read from the device)
_CPU_STANDS_FOR_GPU = False


def _tensor_state(t: Optional[Tensor]) -> Optional[tuple]:
    """A cache key for ``t`` off the CPU: the object, its data (``.to()`` / ``.data =`` keep the
    object but swap the storage) and its in-place version."""
    return None if t is None else (id(t), t.data_ptr(), t.dtype, t._version)


def _sam_reference(x, weight, bias, order, dilation, channel_scale, norm_scale, norm_shift):
    acc = torch.float32 if x.dtype in _HALF else x.dtype
    pooled = reference.channel_pool(x, order, channel_scale, acc)
    logits, attn = _lib._sam_small_torch(pooled, weight, bias, norm_scale, norm_shift, dilation)
    return reference.gate_multiply(x, attn, channel_scale), attn


def spatial_attention_fused(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    order: Sequence[str] = ("max", "mean"),
    dilation: int = 1,
    channel_scale: Optional[Tensor] = None,
    norm_scale: Optional[Tensor] = None,
    norm_shift: Optional[Tensor] = None,
    return_attention: bool = False,
    out: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """CBAM SAM with a sigmoid gate in one fused op (forward and backward).

    ``y = x' * sigmoid(norm_scale * (conv(channel_pool(x', order), weight) + bias) + norm_shift)``
    with ``x' = x * channel_scale``; the conv has padding ``dilation * (k // 2)``.

    Args:
        x: ``Tensor[N, C, H, W]``.
        weight: ``Tensor[1, len(order), kh, kw]`` (odd kh, kw).
        bias: optional ``Tensor[1]``.
        order: normalised pooling order (``"max"`` / ``"mean"``).
        dilation: conv dilation.
        channel_scale: optional ``Tensor[N, C, 1, 1]`` in ``x.dtype`` (CBAM's channel gate);
            ``x * channel_scale`` is never stored.
        norm_scale, norm_shift: optional ``Tensor[1]`` each, an affine norm of the logits
            (an eval-mode BatchNorm2d(1): see :func:`batchnorm_affine`).
        return_attention: also return the ``Tensor[N, 1, H, W]`` gate (float32 for half x).
        out: optional output tensor (shape / strides / dtype of ``x``) for inference
            without autograd on the C++ path (avoids a fresh allocation per call); ``out=x``
            computes in place.

    Saved for backward: ``x``, the small maps (pooled, logits, gate) and parameters.
    """
    if x.dim() != 4 or not x.is_floating_point():
        _reject_x(x)
    if _torch_ops_only():
        y, attn = _sam_reference(x, weight, bias, order, dilation, channel_scale, norm_scale, norm_shift)
        return (y, attn) if return_attention else y
    grad = _needs_autograd(x, weight, bias, channel_scale, norm_scale, norm_shift)
    fast = _fast_device(x) if x.shape[1] > 0 else None
    if out is not None and (grad or fast != "cpp"):
        raise ValueError("out= is only supported without autograd on the CPU C++ path")
    if fast is None or not _scale_ok(x, channel_scale):
        if grad:
            acc = torch.float32 if x.dtype in _HALF else x.dtype
            pooled = lean.channel_pool(x, order, channel_scale, acc)
            _, attn = _lib._sam_small_torch(pooled, weight, bias, norm_scale, norm_shift, dilation)
            y = lean.gate_multiply(x, attn, channel_scale)
        else:
            y, attn = _sam_reference(x, weight, bias, order, dilation, channel_scale, norm_scale, norm_shift)
        return (y, attn) if return_attention else y
    kinds = _kinds(order)
    if fast in ("cpp", "triton") and not grad:
        y, attn, _, _ = _lib.eager_kernels(fast).sam_forward(
            _lib._dense(x), weight, bias, channel_scale, norm_scale, norm_shift, kinds, dilation, out
        )
    elif fast in ("cpp", "triton"):
        y, attn = _lib.EagerSam.apply(x, weight, bias, channel_scale, norm_scale, norm_shift, kinds, dilation,
                                      _lib.eager_kernels(fast))
    else:
        y, attn, _, _ = _lib.sam_op(x, weight, bias, channel_scale, norm_scale, norm_shift, kinds, dilation)
    return (y, attn) if return_attention else y


def batchnorm_train_fusable(x: Tensor, norm) -> bool:
    """True when :func:`spatial_attention_fused_batchnorm` can run ``norm`` on ``x``'s SAM
    logits: a ``BatchNorm2d(1)`` using batch statistics (training mode, or no running
    statistics) with parameters in the accumulation dtype (float32 for half inputs) or in
    ``x``'s own half dtype (a ``model.half()``: converted to float32, exactly),
    CPU with the C++ kernels or CUDA with Triton (float32 / float64 / float16 / bfloat16; CUDA
    float64 excepted),
    eager mode or ``torch.compile`` (the custom op ``spatialattn::sam_batchnorm``), and more
    than one logit per batch."""
    if not isinstance(norm, torch.nn.BatchNorm2d) or norm.num_features != 1:
        return False
    if not (norm.training or norm.running_mean is None):
        return False
    if _torch_ops_only():
        return False
    if x.dim() != 4 or x.shape[1] == 0 or x.shape[0] * x.shape[2] * x.shape[3] < 2:
        return False
    if _fast_device(x) is None:
        return False
    p = norm.weight if norm.weight is not None else norm.running_mean
    return _lib._params_held(x, p)


def spatial_attention_fused_batchnorm(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm: "torch.nn.BatchNorm2d",
    *,
    order: Sequence[str] = ("max", "mean"),
    dilation: int = 1,
    channel_scale: Optional[Tensor] = None,
    return_attention: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """CBAM SAM with a training-mode ``BatchNorm2d(1)`` on the logits, fused (CPU C++, CUDA Triton).

    ``y = x' * sigmoid(norm(conv(channel_pool(x', order), weight) + bias))`` with the batch
    statistics of the logits, exactly as ``norm`` would compute them; ``norm``'s running
    statistics (and ``num_batches_tracked``) are updated the way ``BatchNorm2d.forward``
    does. Check :func:`batchnorm_train_fusable` first.

    Args:
        x: ``Tensor[N, C, H, W]`` (CPU float32 / float64 / float16 / bfloat16; CUDA float16 /
            bfloat16 / float32).
        weight: ``Tensor[1, len(order), kh, kw]``; bias: optional ``Tensor[1]`` (these and
            ``norm``'s parameters in the accumulation dtype, or in ``x``'s half dtype:
            converted to float32, their gradients rounded back).
        norm: the ``BatchNorm2d(1)`` (training mode, or without running statistics).
        order, dilation, channel_scale, return_attention: as :func:`spatial_attention_fused`.
    """
    if x.dim() != 4 or not x.is_floating_point():
        _reject_x(x)
    fast = _fast_device(x)
    acc = _lib._acc(x)
    # parameters held in x's half dtype (a model.half() in training): computed in float32, their
    # gradients rounded back by autograd's conversion
    weight, bias, bn_weight, bn_bias = (_lib._as_dtype(t, acc) for t in (weight, bias, norm.weight, norm.bias))
    running = None  # the running statistics, where the kernels update them themselves
    if fast == "op":  # torch.compile (or a dispatch mode): the custom op
        y, attn, _, _, stats = _lib.sam_batchnorm_op(
            x, weight, bias, channel_scale, bn_weight, bn_bias, float(norm.eps), _kinds(order), dilation
        )
    elif fast == "cpp":
        y, attn, stats = _lib.CppSamBatchNorm.apply(
            x, weight, bias, channel_scale, bn_weight, bn_bias, float(norm.eps), _kinds(order), dilation
        )
    else:
        # on the Triton path the launch that forms the batch statistics also updates the
        # running ones (one launch fewer per training step; statistics held in float32)
        if (norm.training and norm.track_running_stats and x.numel() > 0 and _lib._triton_ok(x)
                and norm.running_mean.dtype == torch.float32 and norm.running_var.dtype == torch.float32):
            running = (norm.running_mean, norm.running_var, norm.num_batches_tracked, norm.momentum)
        y, attn, stats = _lib.GenericSamBatchNorm.apply(
            x, weight, bias, channel_scale, bn_weight, bn_bias, float(norm.eps), _kinds(order), dilation, running
        )
    if running is None:
        _update_running_stats(norm, stats, x.shape[0] * x.shape[2] * x.shape[3], x)
    return (y, attn) if return_attention else y


def _update_running_stats(norm: "torch.nn.BatchNorm2d", stats: Tensor, count: int, x: Tensor) -> None:
    """Update ``norm``'s running statistics (and ``num_batches_tracked``) from the batch
    statistics ``stats = [mean, biased var]`` (float64) of ``count`` logits, as
    ``BatchNorm2d.forward`` does in training mode (nothing otherwise); ``x``: the input,
    whose device picks the C++ or the torch update (on the Triton path the kernels make it,
    :func:`spatial_attention_fused_batchnorm`)."""
    if not (norm.training and norm.track_running_stats):
        return
    fast = _fast_device(x)
    if fast == "cpp":
        # one C++ call: ATen's update, momentum * stat + (1 - momentum) * running in double,
        # rounded once (bumps the version counters)
        momentum = -1.0 if norm.momentum is None else float(norm.momentum)
        _cpp.get().bn_update_running(norm.running_mean, norm.running_var, norm.num_batches_tracked, stats,
                                     count, momentum)
    else:  # also under torch.compile: traceable, no host synchronisation
        with torch.no_grad():  # the same formula with torch ops (factor as BatchNorm2d.forward)
            factor = 0.0 if norm.momentum is None else norm.momentum
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
                if norm.momentum is None:
                    factor = 1.0 / norm.num_batches_tracked.double()  # a tensor: no float() of it
            unbiased = stats[1] * count / (count - 1)
            norm.running_mean.copy_(factor * stats[0] + (1.0 - factor) * norm.running_mean.double())
            norm.running_var.copy_(factor * unbiased + (1.0 - factor) * norm.running_var.double())
