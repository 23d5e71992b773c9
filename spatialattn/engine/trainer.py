"""The training loop behind ``spatialattn train`` (single process or DDP under torchrun).

:func:`train` takes a resolved config (:mod:`spatialattn.engine.config`) and:

1. initialises ``torch.distributed`` from torchrun's env when ``WORLD_SIZE > 1`` (gloo on CPU,
   NCCL on CUDA) and seeds torch / numpy / random;
2. builds the train / val data (letterbox, flip, colour jitter seeded per ``(seed, epoch, index)``),
   a ``DistributedSampler(shuffle=True, seed)`` with ``set_epoch`` (also for one process, so the
   order of every epoch is a function of ``(seed, epoch)`` only), the model
   (:func:`spatialattn.engine.models.build_model`), AdamW or SGD (no weight decay on norms and
   biases), a per-iteration warm-up + cosine schedule, and AMP (CUDA only);
3. trains, writing ``last.pt`` every epoch and ``best.pt`` when AP improves (atomically); with
   ``resume`` it restores every state and continues with the next epoch exactly as an
   uninterrupted run would;
4. evaluates on the val split (COCO AP table + ``metrics.json``) and saves attention maps of a few
   val images (``attention/``).

Rank 0 alone writes files and shows the progress bar.
"""
from __future__ import annotations

import os
import random
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data import DatasetSubset, detection_collate
from . import distributed as D
from .checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import dump_config
from .evaluator import (evaluate, format_metrics, make_eval_loader, open_dataset, save_attention_maps,
                        save_metrics_json)
from .models import build_model, resolve_spec
from .schedule import warmup_cosine

__all__ = ["train", "model_spec_from_config", "run_dir_for", "seed_everything", "build_optimizer"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def model_spec_from_config(cfg: Mapping[str, Any], classes: List[str]) -> Dict[str, Any]:
    return resolve_spec({
        "model": cfg["model"], "cfg": cfg["cfg"], "attention": cfg["attention"],
        "roi_attention": cfg["roi_attention"], "backbone_attention": cfg["backbone_attention"],
        "num_classes": len(classes), "classes": list(classes), "image_size": cfg["image_size"],
        "conf_thresh": cfg["conf_thresh"], "nms_thresh": cfg["nms_thresh"],
        "max_detections": cfg["max_detections"],
    })


def run_dir_for(cfg: Mapping[str, Any]) -> str:
    """``out/name``; without a name the first free ``out/train``, ``out/train2``, ..."""
    if cfg.get("name"):
        return os.path.join(cfg["out"], cfg["name"])
    k = 1
    while True:
        d = os.path.join(cfg["out"], "train" if k == 1 else f"train{k}")
        if not os.path.exists(d):
            return d
        k += 1


def build_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["momentum"], 0.999))


