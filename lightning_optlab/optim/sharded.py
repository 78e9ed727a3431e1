"""Sharded parameters: which rules step them, and the refusals that keep the others from
stepping shards as if they were whole tensors.

FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) stores each parameter, its
gradient and its optimizer state as a ``DTensor`` whose local part is this rank's rows. An
element-wise rule (``UpdateRule.sharding == "local"``: sgd, adam, adamw, rmsprop, adamw_spam) steps
those shards exactly as it steps whole tensors, through DTensor's own operators; the NaN/Inf
guard reads each rank's shards and agrees across ranks (:mod:`.guard`). Muon (``"gather"``)
and the stateless Sinkhorn rules work on whole matrices, each computed by one *owner* rank: the
matrices are assigned to ranks by their cost (largest first, to the least loaded rank), one
all-to-all brings each owner the shards of its matrices (:func:`gather_to_owners`), the owner
runs the plain step on them, and one all-to-all sends every rank its rows of the results
(:func:`scatter_from_owners`) -- each rank receives only what it owns, not the whole model, and
does 1/world of the work (microsoft/dion's layout); the Stiefel retraction's sharded buckets
use the same owners (``manifolds/plan.py``). SPARKLES (whole-tensor statistics, a stall
test on the whole gradient, one noise stream per step laid out over the group) runs its plain step
on gathered whole tensors and state on every rank (:func:`on_whole_tensors`), and keeps its
shards. Every rule refuses FSDP1's flattened ``FlatParameter``, where a parameter is not even a
tensor of its own shape.
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
    chunk = _chunk(n, world)
    padded = _pad_rows(t.to_local(), chunk, dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0, group=group)
    if parts is None:
        return None
    return torch.cat([part.narrow(dim, 0, _held(n, chunk, r)) for r, part in enumerate(parts)], dim)


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, sharded as the DTensor ``like`` (a view, no communication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def row_sharded_group(like: torch.Tensor):
    """The process group of FSDP2's layout (``Shard(0)`` on a 1-D mesh), else None."""
    from torch.distributed.tensor import Shard

    placements = like.placements
    if like.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) \
            or placements[0].dim != 0 or like.ndim == 0:
        return None
    return like.device_mesh.get_group()


def assign_owners(likes: Sequence[torch.Tensor], costs: Sequence[float]) -> list[int] | None:
    """The rank that computes each tensor: largest cost first, to the least loaded rank
    (deterministic, the same on every rank). None where the tensors are not all row-sharded
    over one 1-D mesh (then every rank computes every tensor, from an all-gather)."""
    import torch.distributed as dist

    groups = {row_sharded_group(t) for t in likes} if likes else {None}
    if len(groups) != 1 or None in groups:
        return None
    world = dist.get_world_size(next(iter(groups)))
    load, owners = [0.0] * world, [0] * len(likes)
    for i in sorted(range(len(likes)), key=lambda i: -float(costs[i])):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += float(costs[i])
    return owners


