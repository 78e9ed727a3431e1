"""Multi-GPU check (issues 20, 21): the policy optimizer through Lightning on N devices, with DDP
(whole parameters on every rank, Muon's Newton-Schulz work split across ranks) or FSDP2
(``ModelParallelStrategy``, the GPT's blocks and root ``fully_shard``-ed in ``configure_model``).

Per run: tokens/s (end to end, from step ``--skip`` on), optimizer ms per step (the optimizer step
and its post-hooks, e.g. the Stiefel retraction, synchronised), peak memory; DDP: whether the
parameters are bitwise identical on every rank; every run: rank 0 saves the whole parameters, and
``--compare DIR`` reports their largest difference from another run's (e.g. one device).

    PYTHONPATH=. python benchmarks/ddp_check.py --out $OUT/ddp --devices 2
    PYTHONPATH=. python benchmarks/ddp_check.py --out $OUT/fsdp2 --devices 2 --strategy fsdp2 --stiefel --monitor \
        --compare $OUT/one
    PYTHONPATH=. python benchmarks/ddp_check.py --out $OUT/one --devices 1 --batch-size 16 --stiefel   # reference
    PYTHONPATH=. python benchmarks/ddp_check.py --out /tmp/ddp --accelerator cpu --size tiny --steps 4   # gloo

Only gloo on CPU has run it so far (see docs/benchmarks.md for what ran where).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_optlab.models import GPT
from lightning_optlab.optim import muon as muon_module

BATCH = {"tiny": 4, "small": 8, "42m": 16, "150m": 8, "680m": 4, "1.2b": 2}  # sequences per rank


def policy(stiefel: bool) -> dict:
    hidden = {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02}
    if stiefel:
        hidden["constraint"] = "stiefel"
    return {"rules": [hidden, {"match": {}, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0}]}


class RankSampler(torch.utils.data.Sampler):
    """Samples rank, rank + world, ... (read when iterated, once the process group is up): each
    step's batches over the ranks are one consecutive block, the batch of a one-device run with
    ``--batch-size`` times the world size, so ``--compare`` compares the same training."""

    def __init__(self, n: int):
        self.n = n

    @staticmethod
    def _split() -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._split()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._split()
        return len(range(rank, self.n, world))


class Timing(pl.Callback):
    """Synchronised wall time of each batch and of its optimizer step (with the step's post-hooks)."""

    def __init__(self, device: torch.device):
        self.device, self.batch_ms, self.optimizer_ms = device, [], []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_batch_start(self, *args, **kwargs):
        self._t0 = self._sync()

    def on_before_optimizer_step(self, *args, **kwargs):
        self._t1 = self._sync()

    def on_train_batch_end(self, *args, **kwargs):
        t = self._sync()
        self.batch_ms.append((t - self._t0) * 1e3)
        self.optimizer_ms.append((t - self._t1) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="steps left out of tokens/s and the medians")
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--size", default="small")
    p.add_argument("--stiefel", action="store_true", help="Stiefel constraint on the hidden matrices")
    p.add_argument("--monitor", action="store_true", help="add SpectralMonitor (every 10 steps)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank (default by size: tiny 4 ... 1.2b 2)")
    p.add_argument("--compare", default=None, help="another run's --out: largest parameter difference to it "
                   "(same training when that run had --batch-size times this world size on one device)")
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
    model = GPT(size=args.size, policy=policy(args.stiefel))
    B, T = args.batch_size or BATCH.get(args.size, 4), model.context_length
    data = torch.randint(0, 256, (args.steps * B * args.devices, T + 1), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=B, sampler=RankSampler(len(data)))
    strategy = "ddp" if args.strategy == "ddp" else "auto"
    if args.strategy == "fsdp2" and args.devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    timing = Timing(device)
    callbacks: list = [timing]
    if args.monitor:
        from lightning_optlab.callbacks import SpectralMonitor

        callbacks.insert(0, SpectralMonitor(every_n_steps=10))
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy,
        precision="bf16-mixed" if args.accelerator == "gpu" else "32-true",
        max_steps=args.steps, limit_val_batches=0, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    wall = time.perf_counter() - start
    rank, world = trainer.global_rank, trainer.world_size
    whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in model.named_parameters()}
    torch.save(whole, out / f"rank{rank}.pt")
    kept = timing.batch_ms[args.skip:] or timing.batch_ms
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "steps": trainer.global_step, "strategy": args.strategy,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else "none",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens_per_s": B * T * world * len(kept) / (sum(kept) / 1e3),
        "batch_ms_median": sorted(kept)[len(kept) // 2],
        "optimizer_ms_median": sorted(timing.optimizer_ms[args.skip:] or timing.optimizer_ms)[len(kept) // 2],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "fit_wall_s": wall, "split_ns_calls": len(split_calls), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }))
    trainer.strategy.barrier()
    if rank != 0:
        return
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    ref = whole
    summary = {"strategy": args.strategy, "world": world, "size": args.size, "stiefel": args.stiefel,
               "monitor": args.monitor, "ranks": infos,
               "identical_parameters_on_all_ranks": all(
                   torch.equal(ref[k], torch.load(out / f"rank{r}.pt")[k]) for r in range(1, world) for k in ref)}
    if args.compare:
        other = torch.load(Path(args.compare) / "rank0.pt")
        summary["max_abs_difference_to"] = {"run": args.compare, "value": max(
            float((ref[k].float() - other[k].float()).abs().max()) for k in ref)}
    (out / "ddp_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
