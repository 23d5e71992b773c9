"""Distributed helpers: init from torchrun's environment (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_main", "world", "barrier", "cleanup", "all_reduce_mean"]


def init_distributed(device: str = "auto") -> Tuple[int, int, torch.device]:
    """Initialise the process group when ``WORLD_SIZE > 1`` (env:// from torchrun).

    Returns ``(rank, world_size, device)``; on CUDA every rank uses ``cuda:LOCAL_RANK``.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
    if use_cuda:
        dev = torch.device(f"cuda:{local}" if ws > 1 or device in ("auto", "cuda") else device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if ws > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
        rank, ws = dist.get_rank(), dist.get_world_size()
    return rank, ws, dev


def world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
