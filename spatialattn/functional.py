"""Functional forms of the attention operators (reference semantics).

Every module in :mod:`spatialattn.nn` and every model (Darknet, R-CNN heads)
applies attention through these functions, so a faster kernel in
:mod:`spatialattn.ops` speeds all of them up at once.

Numerics: for float16 / bfloat16 inputs (and under autocast) the pooled maps,
the gate logits and the gates are computed in float32; the output has the dtype
of the input. NaN in the input propagates to the output (``amax`` / ``mean``
propagate it; nothing clamps or masks it).

Example::

    >>> import torch
    >>> from spatialattn import functional as SF
    >>> x = torch.randn(2, 16, 8, 8)
    >>> w = torch.randn(1, 2, 7, 7)
    >>> y, attn = SF.spatial_attention(x, w, return_attention=True)
    >>> y.shape, attn.shape
    (torch.Size([2, 16, 8, 8]), torch.Size([2, 1, 8, 8]))
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .ops._library import _as_dtype, _params_held, autocast_off, device_type

__all__ = [
    "check_input",
    "accumulate_dtype",
    "normalize_pool_order",
    "get_gate",
    "channel_pool",
    "spatial_attention_map",
    "spatial_attention",
    "pointwise_attention",
    "pointwise_spatial_attention",
    "channel_gate",
    "channel_gate_from_pooled",
    "channel_attention",
    "position_attention",
]

GateLike = Union[str, Callable[[Tensor], Tensor], None]

_POOL_ALIASES = {"max": "max", "mean": "mean", "avg": "mean", "average": "mean"}


def check_input(x: Tensor, channels: Optional[int] = None, name: str = "input") -> None:
    """Raise unless ``x`` is a floating-point ``Tensor[N, channels, H, W]`` (``TypeError`` for
    the type or dtype, ``ValueError`` for the shape)."""
    if not isinstance(x, Tensor):
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(
                f"{name}: torch.fx symbolic tracing cannot trace through spatialattn.functional; call the "
                "attention through its module (spatialattn.nn), which FX records as one call_module node, "
                "or use torch.export / torch.compile"
            )
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        want = "(N, C, H, W)" if channels is None else f"(N, {channels}, H, W)"
        raise ValueError(f"{name}: expected a 4-D tensor of shape {want}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected shape (N, {channels}, H, W), got {tuple(x.shape)} ({x.shape[1]} channels)"
        )


def accumulate_dtype(x: Tensor) -> torch.dtype:
    """float32 for float16 / bfloat16 tensors, the tensor's own dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


_ORDERS: dict = {}  # normalised pooling orders by the tuple / str given (called on every forward)


