"""Fit a tiny GPT with a policy, ManifoldRetraction and SpectralMonitor under Lightning's
ModelParallelStrategy (FSDP2: ``fully_shard`` in ``configure_model``) on CPU with gloo, and save
the whole parameters and the monitor's last figures from rank zero.

``fit``: 4 steps from scratch (WORLD 1: one process, no strategy, no sharding), with a Lightning
distributed checkpoint after step 2 when WORLD > 1. ``resume``: the same fit on WORLD ranks
continued from that checkpoint (``fit(ckpt_path=...)``), on one rank a one-process
``ModelParallelStrategy``.

Lightning's launcher re-runs this script once per extra rank, so it must be a script.
Usage: python fsdp2_fit.py OUT_DIR WORLD [fit|resume]
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.ddp_check import RankSampler  # each step's batches over the ranks: one process's batch
from lightning_optlab.callbacks import ManifoldRetraction, SpectralMonitor
from lightning_optlab.models import GPT

POLICY = {"rules": [
    {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02, "constraint": "stiefel"},
    {"match": {"role": "embedding"}, "optimizer": "adamw", "lr": 3e-3, "constraint": "sphere"},
    {"match": {}, "optimizer": "adamw", "lr": 3e-3},
]}
# a warm-up then cosine schedule over the whole fit: a resume that lost its place in it shows
SCHEDULE = {"name": "cosine", "warmup_steps": 1}
STEPS, PER_RANK, EPOCH_STEPS = 4, 4, 2  # the checkpoint after step 2 ends an epoch
CHECKPOINT = "epoch=0-step=2.ckpt"


def main(out: Path, world: int, mode: str) -> None:
    pl.seed_everything(0)
    model = GPT(size="tiny", policy=POLICY, scheduler=SCHEDULE)
    T = model.context_length
    data = torch.randint(0, 256, (EPOCH_STEPS * PER_RANK * 2, T + 1), generator=torch.Generator().manual_seed(1))
    # the same samples each step: two ranks of PER_RANK, or one process of 2 * PER_RANK
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=PER_RANK * 2 // world,
                        sampler=RankSampler(len(data)))
    monitor = SpectralMonitor(every_n_steps=STEPS - 1, wait_if_busy=True, histograms=False)
    callbacks = [ManifoldRetraction(), monitor]
    strategy = "auto"
    if world > 1 or mode == "resume":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    checkpoint = mode == "fit" and world > 1
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1))
    # a logger, so the retraction measures its distances on logging steps (collectives on every rank)
    logger = CSVLogger(out, name=f"logs_{mode}_{world}")
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, limit_val_batches=0,
        use_distributed_sampler=False, logger=logger, log_every_n_steps=1, enable_checkpointing=checkpoint,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=out / CHECKPOINT if mode == "resume" else None)
    whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    if trainer.global_rank == 0:
        torch.save({"params": whole, "spectral": monitor.last_metrics, "spectral_step": monitor.last_step,
                    "world": trainer.world_size, "sharded": type(next(model.parameters())).__name__,
                    "steps": trainer.global_step, "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
                    "manifold": {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("manifold/")}},
                   out / f"{mode}_world{world}.pt")
    if torch.distributed.is_initialized():
        # gloo's threads outliving the interpreter's teardown aborted one resume at exit
        # ("terminate called without an active exception") after its fit had finished
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "fit")
