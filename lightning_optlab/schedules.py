"""Learning-rate schedule specs (YAML-friendly) -> ``torch.optim.lr_scheduler.LambdaLR``.

A spec is a dict::

    {name: cosine, warmup_steps: 100, total_steps: null, min_lr_ratio: 0.1}

``name`` is ``constant``, ``linear`` or ``cosine`` (decay after a linear warm-up);
``total_steps`` defaults to the trainer's estimated stepping batches. The schedule multiplies
every group's own lr, so per-rule learning rates keep their ratios.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

SCHEDULES = ("constant", "linear", "cosine")
_KEYS = {"name", "warmup_steps", "total_steps", "min_lr_ratio", "interval"}


def schedule_factor(
    name: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float
) -> Callable[[int], float]:
    """The multiplier of the lr at each optimizer step."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant" or not total_steps:
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if name == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return factor


def validate_schedule(spec: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"scheduler must be a dict like {{name: cosine, warmup_steps: 100}}, got {spec!r}")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ValueError(f"scheduler: unknown key(s) {unknown}; accepted: {sorted(_KEYS)}")
    out = {"name": "cosine", "warmup_steps": 0, "total_steps": None, "min_lr_ratio": 0.0,
           "interval": "step", **spec}
    if out["name"] not in SCHEDULES:
        raise ValueError(f"scheduler: unknown name {out['name']!r}; use one of {', '.join(SCHEDULES)}")
    if not isinstance(out["warmup_steps"], int) or out["warmup_steps"] < 0:
        raise ValueError(f"scheduler: warmup_steps must be an int >= 0, got {out['warmup_steps']!r}")
    if out["total_steps"] is not None and (not isinstance(out["total_steps"], int) or out["total_steps"] < 1):
        raise ValueError(f"scheduler: total_steps must be a positive int or null, got {out['total_steps']!r}")
    if not 0.0 <= float(out["min_lr_ratio"]) <= 1.0:
        raise ValueError(f"scheduler: min_lr_ratio must be in [0, 1], got {out['min_lr_ratio']!r}")
    if out["interval"] not in ("step", "epoch"):
        raise ValueError(f"scheduler: interval must be 'step' or 'epoch', got {out['interval']!r}")
    return out


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: Mapping[str, Any], total_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    spec = validate_schedule(spec)
    total = spec["total_steps"] or total_steps
    factor = schedule_factor(spec["name"], spec["warmup_steps"], total, float(spec["min_lr_ratio"]))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