def normalize_pool_order(order: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``("max", "avg")`` -> ``("max", "mean")``; validates the names."""
    try:
        return _ORDERS[order]
    except (KeyError, TypeError):  # new, or unhashable (a list)
        pass
    given = order
    if isinstance(order, str):
        order = (order,)
    out = []
    for kind in order:
        name = str(kind).lower()
        if name not in _POOL_ALIASES:
            raise ValueError(f"unknown pooling {kind!r}: expected 'max' or 'mean' (alias 'avg')")
        out.append(_POOL_ALIASES[name])
    if not out:
        raise ValueError("pooling order must name at least one of 'max', 'mean'")
    try:
        _ORDERS[given] = tuple(out)
    except TypeError:
        pass
    return tuple(out)


def _hard_sigmoid(t: Tensor) -> Tensor:
    return F.hardsigmoid(t)


_GATES = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "hardsigmoid": _hard_sigmoid,
    "tanh": torch.tanh,
    "identity": lambda t: t,
    "linear": lambda t: t,
}


def get_gate(gate: GateLike) -> Callable[[Tensor], Tensor]:
    """Resolve a gate name (``"sigmoid"``, ``"hard_sigmoid"``, ``"tanh"``, ``"identity"``) or callable."""
    if gate is None:
        return _GATES["identity"]
    if callable(gate):
        return gate
    key = str(gate).lower()
    if key not in _GATES:
        raise ValueError(f"unknown gate {gate!r}: expected one of {sorted(_GATES)} or a callable")
    return _GATES[key]


def channel_pool(
    x: Tensor,
    order: Union[str, Sequence[str]] = ("max", "mean"),
    *,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Pool over the channel axis.

    Args:
        x: ``Tensor[N, C, H, W]``.
        order: which maps, in which order: ``("max", "mean")`` is the official
            CBAM code, ``("mean", "max")`` is timm / ultralytics / mmyolo.
        dtype: dtype of the result (default: ``x.dtype``); the mean is
            accumulated in it.

    Returns:
        ``Tensor[N, len(order), H, W]``.
    """
    check_input(x)
    return ops.channel_pool(x, normalize_pool_order(order), dtype=dtype)


def _first_tensor(module: torch.nn.Module) -> Optional[Tensor]:
    """The module's first parameter, else its first buffer, else None. (A loop, not
    ``next(gen, None)``: the Dynamo of torch 2.8 cannot trace ``next`` with a default.)"""
    for p in module.parameters():
        return p
    for b in module.buffers():
        return b
    return None


def _apply_norm(norm: Optional[Callable[[Tensor], Tensor]], t: Tensor) -> Tensor:
    """``norm(t)``; a norm module whose parameters have another dtype runs in that dtype."""
    if norm is None:
        return t
    if isinstance(norm, torch.nn.Module):
        p = _first_tensor(norm)
        if p is not None and p.dtype != t.dtype:
            return norm(t.to(p.dtype)).to(t.dtype)
    return norm(t)


def _fused_sam_args(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], norm, gate: GateLike
) -> Optional[Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """``(weight, bias, norm_scale, norm_shift)`` in the accumulation dtype when the whole SAM
    can run as one fused op, else ``None``.

    Fusable: a sigmoid gate, and no norm or an eval-mode ``BatchNorm2d(1)`` (an affine map
    of the logits), with parameters in the accumulation dtype, or in ``x``'s own float16 /
    bfloat16 (a ``model.half()``): then converted to float32 (exactly), the BatchNorm's
    affine pair computed in float32 from them, as the layered path computes the conv.
    """
    if not _is_sigmoid_gate(gate):
        return None
    if not _params_held(x, weight, bias):
        return None
    acc = accumulate_dtype(x)
    weight, bias = _as_dtype(weight, acc), _as_dtype(bias, acc)
    if norm is None:
        return weight, bias, None, None
    if not (isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) or ops._is_frozen_batchnorm(norm)):
        return None
    stat = norm._buffers.get("running_mean")
    stat = stat if stat is not None else norm._parameters.get("weight")
    if not _params_held(x, stat):
        return None
    affine = ops.batchnorm_affine(norm, acc)
    if affine is None:
        return None
    return (weight, bias) + affine


def _fused_batchnorm_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm, gate: GateLike) -> bool:
    """A sigmoid gate and a ``BatchNorm2d(1)`` using batch statistics that the fused op can run
    (CPU C++ or CUDA Triton), with parameters in the accumulation dtype or in ``x``'s own half
    dtype (a ``model.half()`` in training: converted to float32 as in :func:`_fused_sam_args`)."""
    if not _is_sigmoid_gate(gate) or norm is None:
        return False
    return _params_held(x, weight, bias) and ops.batchnorm_train_fusable(x, norm)


