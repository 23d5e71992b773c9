"""Run by test_trainer.py under torchrun: train a tiny model with DDP, save each rank's weights."""
import os
import sys

import torch

from spatialattn.engine.config import load_config
from spatialattn.engine.trainer import train

out = sys.argv[1]
cfg = load_config(None, {"epochs": 1, "batch_size": 4, "train_images": 8, "val_images": 6, "image_size": 64,
                         "attention_images": 0, "progress": False, "out": out, "name": "ddp", "warmup_iters": 1,
                         "threads": 1})
res = train(cfg)
rank = int(os.environ["RANK"])
torch.save({"state": res["model"].state_dict(), "metrics": {k: float(res["metrics"][k]) for k in ("AP", "AP50", "AP75")},
            "world": int(os.environ["WORLD_SIZE"])}, os.path.join(out, f"rank{rank}.pt"))
torch.distributed.destroy_process_group()
