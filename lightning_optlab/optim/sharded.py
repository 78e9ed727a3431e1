"""Sharded parameters: which rules step them, and the refusals that keep the others from
stepping shards as if they were whole tensors.

FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) stores each parameter, its
gradient and its optimizer state as a ``DTensor`` whose local part is this rank's rows. An
element-wise rule (``UpdateRule.sharding == "local"``: sgd, adam, adamw, rmsprop, adamw_spam) steps
those shards exactly as it steps whole tensors, through DTensor's own operators; the NaN/Inf
guard reads each rank's shards and agrees across ranks (:mod:`.guard`). Muon (``"gather"``)
gathers each whole matrix's Newton-Schulz input (:func:`gather_full`), shares the iteration out
across ranks as under DDP, and applies each rank's rows of the result (:func:`local_part`); the
stateless Sinkhorn rules and SPARKLES (whole-tensor statistics, a stall test on the whole
gradient, one noise stream per step) run their plain step on gathered whole tensors, SPARKLES with
its gathered state (:func:`on_whole_tensors`), and keep their shards. Every rule refuses FSDP1's
flattened ``FlatParameter``, where a parameter is not even a tensor of its own shape.
"""

from __future__ import annotations

from typing import Sequence

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters), without importing
    torch.distributed where it is not used."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def is_flat_parameter(t: torch.Tensor) -> bool:
    """FSDP1's ``FlatParameter``: many parameters flattened into one 1-D buffer."""
    return bool(getattr(t, "_is_flat_param", False)) or type(t).__name__ == "FlatParameter"


def check_sharding(rule, params: Sequence[torch.Tensor], names: Sequence[str] | None, label: str) -> None:
    """Refuse, when the group is built, sharded parameters that ``rule`` cannot step correctly."""
    for i, p in enumerate(params):
        who = repr(names[i]) if names else f"parameter #{i}"
        if is_flat_parameter(p):
            raise ValueError(
                f"{label}: {who} is an FSDP1 FlatParameter (FSDPStrategy / FullyShardedDataParallel "
                "flattens parameters into one buffer, so no rule sees their shapes or roles). Use "
                "Lightning's ModelParallelStrategy with torch's fully_shard (FSDP2) in "
                "configure_model, or DDP."
            )
        if is_dtensor(p) and rule.sharding not in ("local", "gather"):
            takes = ", ".join(n for n in _shard_local_rules())
            raise ValueError(
                f"{label}: optimizer {rule.name!r} needs whole tensors (matrices or whole-tensor "
                f"statistics), but {who} is sharded (DTensor, FSDP2). Route sharded parameters to an "
                f"element-wise rule ({takes}), or train this group with DDP, where every rank "
                "holds whole matrices."
            )


def _shard_local_rules() -> list[str]:
    from .registry import available_rules, get_rule

    return [n for n in available_rules() if get_rule(n).sharding == "local"]


def gather_full(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``local`` is this rank's part, sharded as the DTensor ``like``
    (one all-gather)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def gather_to_rank_zero(t: torch.Tensor) -> torch.Tensor | None:
    """The whole tensor of the DTensor ``t`` on global rank 0 and None on the others: one gather
    of the shards to rank zero, not an all-gather, for FSDP2's layout (``Shard(dim)`` on a 1-D
    mesh that holds rank 0); other layouts through :meth:`DTensor.full_tensor` (an all-gather).
    Every rank of the mesh must call it."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh, placements = t.device_mesh, t.placements
    group = mesh.get_group() if mesh.ndim == 1 else None
    if group is None or len(placements) != 1 or not isinstance(placements[0], Shard) or dist.get_global_rank(group, 0) != 0:
        full = t.full_tensor()
        return full if dist.get_rank() == 0 else None
    dim, world, n = placements[0].dim, mesh.size(), t.shape[placements[0].dim]
    local = t.to_local()
    chunk = -(-n // world)  # torch.chunk's split, as FSDP2 shards: equal chunks, the last ranks short or empty
    shape = list(local.shape)
    shape[dim] = chunk
    padded = local.new_zeros(shape)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0, group=group)
    if parts is None:
        return None
    return torch.cat([part.narrow(dim, 0, max(0, min(chunk, n - r * chunk))) for r, part in enumerate(parts)], dim)


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, sharded as the DTensor ``like`` (a view, no communication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def on_whole_tensors(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], body,
                     states: Sequence[dict] | None = None) -> None:
    """A whole-tensor rule on FSDP2 shards: every rank gathers the whole parameters and gradients
    (and, with ``states``, the sharded tensors of each state), runs the rule's plain step on them
    -- ``body(params, grads)``, or ``body(params, grads, states)`` -- and keeps its own rows of
    the results; state entries that are not sharded (step counts, scalars) are taken as the step
    left them. One all-gather per tensor and the rule's work on every rank: correct, not yet
    shared out."""
    whole = [p.full_tensor() for p in params]
    whole_grads = [g.full_tensor() for g in grads]
    if states is None:
        body(whole, whole_grads)
    else:
        whole_states = [{k: v.full_tensor() if is_dtensor(v) else v for k, v in st.items()} for st in states]
        body(whole, whole_grads, whole_states)
        for st, ws in zip(states, whole_states):
            for k, v in ws.items():
                if is_dtensor(st.get(k)):
                    st[k].to_local().copy_(local_part(v, st[k]))
                else:
                    st[k] = v
    for p, w in zip(params, whole):
        p.to_local().copy_(local_part(w, p))
