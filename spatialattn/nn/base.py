"""Shared behaviour of the attention modules: the last attention map, cached inference state
dropped at mode switches, torch.fx tracing as one node, pruned layers, the TorchScript refusal."""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.utils import prune

from ..ops import clear_batchnorm_cache

__all__ = ["AttentionModule", "refuse_torchscript", "run_pruning_hooks"]

EVAL_PLAN = "_spatialattn_eval_plan"  # attribute of a module's cached inference plan (_fast_eval)


class AttentionModule(nn.Module):
    """Base class of every attention module in :mod:`spatialattn.nn`.

    * ``forward(x, return_attention=False)`` returns ``y`` or ``(y, attention)``;
      the output is the same either way.
    * With ``keep_attention = True`` the module stores a detached copy of the
      map of its last call in ``last_attention`` (off by default: it costs
      memory and is a side effect that graph capture does not need).
    """

    def __init__(self) -> None:
        super().__init__()
        self.keep_attention: bool = False
        self.last_attention: Optional[Tensor] = None

    def _apply(self, fn, *args, **kwargs):
        # a cached inference plan (see _fast_eval) holds the tensors it was made from:
        # .to() / .cuda() / .half() drop it rather than keep the old storages alive
        self.__dict__.pop(EVAL_PLAN, None)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "AttentionModule":
        # a switch of mode drops the cached inference plan and BatchNorm pair too: they key on
        # version counters (a BatchNorm on the CPU: on values), which some updates leave as they
        # were: torch's BatchNorm training its statistics (SyncBatchNorm under DDP), fused
        # optimizers (torch.optim.AdamW(fused=True)) and writes through `.data`
        self.__dict__.pop(EVAL_PLAN, None)
        for child in self.children():  # a BatchNorm's cached pair (keyed on versions off the CPU)
            clear_batchnorm_cache(child)
        return super().train(mode)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling
        refuse_torchscript(self)

    def _fx_leaf(self, x: Proxy, return_attention: bool) -> Union[Proxy, Tuple[Proxy, Proxy]]:
        """Under ``torch.fx`` symbolic tracing (``torch.fx.symbolic_trace``, torchvision's
        ``create_feature_extractor``, FX quantization) record the module as one ``call_module``
        node, as tracers do with ``torch.nn``'s own layers: the traced graph then calls the
        module, fused kernels included. Tracing through the forward would fail on its
        Python dispatch (shape checks, device and layout choices)."""
        tracer = x.tracer
        try:
            path = tracer.path_of_module(self)  # (torch.fx.Tracer's; NameError if not installed)
        except (AttributeError, NameError):
            path = None
        if not path:  # the traced root itself, or a module outside the traced model
            raise TypeError(
                f"{type(self).__name__}: torch.fx can trace a model that contains this module (it becomes one "
                "call_module node) but not the module alone or a module outside the traced model; "
                "use torch.export or torch.compile for that"
            )
        kwargs = {"return_attention": True} if return_attention else {}
        out = tracer.create_proxy("call_module", path, (x,), kwargs)
        return (out[0], out[1]) if return_attention else out

    def _remember(self, attention: Optional[Tensor]) -> None:
        if self.keep_attention and attention is not None:
            self.last_attention = attention.detach()


def run_pruning_hooks(*layers: Optional[nn.Module]) -> None:
    """Recompute the pruned weights of ``layers`` (``torch.nn.utils.prune``).

    Pruning keeps ``weight_orig`` and a mask, and sets ``weight = weight_orig * mask`` in the
    layer's forward pre-hook. The attention modules read their layers' weights without
    calling the layers (the fused kernels take the tensors), so they run those hooks
    themselves; other hooks on the inner layers do not run (hook the attention module).
    Without it a pruned weight stayed the tensor made when pruning, and the second
    training step failed ("backward through the graph a second time").
    """
    for layer in layers:
        if layer is not None and layer._forward_pre_hooks:
            for hook in tuple(layer._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):  # (a PruningContainer is one too)
                    hook(layer, ())


def refuse_torchscript(module: nn.Module) -> None:
    """Raise a clear error where ``torch.jit.script`` meets one of this library's modules.

    Their forward dispatches in Python (fused custom ops, fast paths), which TorchScript
    cannot compile; it would fail deep inside with an unrelated message. PyTorch has
    deprecated ``torch.jit.script`` in favour of ``torch.export`` / ``torch.compile``.
    """
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled with torch.jit.script (deprecated by PyTorch; "
        "this library's modules dispatch to fused kernels in Python). Use torch.export "
        "(then AOTInductor or ONNX), torch.compile or torch.jit.trace instead."
    )


def _make_bn(channels: int, norm: Optional[str], eps: float, momentum: float, device=None, dtype=None) -> Optional[nn.Module]:
    if norm is None or norm is False:
        return None
    key = str(norm).lower()
    if key in ("bn", "batchnorm", "batch_norm", "batchnorm2d"):
        return nn.BatchNorm2d(channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
    raise ValueError(f"unknown norm {norm!r}: expected 'bn' or None")


def _check_channels(channels: Optional[int], owner: Optional[str] = None) -> None:
    """``channels`` must be a positive int; ``None`` is allowed unless ``owner`` (a class name) needs it."""
    if channels is None and owner is not None:
        raise ValueError(f"{owner} needs the channel count")
    if channels is not None and (not isinstance(channels, int) or channels <= 0):
        raise ValueError(f"channels must be a positive int, got {channels!r}")
