"""Memory: the bytes an optimizer keeps per parameter group between steps (its state)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


def optimizer_state_bytes_by_group(optimizer: torch.optim.Optimizer) -> list[int]:
    """Bytes held by each param group's per-parameter state tensors, aligned with
    ``optimizer.param_groups`` (each storage counted once, in the first group holding it)."""
    seen: set[tuple] = set()

    def visit(value) -> int:
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr())
            if key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(value, Mapping):
            return sum(visit(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(visit(v) for v in value)
        return 0

    return [sum(visit(optimizer.state.get(p, {})) for p in group["params"]) for group in optimizer.param_groups]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (each storage counted once)."""
    return sum(optimizer_state_bytes_by_group(optimizer))
