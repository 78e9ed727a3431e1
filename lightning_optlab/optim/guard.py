"""The NaN/Inf guard: one policy for every rule of the package.

``ModularOptimizer.step`` (the standalone classes are ModularOptimizers with one rule) launches
one fused check of all gradients (:func:`nonfinite_flag`) before any rule runs; a NaN/Inf
gradient raises ``FloatingPointError`` naming the parameters (:func:`require_finite_grads`)
before any weight or state is touched. Complex gradients are checked as their real views.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .sharded import is_dtensor


def _as_real(grads: Sequence[Tensor]) -> list[Tensor]:
    """Complex gradients as (..., 2) real views: the NaN/Inf kernels are defined on reals. A
    sharded gradient (FSDP2's DTensor) is read as this rank's shard."""
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    return [torch.view_as_real(g) if g.is_complex() else g for g in local]


def _agree_across_ranks(flag: Tensor, grads: Sequence[Tensor], op: str) -> Tensor:
    """With sharded gradients each rank sees its shards only: reduce the flags over the process
    group so that every rank refuses the same step (a NaN in one shard changes no weight
    anywhere) and names the same parameters."""
    if not any(is_dtensor(g) for g in grads):
        return flag
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    reduced = flag.to(torch.float32).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return reduced.to(flag.dtype)


def finite_flags(grads: Sequence[Tensor]) -> Tensor:
    """One bool per tensor: all entries finite (used to name the offending parameters).

    The inf-norm is NaN/Inf exactly when an entry is, and, unlike a sum of squares, never
    overflows on large finite gradients.
    """
    norms = torch._foreach_norm(_as_real(grads), float("inf"))
    device = norms[0].device
    # fp64 stays fp64 (a finite 1e300 must not overflow); .to is a no-op for fp32 on one device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return _agree_across_ranks(torch.stack([n.to(device=device, dtype=dtype) for n in norms]).isfinite(), grads, "min")


def nonfinite_flag(grads: Sequence[Tensor]) -> Tensor:
    """A device tensor that is nonzero when some gradient entry is NaN/Inf: GradScaler's fused
    non-finite check (one kernel per device and dtype, multiplying by exactly 1.0). No host sync:
    ``bool()`` of it is the one sync of the step (``ModularOptimizer.step``).

    Why not a read-only max-norm (:func:`finite_flags`, which would skip the write-back): its
    per-tensor results must be stacked on the host, which measured several times slower
    (``docs/benchmarks.md``, bench_ops).
    """
    by_key: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in _as_real(grads):
        by_key[(g.device, g.dtype)].append(g)
    flags = []
    for (device, dtype), tensors in by_key.items():
        if device.type == "cuda" and dtype == torch.bfloat16:
            # GradScaler's CUDA kernel has no bf16 version: the max-norm way for these
            found = finite_flags(tensors).all().logical_not().float().reshape(1)
        else:
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
        flags.append(found if found.device == grads[0].device else found.to(grads[0].device))
    flag = flags[0] if len(flags) == 1 else torch.stack(flags).any()
    return _agree_across_ranks(flag, grads, "max")


def require_finite_grads(
    group: Mapping, params: Sequence[Tensor], grads: Sequence[Tensor], rule: str
) -> None:
    """Raise ``FloatingPointError`` naming the parameters whose gradient has a NaN or Inf.

    ``ModularOptimizer.step`` (and so every standalone class) checks all groups' gradients in one
    reduction and one host sync before any rule runs, so a refused step changes no weight and no
    state of any group; this function is what builds the error once a bad gradient is found.
    """
    if not grads:
        return
    flags = finite_flags(grads)
    if bool(flags.all()):
        return
    bad = [i for i, ok in enumerate(flags.tolist()) if not ok]
    all_params = list(group.get("params", []))
    names = group.get("param_names")
    label = group.get("name")
    described = []
    for i in bad[:10]:
        p = params[i]
        index = next((k for k, q in enumerate(all_params) if q is p), None)
        if names is not None and index is not None:
            who = f"{names[index]!r}"
        else:
            who = f"parameter #{index if index is not None else i}"
        kinds = []
        if torch.isnan(grads[i]).any():
            kinds.append("NaN")
        if torch.isinf(grads[i]).any():
            kinds.append("Inf")
        described.append(f"{who} (shape {list(p.shape)}, {'/'.join(kinds)})")
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    where = f" in param group {label!r}" if label else ""
    raise FloatingPointError(
        f"optimizer {rule!r}: non-finite gradient{where} for {', '.join(described)}{more}. "
        "The step was refused and no weight was changed. Usual causes: a learning rate that "
        "diverged the loss, fp16 without a GradScaler, a log/div of zero in the loss. Lower the "
        "lr, clip gradients (Trainer(gradient_clip_val=...)), or use bf16."
    )