def _chunk(n: int, world: int) -> int:
    """Rows per rank of FSDP2's split of ``n`` rows (torch.chunk's): ceil(n / world)."""
    return -(-n // world)


def _held(n: int, chunk: int, rank: int) -> int:
    """How many of its ``chunk`` rows ``rank`` holds: the last ranks' are short or empty."""
    return max(0, min(chunk, n - rank * chunk))


def _rows(like: torch.Tensor, world: int) -> tuple[int, int]:
    """(rows per chunk, elements per chunk) of FSDP2's split of ``like`` along dimension 0."""
    chunk = _chunk(like.shape[0], world)
    return chunk, chunk * (like.numel() // max(1, like.shape[0]))


def _pad_rows(local: torch.Tensor, chunk: int, dim: int = 0) -> torch.Tensor:
    """``local`` zero-padded to ``chunk`` along ``dim`` (every rank sends equal chunks)."""
    if local.shape[dim] == chunk:
        return local
    shape = list(local.shape)
    shape[dim] = chunk
    out = local.new_zeros(shape)
    out.narrow(dim, 0, local.shape[dim]).copy_(local)
    return out


def _padded(local: torch.Tensor, chunk: int) -> torch.Tensor:
    return _pad_rows(local, chunk).reshape(-1)


def _all_to_all(send: list[torch.Tensor], recv_sizes: list[int], group) -> list[torch.Tensor]:
    import torch.distributed as dist

    flat = torch.cat(send) if send else torch.empty(0)
    out = flat.new_empty(sum(recv_sizes))
    dist.all_to_all_single(out, flat, recv_sizes, [t.numel() for t in send], group=group)
    return list(out.split(recv_sizes))


def gather_to_owners(likes: Sequence[torch.Tensor], locals_: Sequence[torch.Tensor],
                     owners: list[int] | None) -> dict[int, torch.Tensor]:
    """``{i: whole tensor}`` for the tensors this rank owns, ``locals_[i]`` being this rank's
    shard of a tensor sharded as the DTensor ``likes[i]``: one all-to-all per dtype. With
    ``owners`` None, every tensor on every rank (one all-gather each)."""
    if owners is None:
        return {i: gather_full(t, like) for i, (t, like) in enumerate(zip(locals_, likes))}
    import torch.distributed as dist

    group = row_sharded_group(likes[0])
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    wholes: dict[int, torch.Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for t in locals_):
        idx = [i for i, t in enumerate(locals_) if t.dtype == dtype]
        mine = [i for i in idx if owners[i] == rank]
        send = [torch.cat([_padded(locals_[i], _rows(likes[i], world)[0]) for i in idx if owners[i] == r]
                          or [locals_[idx[0]].new_empty(0)]) for r in range(world)]
        size = sum(_rows(likes[i], world)[1] for i in mine)
        parts = _all_to_all(send, [size] * world, group)
        offset = 0
        for i in mine:
            chunk, n = _rows(likes[i], world)
            whole = torch.cat([part[offset : offset + n].view(chunk, *likes[i].shape[1:]) for part in parts])
            wholes[i] = whole[: likes[i].shape[0]]
            offset += n
    return wholes


def scatter_from_owners(likes: Sequence[torch.Tensor], wholes: dict[int, torch.Tensor],
                        owners: list[int] | None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each tensor's shard on this rank, from the whole tensors ``wholes`` its owners hold, in
    ``dtype`` (default: each parameter's): one all-to-all per dtype. With ``owners`` None every
    rank holds every whole tensor (no communication)."""
    if owners is None:
        return [local_part(wholes[i], like) for i, like in enumerate(likes)]
    import torch.distributed as dist

    group = row_sharded_group(likes[0])
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out: list[torch.Tensor] = [None] * len(likes)  # type: ignore[list-item]
    kinds = [dtype or like.dtype for like in likes]
    for kind in dict.fromkeys(kinds):
        idx = [i for i in range(len(likes)) if kinds[i] == kind]
        mine = [i for i in idx if owners[i] == rank]
        padded = {i: _padded(wholes[i].to(kind), _rows(likes[i], world)[0] * world) for i in mine}
        empty = torch.empty(0, dtype=kind, device=likes[idx[0]].to_local().device)
        send = [torch.cat([padded[i].view(world, -1)[r] for i in mine] or [empty]) for r in range(world)]
        parts = _all_to_all(send, [sum(_rows(likes[i], world)[1] for i in idx if owners[i] == r)
                                   for r in range(world)], group)
        offsets = [0] * world
        for i in idx:
            o, (chunk, n) = owners[i], _rows(likes[i], world)
            rows = _held(likes[i].shape[0], chunk, rank)
            out[i] = parts[o][offsets[o] : offsets[o] + n].view(chunk, *likes[i].shape[1:])[:rows]
            offsets[o] += n
    return out


def on_whole_tensors(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], body,
                     states: Sequence[dict] | None = None, costs: Sequence[float] | None = None) -> None:
    """A whole-tensor rule on FSDP2 shards, ``body(indices, params, grads)`` being its plain step
    on the whole tensors ``params[k], grads[k]`` of the group's tensors ``indices[k]``, in place
    on the parameters. Stateless rules whose tensors step independently run on owner ranks
    (:func:`assign_owners` by ``costs``, default the sizes; :func:`gather_to_owners`,
    :func:`scatter_from_owners`). With ``states`` (``body(indices, params, grads, states)``)
    every rank gathers the whole parameters, gradients and sharded state tensors, runs the step
    on all of them and keeps its own rows; state entries that are not sharded (step counts,
    scalars) are taken as the step left them."""
    if states is None:
        owners = assign_owners(params, costs if costs is not None else [p.numel() for p in params])
        whole = gather_to_owners(params, [p.to_local() for p in params], owners)
        whole_grads = gather_to_owners(params, [g.to_local() for g in grads], owners)
        mine = sorted(whole)
        if mine:
            body(mine, [whole[i] for i in mine], [whole_grads[i] for i in mine])
        for p, part in zip(params, scatter_from_owners(params, whole, owners)):
            p.to_local().copy_(part)
        return
    whole = [p.full_tensor() for p in params]
    whole_grads = [g.full_tensor() for g in grads]
    whole_states = [{k: v.full_tensor() if is_dtensor(v) else v for k, v in st.items()} for st in states]
    body(list(range(len(params))), whole, whole_grads, whole_states)
    for st, ws in zip(states, whole_states):
        for k, v in ws.items():
            if is_dtensor(st.get(k)):
                st[k].to_local().copy_(local_part(v, st[k]))
            else:
                st[k] = v
    for p, w in zip(params, whole):
        p.to_local().copy_(local_part(w, p))