def spatial_attention_map(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    order: Union[str, Sequence[str]] = ("max", "mean"),
    dilation: int = 1,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
    gate: GateLike = "sigmoid",
    channel_scale: Optional[Tensor] = None,
) -> Tensor:
    """The CBAM spatial attention map ``gate(norm(conv(channel_pool(x * channel_scale))))``.

    Arguments as in :func:`spatial_attention`. Returns ``Tensor[N, 1, H, W]``
    (float32 for float16 / bfloat16 inputs).
    """
    order, channel_scale = _check_sam_inputs(x, weight, order, channel_scale, bias, dilation)
    k_h, k_w = weight.shape[-2:]
    acc = accumulate_dtype(x)
    pooled = ops.channel_pool(x, order, channel_scale=channel_scale, dtype=acc)
    with autocast_off(device_type(x)):
        logits = F.conv2d(
            pooled,
            weight.to(acc),
            None if bias is None else bias.to(acc),
            padding=(dilation * (k_h // 2), dilation * (k_w // 2)),
            dilation=dilation,
        )
        logits = _apply_norm(norm, logits)
        return get_gate(gate)(logits)


def _check_sam_inputs(
    x: Tensor,
    weight: Tensor,
    order: Union[str, Sequence[str]],
    channel_scale: Optional[Tensor],
    bias: Optional[Tensor] = None,
    dilation: int = 1,
) -> Tuple[Tuple[str, ...], Optional[Tensor]]:
    """Validate the spatial-attention arguments; returns the normalised order and the scale in x.dtype."""
    check_input(x)
    order = normalize_pool_order(order)
    if weight.dim() != 4 or weight.shape[0] != 1 or weight.shape[1] != len(order):
        raise ValueError(f"weight: expected shape (1, {len(order)}, k, k), got {tuple(weight.shape)}")
    k_h, k_w = weight.shape[-2:]
    if k_h % 2 == 0 or k_w % 2 == 0:
        raise ValueError(f"weight: kernel size must be odd to keep the map size, got {k_h}x{k_w}")
    if bias is not None and tuple(bias.shape) != (1,):
        raise ValueError(f"bias: expected shape (1,), got {tuple(bias.shape)}")
    if not hasattr(dilation, "__index__") or operator.index(dilation) < 1:
        raise ValueError(f"dilation: expected a positive int, got {dilation!r}")
    if channel_scale is not None:
        if tuple(channel_scale.shape) != (x.shape[0], x.shape[1], 1, 1):
            raise ValueError(
                f"channel_scale: expected shape {(x.shape[0], x.shape[1], 1, 1)}, got {tuple(channel_scale.shape)}"
            )
        channel_scale = _as_dtype(channel_scale, x.dtype)
    return order, channel_scale


def spatial_attention(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    order: Union[str, Sequence[str]] = ("max", "mean"),
    dilation: int = 1,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
    gate: GateLike = "sigmoid",
    channel_scale: Optional[Tensor] = None,
    return_attention: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """CBAM spatial attention (SAM): pool over channels, k x k conv, norm, gate, multiply.

    ``y = x' * gate(norm(conv(channel_pool(x'))))`` with ``x' = x * channel_scale``
    (``x' = x`` when no scale is given). The scaled tensor ``x'`` is never kept
    for backward: only ``x`` and the small maps are saved.

    Args:
        x: ``Tensor[N, C, H, W]``.
        weight: conv weight ``Tensor[1, len(order), k, k]`` with odd ``k``.
        bias: optional conv bias ``Tensor[1]``.
        order: pooling order (see :func:`channel_pool`).
        dilation: conv dilation; padding is ``dilation * (k // 2)`` (same size).
        norm: optional callable on the ``[N, 1, H, W]`` logits (e.g. a BatchNorm).
        gate: gate name or callable (default sigmoid).
        channel_scale: optional ``Tensor[N, C, 1, 1]`` (CBAM's channel gate).
        return_attention: also return the gate map.

    Returns:
        ``Tensor[N, C, H, W]`` (dtype of ``x``), and with ``return_attention`` the
        attention map ``Tensor[N, 1, H, W]`` (float32 for half inputs).
    """
    if type(x) is not Tensor and isinstance(x, torch.fx.Proxy):
        check_input(x)  # (says why FX cannot trace this)
    fused = _fused_sam_args(x, weight, bias, norm, gate)
    if fused is None and _fused_batchnorm_ok(x, weight, bias, norm, gate):
        # training-mode BatchNorm on the logits: one fused op with the batch statistics
        order, channel_scale = _check_sam_inputs(x, weight, order, channel_scale, bias, dilation)
        with autocast_off(device_type(x)):
            return ops.spatial_attention_fused_batchnorm(
                x, weight, bias, norm, order=order, dilation=dilation, channel_scale=channel_scale,
                return_attention=return_attention,
            )
    if fused is None:
        attn = spatial_attention_map(
            x, weight, bias, order=order, dilation=dilation, norm=norm, gate=gate, channel_scale=channel_scale
        )
        if channel_scale is not None:
            channel_scale = channel_scale.to(x.dtype)
        y = ops.gate_multiply(x, attn, channel_scale)
        return (y, attn) if return_attention else y
    # one fused op (pool -> conv -> affine norm -> sigmoid -> multiply)
    order, channel_scale = _check_sam_inputs(x, weight, order, channel_scale, bias, dilation)
    weight, bias, norm_scale, norm_shift = fused
    with autocast_off(device_type(x)):
        return ops.spatial_attention_fused(
            x, weight, bias, order=order, dilation=dilation, channel_scale=channel_scale,
            norm_scale=norm_scale, norm_shift=norm_shift, return_attention=return_attention,
        )


def pointwise_attention(x: Tensor, gate: Tensor) -> Tensor:
    """YOLOv4 "modified SAM" / Darknet ``[sam]`` product: ``x * gate`` element by element.

    Args:
        x: ``Tensor[N, C, H, W]``, the feature map.
        gate: the attention map, ``Tensor[N, C, H, W]`` (point-wise; Darknet's
            ``[sam]``), or broadcastable ``Tensor[N, 1, H, W]`` / ``Tensor[N, C, 1, 1]``.

    Returns:
        ``Tensor[N, C, H, W]`` in ``x.dtype``.
    """
    check_input(x, name="x")
    check_input(gate, name="gate")
    for d, (a, b) in enumerate(zip(x.shape, gate.shape)):
        if b != a and not (b == 1 and d > 0):
            raise ValueError(
                f"gate: expected shape {tuple(x.shape)} (or 1 in the C / H, W axes), got {tuple(gate.shape)}"
            )
    return x * gate.to(x.dtype)


def pointwise_spatial_attention(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
    gate: GateLike = "sigmoid",
    return_attention: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """YOLOv4 modified SAM: ``y = x * gate(norm(conv1x1(x)))`` with a C -> C point-wise conv.

    Args:
        x: ``Tensor[N, C, H, W]``.
        weight: ``Tensor[C, C, 1, 1]`` (or ``Tensor[C, C // groups, 1, 1]``).
        bias: optional ``Tensor[C]``.
        norm: optional callable on the ``[N, C, H, W]`` logits (BatchNorm in YOLOv4).
        gate: gate name or callable.
        return_attention: also return the ``[N, C, H, W]`` attention map.
    """
    check_input(x)
    if weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[-2:] != (1, 1):
        raise ValueError(
            f"weight: expected shape ({x.shape[1]}, {x.shape[1]}, 1, 1), got {tuple(weight.shape)}"
        )
    groups = x.shape[1] // weight.shape[1]
    logits = F.conv2d(x, weight, bias, groups=groups)  # the C -> C conv follows autocast
    with autocast_off(device_type(x)):
        logits = logits.to(accumulate_dtype(logits))
        logits = _apply_norm(norm, logits)
        attn = get_gate(gate)(logits)
    y = pointwise_attention(x, attn)
    return (y, attn) if return_attention else y


def channel_gate(
    x: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    *,
    pool_types: Union[str, Sequence[str]] = ("avg", "max"),
    activation: Callable[[Tensor], Tensor] = F.relu,
    gate: GateLike = "sigmoid",
) -> Tensor:
    """CBAM channel gate: ``gate(sum_p MLP(pool_p(x)))`` -> ``Tensor[N, C, 1, 1]``.

    The MLP is ``fc2(activation(fc1(v)))`` shared across the pools; with
    ``weight2=None`` it is the single layer ``fc1(v)`` (ultralytics' variant,
    C -> C). Weights may be given as Linear (``[out, in]``) or 1x1 conv
    (``[out, in, 1, 1]``) tensors. Pools and MLP run in float32 for half inputs.
    """
    check_input(x)
    # both pools in one read of x (fused op; amax / mean where it does not apply)
    pooled = ops.global_pool(x, normalize_pool_order(pool_types), dtype=accumulate_dtype(x))
    return channel_gate_from_pooled(pooled, weight1, bias1, weight2, bias2, activation=activation, gate=gate)


def channel_gate_from_pooled(
    pooled: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    *,
    activation: Callable[[Tensor], Tensor] = F.relu,
    gate: GateLike = "sigmoid",
) -> Tensor:
    """The MLP and gate of :func:`channel_gate` on pooled maps ``Tensor[P, N, C]`` (what
    :func:`spatialattn.ops.global_pool` returns) -> ``Tensor[N, C, 1, 1]`` in their dtype."""
    if type(pooled) is not Tensor and isinstance(pooled, torch.fx.Proxy):
        check_input(pooled, name="pooled")  # (says why FX cannot trace this)
    if pooled.dim() != 3:
        raise ValueError(f"pooled: expected a [P, N, C] tensor, got shape {tuple(pooled.shape)}")
    p, n, c = pooled.shape
    acc = pooled.dtype
    # Linear ([out, in]) weights of a 1x1 conv; every no-op view or cast skipped: each
    # tensor call costs about 1 us, which on a 13x13 map is what the whole MLP costs
    w1 = _as_linear_weight(weight1, acc)
    if w1.shape[1] != c:
        raise ValueError(f"weight1: expected {c} input features, got shape {tuple(weight1.shape)}")
    w2 = None if weight2 is None else _as_linear_weight(weight2, acc)
    if (w1 if w2 is None else w2).shape[0] != c:
        raise ValueError(f"channel MLP must map back to {c} channels")
    relu = _is_relu(activation)
    b1, b2 = _as_dtype(bias1, acc), _as_dtype(bias2, acc)
    with autocast_off(device_type(pooled)):
        if (w2 is None or relu) and _is_sigmoid_gate(gate):
            # the fused op (C++ / Triton kernels; the reference's products elsewhere)
            return ops.channel_mlp_gate(pooled, w1, b1, w2, b2).reshape(n, c, 1, 1)
        logits = ops.reference.channel_mlp_logits(pooled, w1, b1, w2, b2, torch.relu if relu else activation)
        return get_gate(gate)(logits.reshape(n, c, 1, 1))


def _is_relu(activation) -> bool:
    """The channel MLP's activation is ReLU (what the fused MLP kernels apply)."""
    return activation is F.relu or activation is torch.relu or type(activation) is nn.ReLU


def _is_sigmoid_gate(gate: GateLike) -> bool:
    """The gate is a sigmoid: the name in any case (as :func:`get_gate` resolves it) or
    ``torch.sigmoid`` (what the fused kernels apply, spatial and channel gates alike)."""
    return (isinstance(gate, str) and gate.lower() == "sigmoid") or gate is torch.sigmoid


def _as_linear_weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    """A Linear (``[out, in]``) or 1x1 conv (``[out, in, 1, 1]``) weight as ``[out, in]`` in ``dtype``."""
    return _as_dtype(w if w.dim() == 2 else w.reshape(w.shape[0], -1), dtype)


def channel_attention(
    x: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    *,
    pool_types: Union[str, Sequence[str]] = ("avg", "max"),
    activation: Callable[[Tensor], Tensor] = F.relu,
    gate: GateLike = "sigmoid",
    return_attention: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """CBAM channel attention: ``x * channel_gate(x)``; see :func:`channel_gate`.

    Returns ``Tensor[N, C, H, W]`` and, with ``return_attention``, the gate
    ``Tensor[N, C, 1, 1]``.
    """
    g = channel_gate(
        x, weight1, bias1, weight2, bias2, pool_types=pool_types, activation=activation, gate=gate
    )
    y = x * g.to(x.dtype)
    return (y, g) if return_attention else y


def position_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mode: str = "embedded_gaussian",
    *,
    scale: Optional[float] = None,
    concat_weight: Optional[Tensor] = None,
    need_attention: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Position-similarity (non-local) attention over flattened positions.

    Args:
        query: ``Tensor[N, D, L]`` (theta(x) flattened; ``L = H * W``).
        key: ``Tensor[N, D, M]`` (phi(x), possibly sub-sampled).
        value: ``Tensor[N, E, M]`` (g(x)).
        mode: ``"embedded_gaussian"`` / ``"gaussian"`` (softmax of the dot
            products), ``"dot_product"`` (dot products / M) or
            ``"concatenation"`` (``relu(w . [q_i, k_j]) / M``, needs
            ``concat_weight`` of shape ``[2 * D]``).
        scale: multiply the dot products before the softmax (e.g. ``D**-0.5``).
        need_attention: ``False``: the attention is not returned (``None``), and a softmax
            mode over many positions runs as torch's fused
            ``scaled_dot_product_attention``, which never writes the ``[N, L, M]`` attention
            (see ``_sdpa_ok``).

    Returns:
        ``(out, attn)``: ``Tensor[N, E, L]`` (dtype of ``value``) and the attention
        ``Tensor[N, L, M]`` (float32 for half inputs: similarities and softmax
        are computed in float32, also under autocast), or ``None`` (``need_attention=False``).
    """
    if type(query) is not Tensor and isinstance(query, torch.fx.Proxy):
        check_input(query, name="query")  # (says why FX cannot trace this)
    out_dtype = value.dtype
    acc = accumulate_dtype(query)
    with autocast_off(device_type(query)):
        query, key, value = query.to(acc), key.to(acc), value.to(acc)
        if not need_attention and _sdpa_ok(query, key, value, mode):
            out = _position_attention_sdpa(query, key, value, scale)
            return out.to(out_dtype), None
        out, attn = _position_attention(query, key, value, mode, scale, concat_weight)
    return out.to(out_dtype), attn if need_attention else None


_SDPA_MIN_PAIRS = 2**18  # position pairs L * M per image from which the fused attention runs


def _sdpa_ok(query: Tensor, key: Tensor, value: Tensor, mode: str) -> bool:
    """Softmax attention over at least ``_SDPA_MIN_PAIRS`` position pairs, where only the output
    is wanted: torch's fused attention (``scaled_dot_product_attention``, flash kernels on
    CPU and CUDA) never writes the ``[N, L, M]`` attention and keeps an ``[N, L]``
    log-sum-exp for backward instead. Measured on 2 CPU cores against bmm + softmax (fifty-second
    session): 0.26-0.97x the time forward and 0.32-1.01x forward + backward with up to 128
    inner channels and 0.26M-16.8M pairs, 1.08-1.13x with 256-512 channels at 1M pairs, 0.68-0.75x
    at 16.8M; below 0.26M pairs 1.06-1.83x (bmm kept there, where the attention is small
    anyway). Values as wide as the queries and keys only (else torch's fallback writes the
    attention too). Not where only torch's plain operators may run (export, ``torch.func``,
    forward-mode AD, :func:`spatialattn.ops.decomposed` for double backward)."""
    if mode not in ("embedded_gaussian", "gaussian") or query.shape[-1] * key.shape[-1] < _SDPA_MIN_PAIRS:
        return False
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return False
    if value.shape[1] != query.shape[1]:  # (the fused CPU kernel wants one width; "gaussian" mode
        return False  # compares C-channel features and sums inner-width values)
    return not ops._torch_ops_only()


def _position_attention_sdpa(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float]) -> Tensor:
    # [N, D, L] -> [N, 1, L, D]: one head; the fused kernels need 4-D inputs whose last
    # dimension is contiguous (else torch takes its unfused math path, which keeps the attention)
    q, k, v = (t.transpose(1, 2).contiguous().unsqueeze(1) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 if scale is None else scale)
    return out.squeeze(1).transpose(1, 2)


def _position_attention(query, key, value, mode, scale, concat_weight):
    if mode in ("embedded_gaussian", "gaussian"):
        logits = torch.bmm(query.transpose(1, 2), key)
        if scale is not None:
            logits = logits * scale
        attn = logits.softmax(dim=-1)
    elif mode == "dot_product":
        attn = torch.bmm(query.transpose(1, 2), key) / key.shape[-1]
    elif mode == "concatenation":
        if concat_weight is None or concat_weight.numel() != 2 * query.shape[1]:
            raise ValueError(f"concatenation mode needs concat_weight with {2 * query.shape[1]} elements")
        w = concat_weight.reshape(-1).to(query.dtype)
        d = query.shape[1]
        qi = torch.einsum("d,ndl->nl", w[:d], query)
        kj = torch.einsum("d,ndm->nm", w[d:], key)
        attn = F.relu(qi.unsqueeze(-1) + kj.unsqueeze(1)) / key.shape[-1]
    else:
        raise ValueError(
            f"unknown non-local mode {mode!r}: expected embedded_gaussian, gaussian, dot_product or concatenation"
        )
    out = torch.bmm(value, attn.transpose(1, 2))
    return out, attn