def _amp_dtype(cfg: Mapping[str, Any], device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda" or cfg["amp"] == "off":
        return None
    if cfg["amp"] == "fp16":
        return torch.float16
    if cfg["amp"] == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _log(msg: str) -> None:
    if D.is_main():
        print(msg, flush=True)


def _image_count(ds: Any, key: str) -> str:
    """``"N"``, or ``"N of M (key)"`` where ``cfg[key]`` kept the first N of a file dataset's M."""
    while not isinstance(ds, DatasetSubset) and hasattr(ds, "__dict__") and "dataset" in vars(ds):
        ds = vars(ds)["dataset"]
    if isinstance(ds, DatasetSubset):
        return f"{len(ds)} of {len(ds.dataset)} ({key})"
    return str(len(ds))


def train(cfg: Mapping[str, Any], resume: Optional[str] = None, run_dir: Optional[str] = None,
          stop_epoch: Optional[int] = None, step_callback=None) -> Dict[str, Any]:
    """Train per ``cfg``; returns ``{"run_dir", "metrics", "best_ap", "losses", "epochs_done"}``.

    Args:
        cfg: resolved config (see :data:`spatialattn.engine.config.DEFAULTS`).
        resume: a ``last.pt`` to continue from (its run folder is reused).
        run_dir: output folder (default from ``cfg["out"]`` / ``cfg["name"]``).
        stop_epoch: return after this many epochs (counted from 0, checkpoint written), as if
            interrupted there; the schedule still spans ``cfg["epochs"]`` (tests of ``resume``).
        step_callback: ``f(global_step, loss_dict)`` after every step (tests, logging).
    """
    cfg = dict(cfg)
    t_start = time.time()
    rank, ws, device = D.init_distributed(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        run_dir = run_dir or os.path.dirname(os.path.abspath(resume))
    run_dir = run_dir or run_dir_for(cfg)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    seed_everything(cfg["seed"] + rank)

    train_ds = open_dataset(cfg, "train_split", "train_images", train=True)
    val_ds = open_dataset(cfg, "val_split", "val_images", train=False,
                          cache=bool(cfg["eval_interval"]))  # read once at the end otherwise
    classes = list(train_ds.classes)
    spec = ckpt["spec"] if ckpt is not None else model_spec_from_config(cfg, classes)
    if ckpt is not None and list(spec.get("classes", classes)) != classes:
        raise ValueError(f"--resume {resume}: the checkpoint's classes {spec.get('classes')} differ from "
                         f"the dataset's {classes}")
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank
    model = build_model(spec).to(device)
    model.train()

    sampler = DistributedSampler(train_ds, num_replicas=ws, rank=rank, shuffle=True, seed=cfg["seed"],
                                 drop_last=False)
    per_rank_batch = max(1, cfg["batch_size"] // ws)
    loader = DataLoader(train_ds, batch_size=per_rank_batch, sampler=sampler, num_workers=cfg["workers"],
                        collate_fn=detection_collate, drop_last=len(sampler) >= per_rank_batch * 2,
                        persistent_workers=False)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg["epochs"]

    optimizer = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, cfg["warmup_iters"], cfg["warmup_start"], cfg["min_lr"]))
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_ap, history = 0, -1.0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        best_ap = float(ckpt.get("best_ap", -1.0))
        history = list(ckpt.get("history", []))
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) and rank < len(ckpt["rng"])
                      else (ckpt["rng"][0] if isinstance(ckpt["rng"], list) else ckpt["rng"]))
        _log(f"resumed from {resume}: epoch {start_epoch}/{cfg['epochs']}, best AP {best_ap:.4f}")

    ddp_model = model
    if ws > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"run {run_dir}: {cfg['model']} attention={cfg['attention']} ({n_params / 1e6:.2f} M params), "
         f"{_image_count(train_ds, 'train_images')} train / {_image_count(val_ds, 'val_images')} val images, "
         f"{cfg['epochs']} epochs x {steps_per_epoch} steps, "
         f"batch {per_rank_batch} x {ws} rank(s), device {device}")

    losses: List[float] = []
    metrics: Optional[Dict[str, Any]] = None
    stopped_early = False
    eval_loader = make_eval_loader(val_ds, per_rank_batch, cfg["workers"])
    for epoch in range(start_epoch, cfg["epochs"]):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        model.train()
        it = loader
        bar = None
        if cfg.get("progress", True) and rank == 0:
            from tqdm import tqdm

            bar = it = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", dynamic_ncols=True, leave=True,
                                 mininterval=0.1 if sys.stderr.isatty() else 30.0)
        run_loss, n_loss = 0.0, 0
        for images, targets in it:
            images = images.to(device, non_blocking=True) if isinstance(images, torch.Tensor) else \
                [im.to(device) for im in images]
            targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                       for t in targets]
            if amp_dtype is not None:
                with torch.autocast(device.type, dtype=amp_dtype):
                    out = ddp_model(images, targets)
            else:
                out = ddp_model(images, targets)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {sched.last_epoch}; "
                                         "lower lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.get("grad_clip"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            sched.step()
            lv = float(loss.detach())
            losses.append(lv)
            run_loss, n_loss = run_loss + lv, n_loss + 1
            if step_callback is not None:
                step_callback(sched.last_epoch, {k: float(v.detach()) for k, v in out.items()})
            if bar is not None:
                bar.set_postfix(loss=f"{run_loss / n_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if bar is not None:
            bar.close()
        if ws > 1:  # DDP keeps rank 0's buffers in use; make every rank hold them (BN statistics)
            for buf in model.buffers():
                torch.distributed.broadcast(buf, src=0)
        last = epoch + 1 == cfg["epochs"]
        do_eval = last or (cfg["eval_interval"] and (epoch + 1) % cfg["eval_interval"] == 0)
        entry = {"epoch": epoch + 1, "loss": run_loss / max(1, n_loss)}
        if do_eval:
            metrics = evaluate(model, eval_loader, val_ds, device, progress=cfg.get("progress", True),
                               autocast_dtype=amp_dtype)
            entry.update({k: float(metrics[k]) for k in ("AP", "AP50", "AP75")})
            _log(f"epoch {epoch + 1}: loss {entry['loss']:.4f}  AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  "
                 f"AP75 {metrics['AP75']:.4f}")
        else:
            _log(f"epoch {epoch + 1}: loss {entry['loss']:.4f}")
        history.append(entry)
        # every rank's RNG state (they differ: seed + rank); gathered so rank 0 can save them all
        states = [rng_state()]
        if ws > 1:
            gathered: List[Any] = [None] * ws
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        improved = do_eval and metrics is not None and metrics["AP"] > best_ap
        if improved:
            best_ap = float(metrics["AP"])
        if rank == 0:
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "best_ap": best_ap, "history": history, "rng": states,
                "spec": spec, "config": dict(cfg), "world_size": ws,
                "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
                if do_eval else {},
            }
            atomic_save(state, os.path.join(run_dir, "last.pt"))
            if improved:
                atomic_save(state, os.path.join(run_dir, "best.pt"))
        D.barrier()
        if stop_epoch is not None and epoch + 1 >= stop_epoch and not last:
            stopped_early = True
            break

    result: Dict[str, Any] = {"run_dir": run_dir, "metrics": metrics, "best_ap": best_ap, "losses": losses,
                              "history": history, "model": model}
    if stopped_early or metrics is None:
        return result
    if rank == 0:
        print(format_metrics(metrics, title=f"COCO bbox, {cfg['val_split']} split"), flush=True)
        save_metrics_json(metrics, os.path.join(run_dir, "metrics.json"))
        k = min(int(cfg.get("attention_images", 0)), len(val_ds))
        if k:
            samples = [val_ds[i] for i in range(k)]
            pngs = save_attention_maps(model, [s[0] for s in samples],
                                       [f"val_{int(s[1]['image_id']):06d}" for s in samples],
                                       os.path.join(run_dir, "attention"), device)
            if pngs:
                print(f"attention maps: {os.path.join(run_dir, 'attention')} ({len(pngs)} images)")
            else:
                print("attention maps: the model has no attention layer")
        print(f"done in {time.time() - t_start:.0f} s; weights: {os.path.join(run_dir, 'best.pt')}", flush=True)
    D.barrier()
    return result
