"""Multi-GPU check (issue 8): the policy optimizer under Lightning DDP on N GPUs (NCCL), Muon's
Newton-Schulz work split across ranks; every rank saves its parameters, rank 0 compares them.

    PYTHONPATH=. python benchmarks/ddp_check.py --out $OUT/ddp --devices 2
    PYTHONPATH=. python benchmarks/ddp_check.py --out /tmp/ddp --accelerator cpu --size tiny   # gloo

Run with gloo on CPU here; no 2-GPU machine was lent on 2026-11-24, so the NCCL run is still owed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from lightning_optlab.data import TextDataModule
from lightning_optlab.models import GPT
from lightning_optlab.optim import muon as muon_module

POLICY = {"rules": [
    {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
    {"match": {}, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--size", default="small")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split_calls: list[int] = []
    original = muon_module.newton_schulz_split

    def counting(stack, world, **kw):
        split_calls.append(int(stack.shape[0]))
        return original(stack, world, **kw)

    muon_module.newton_schulz_split = counting
    pl.seed_everything(0)
    model = GPT(size=args.size, policy=POLICY)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy="ddp",
        precision="bf16-mixed" if args.accelerator == "gpu" else "32-true",
        max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    data = TextDataModule(batch_size=8, max_files=200, cache_dir=str(out / "cache"))
    trainer.fit(model, datamodule=data)
    rank = trainer.global_rank
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": trainer.world_size, "steps": trainer.global_step,
        "backend": torch.distributed.get_backend(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "split_ns_calls": len(split_calls), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }))
    trainer.strategy.barrier()
    if rank == 0:
        ref = torch.load(out / "rank0.pt")
        same = all(
            torch.equal(ref[k], torch.load(out / f"rank{r}.pt")[k]) for r in range(1, trainer.world_size) for k in ref
        )
        infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(trainer.world_size)]
        summary = {"identical_parameters_on_all_ranks": same, "ranks": infos}
        (out / "ddp_check.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
