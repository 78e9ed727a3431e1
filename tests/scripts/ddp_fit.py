"""Fit the MNIST MLP with a policy under Lightning DDP on CPU (gloo), save each rank's parameters.

Lightning's DDP launcher re-runs this script once per extra rank, so it must be a script.
Usage: python ddp_fit.py OUT_DIR [policy_json]
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_optlab.data import MNISTDataModule
from lightning_optlab.models import MLPClassifier

DEFAULT_POLICY = {
    "rules": [
        {"match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
        {"match": {}, "optimizer": "adamw", "lr": 3e-3},
    ]
}


def main(out: Path, policy: dict) -> None:
    pl.seed_everything(0)
    model = MLPClassifier(policy=policy, hidden_sizes=(32, 32))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=8,
        limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    dm = MNISTDataModule(data_dir=str(out / "nodata"), download=False, batch_size=32)
    trainer.fit(model, datamodule=dm)
    assert trainer.strategy.root_device.type == "cpu"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "backend": backend, "world": trainer.world_size, "steps": trainer.global_step},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # gloo's threads must not outlive the interpreter (abort at exit)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    main(out_dir, json.loads(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_POLICY)
