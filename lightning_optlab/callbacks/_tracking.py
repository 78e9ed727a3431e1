"""What a measurement callback tracks: the optimizer's matrices with name, role, component,
param group and matrix view (from the ``param_names`` / ``roles`` / ``matrix_views`` the policy
builder puts in each group, else :func:`lightning_optlab.policy.describe_parameters`), the
gradients or momenta of a set of components, and the checks of the callbacks' common arguments.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..optim.matrix import DEFAULT_VIEW, MatrixView, group_views
from ..optim.sharded import gather_to_rank_zero, is_dtensor
from ..policy.roles import describe_parameters

# The research plan's components; bias and norm parameters belong to none of them.
COMPONENT_OF_ROLE = {"embedding": "input", "hidden": "hidden", "output": "output"}


COMPONENTS = ("input", "hidden", "output")


@dataclass(frozen=True)
class TrackedParam:
    """A parameter as the monitors see it."""

    name: str
    role: str
    component: str | None
    param: torch.Tensor
    group_index: int
    group_name: str
    algorithm: str | None
    view: MatrixView = DEFAULT_VIEW

    def matrices(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``t`` (the parameter, its gradient or a state tensor) as its matrix view: one
        ``(name, matrix)``, or one per block of a split packed projection (``name[k]``). A sharded
        ``t`` (FSDP2 DTensor) is gathered whole to rank zero, and gives nothing on the other ranks
        (every rank must call this for it)."""
        if is_dtensor(t):
            t = gather_to_rank_zero(t)
            if t is None:
                return []
        m = self.view.to_matrix(t)
        if self.view.blocks == 1:
            return [(self.name, m)]
        return [(f"{self.name}[{k}]", m[k]) for k in range(self.view.blocks)]


def any_sharded(tracked: Sequence[TrackedParam]) -> bool:
    """Whether some tracked parameter is an FSDP2 DTensor (every rank then takes part in a
    snapshot's gathers)."""
    return any(is_dtensor(tp.param) for tp in tracked)


def sanitize_tag(text: str) -> str:
    """A name usable as one TensorBoard tag component."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_") or "unnamed"


def group_name(group: dict, index: int) -> str:
    return sanitize_tag(group.get("name") or f"pg{index}")


def tracked_parameters(
    optimizer: torch.optim.Optimizer | None,
    model: torch.nn.Module,
    min_ndim: int = 2,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[TrackedParam]:
    """Parameters of ``optimizer`` (or of ``model`` without one) with at least ``min_ndim`` dims
    that are matrices (a (C, 1, 1) scale is not), each with its matrix view.

    Names, roles and views come from the group keys ``param_names`` / ``roles`` / ``matrix_views`` that
    :func:`~lightning_optlab.policy.build_param_groups` sets; groups without them (a plain
    ``torch.optim.AdamW``) get names from ``model.named_parameters()`` and roles from
    :func:`~lightning_optlab.policy.describe_parameters`. ``include`` / ``exclude`` are name globs.
    """
    infos = {id(i.param): i for i in describe_parameters(model)}
    inferred = {k: i.view.unsplit() for k, i in infos.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    entries: list[TrackedParam] = []
    if optimizer is not None:
        groups = optimizer.param_groups
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
    for gi, group in enumerate(groups):
        pnames = group.get("param_names")
        roles = group.get("roles")
        views = group_views(group, group["params"], inferred)
        for k, p in enumerate(group["params"]):
            view = views[k]
            if p.is_complex() or p.ndim < min_ndim or (min_ndim >= 2 and not view.is_matrix):
                continue
            info = infos.get(id(p))
            name = pnames[k] if pnames else (info.name if info else names.get(id(p), f"{gi}.{k}"))
            role = roles[k] if roles else (info.role if info else ("hidden" if p.ndim >= 2 else "bias"))
            if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
                continue
            if exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            entries.append(
                TrackedParam(name, role, COMPONENT_OF_ROLE.get(role), p, gi, group_name(group, gi),
                             group.get("algorithm"), view)
            )
    return entries


def first_optimizer(trainer: Any) -> torch.optim.Optimizer | None:
    opts = getattr(trainer, "optimizers", None) or []
    return opts[0] if opts else None


def check_every_n_steps(owner: str, value: Any, arg: str = "every_n_steps") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}({arg}={value!r}): give a positive integer number of optimizer steps, e.g. {arg}=50")
    return value


MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def gradient_matrices(
    tracked: Sequence[TrackedParam],
    optimizer: torch.optim.Optimizer | None,
    components: Sequence[str],
    source: str = "gradient",
) -> tuple[dict[str, torch.Tensor], dict[str, TrackedParam], int]:
    """``{name: matrix}`` of the tracked parameters of ``components`` (gradient or momentum).

    ``source``: ``gradient`` (``p.grad``), ``momentum`` (the rule's buffer ``momentum_buffer`` or
    ``exp_avg`` as the previous step left it; parameters without one are skipped) or ``auto``
    (momentum where the rule keeps one, else the gradient). Returns the matrices, their
    TrackedParam, and how many were skipped (no gradient / no buffer).
    """
    out, who, skipped = {}, {}, 0
    state = getattr(optimizer, "state", {}) if optimizer is not None else {}
    for tp in tracked:
        if tp.component not in components:
            continue
        t = None
        if source in ("momentum", "auto"):
            st = state.get(tp.param, {}) if hasattr(state, "get") else {}
            t = next((st[k] for k in MOMENTUM_KEYS if isinstance(st.get(k), torch.Tensor)), None)
        if t is None and source in ("gradient", "auto"):
            t = tp.param.grad
        if t is None:
            skipped += 1
            continue
        for name, m in tp.matrices(t):
            out[name] = m
            who[name] = tp
    return out, who, skipped


def by_shape(tensors: dict[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """Group same-shaped matrices into stacks: ``[(names, stack (k, m, n))]``."""
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault((tuple(t.shape), t.dtype), []).append(name)
    return [(names, torch.stack([tensors[n] for n in names])) for names in groups.values()]


VALID_SOURCES = ("gradient", "momentum", "auto")


def check_components(owner: str, components: Sequence[str]) -> tuple[str, ...]:
    components = (components,) if isinstance(components, str) else tuple(components)
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ValueError(f"{owner}(components={list(components)!r}): components are {list(COMPONENTS)}; pick from those")
    return components
