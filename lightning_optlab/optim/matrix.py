"""A parameter's matrix view: which (fan_out, fan_in) matrix a stored tensor is, and how to get there.

Every rule, constraint and metric that treats a tensor as a matrix (Muon's orthogonalization and
shape scaling, SinkGD's row/column normalization, SPARKLES' per-output centralization, the
Stiefel and sphere retractions, the spectral monitors) reads it through one
:class:`MatrixView`, so a layer means the same matrix everywhere:

=================  ======================================  ===============================
layout             stored as                               matrix (fan_out, fan_in)
=================  ======================================  ===============================
``out_in``         Linear (out, in), Conv (out, in, *k),   ``t.reshape(t.shape[0], -1)``
                   Embedding (num, dim), RNN (gates, in)
``in_out``         HF ``Conv1D`` (in, out),                dims 0 and 1 swapped, then
                   ConvTranspose (in, out, *k)             flattened as ``out_in``
``table``          learned tables added to activations,    ``t.reshape(-1, t.shape[-1])``
                   e.g. positions (1, N, d)                (one row per table entry)
``vector``         biases, gains, per-channel scales       not a matrix
                   (C, 1, 1): < 2 non-singleton dims
=================  ======================================  ===============================

``blocks > 1`` marks a packed projection (fused QKV, ``MultiheadAttention.in_proj_weight``, LSTM
gates): its fan_out rows are ``blocks`` equal matrices stacked, and :meth:`MatrixView.to_matrix`
returns them as a ``(blocks, fan_out / blocks, fan_in)`` batch. The policy decides per rule
whether a packed projection is split (``split_packed``); unsplit it is one matrix.

A view is stored in param groups as its short :attr:`MatrixView.code` (``"in_out"``,
``"out_in*3"``), so ``state_dict`` stays plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

LAYOUTS = ("out_in", "in_out", "table", "vector")


@dataclass(frozen=True)
class MatrixView:
    """How a stored tensor reads as a (fan_out, fan_in) matrix (see the module docstring)."""

    layout: str = "out_in"
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"matrix view layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"matrix view blocks must be a positive integer, got {self.blocks!r}")

    @property
    def code(self) -> str:
        return self.layout if self.blocks == 1 else f"{self.layout}*{self.blocks}"

    @classmethod
    def parse(cls, code: "str | MatrixView | None") -> "MatrixView":
        if code is None:
            return DEFAULT_VIEW
        if isinstance(code, MatrixView):
            return code
        layout, _, blocks = str(code).partition("*")
        return cls(layout, int(blocks) if blocks else 1)

    @property
    def is_matrix(self) -> bool:
        return self.layout != "vector"

    def unsplit(self) -> "MatrixView":
        """The same view with a packed projection read as one matrix."""
        return self if self.blocks == 1 else MatrixView(self.layout)

    def oriented(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The stored ``shape`` with the fan-out dim first: dims 0 and 1 swapped for ``in_out``, a
        table's entries as one dim; (out, in, *k) as it is."""
        shape = tuple(shape)
        if self.layout == "in_out" and len(shape) >= 2:
            return (shape[1], shape[0], *shape[2:])
        if self.layout == "table" and len(shape) >= 2:
            return (math.prod(shape[:-1]), shape[-1])
        return shape

    def shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """(fan_out, fan_in) of one block of a tensor of ``shape``."""
        if not self.is_matrix or len(shape) < 2:
            raise ValueError(f"a tensor of shape {list(shape)} (layout {self.layout!r}) is not a matrix")
        oriented = self.oriented(shape)
        rows, cols = oriented[0], math.prod(oriented[1:])
        if rows % self.blocks:
            raise ValueError(f"a tensor of shape {list(shape)} has {rows} rows, not {self.blocks} equal blocks")
        return rows // self.blocks, cols

    def row_dims(self, ndim: int) -> int | tuple[int, ...]:
        """The dims of a stored ``ndim``-D tensor that make up one row of its matrix (what the
        sphere constraint normalizes): Linear (out, in) -1; conv (out, in, *k) each filter;
        HF ``Conv1D`` (in, out) each column; a table (1, N, d) each entry; a vector all of it."""
        if not self.is_matrix or ndim < 2:
            return -1 if ndim <= 1 else tuple(range(ndim))
        if self.layout == "table" or (ndim == 2 and self.layout == "out_in"):
            return -1
        if self.layout == "in_out":
            return (0, *range(2, ndim)) if ndim > 2 else 0
        return tuple(range(1, ndim))

    def to_matrix(self, t: Tensor) -> Tensor:
        """``t`` as its matrix (a view of ``t`` where strides allow, else a copy): shape
        ``(fan_out, fan_in)``, or ``(blocks, fan_out / blocks, fan_in)`` for a split projection."""
        rows, cols = self.shape(t.shape)
        if self.layout == "in_out":
            t = t.transpose(0, 1)
        m = t.reshape(rows * self.blocks, cols)
        return m if self.blocks == 1 else m.unflatten(0, (self.blocks, rows))

    def from_matrix(self, m: Tensor, shape: Sequence[int]) -> Tensor:
        """The inverse of :meth:`to_matrix`: ``m`` laid out as a stored tensor of ``shape``."""
        shape = tuple(shape)
        m = m.reshape(-1, m.shape[-1])
        if self.layout == "in_out":
            return m.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
        return m.reshape(shape)


DEFAULT_VIEW = MatrixView()
VECTOR_VIEW = MatrixView("vector")


def default_view(t: Tensor | Sequence[int]) -> MatrixView:
    """The view of a tensor nothing is known about: ``out_in`` with two or more non-singleton
    dims (what torch.optim.Muon and the SinkGD paper assume), else ``vector``."""
    shape = tuple(t.shape) if isinstance(t, Tensor) else tuple(t)
    return DEFAULT_VIEW if len(shape) >= 2 and sum(d > 1 for d in shape) >= 2 else VECTOR_VIEW


def group_views(
    group: Mapping[str, Any], params: Sequence[Tensor], inferred: Mapping[int, MatrixView] | None = None
) -> list[MatrixView]:
    """The matrix view of each of ``params`` (a subset of ``group["params"]``) from the group's
    ``matrix_views`` codes (set by the policy builder). For groups without them: ``inferred``
    (``{id(param): view}``, e.g. from :func:`~lightning_optlab.policy.describe_parameters`), else
    ``out_in`` for >= 2-D tensors, as torch's own optimizers read them."""
    codes = group.get("matrix_views")
    if not codes:
        inferred = inferred or {}
        return [inferred.get(id(p)) or (DEFAULT_VIEW if p.ndim >= 2 else VECTOR_VIEW) for p in params]
    by_id = {id(p): c for p, c in zip(group["params"], codes)}
    return [MatrixView.parse(by_id.get(id(p))) for p in params]
