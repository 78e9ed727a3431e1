"""The role of each trainable parameter: embedding, hidden, output, bias or norm.

Roles are what a policy usually matches on, so they follow the research plan's components:

* ``norm``: every parameter of a normalization module (LayerNorm, RMSNorm, BatchNorm, GroupNorm...).
* ``embedding``: weights of ``nn.Embedding``/``nn.EmbeddingBag`` modules. A model without any
  embedding module has its *input layer* here instead: the weight of the first Linear/Conv in
  registration order (the layer that sees the raw input).
* ``output``: the weight of the last Linear/Conv in registration order (the projection to the
  output). A tied output head shares its tensor with the embedding and is claimed once, as
  ``embedding``. A model with a single layer has it as ``output``.
* ``bias``: every other parameter with fewer than 2 dimensions (biases, scalars, gains).
* ``hidden``: every other matrix or kernel.

Registration order is the order of ``named_modules()``. A model whose order does not reflect
its data flow can say what it means: define ``optlab_roles()`` returning ``{name glob: role}``,
or pass ``roles=`` to :func:`describe_parameters`; overrides win over inference.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

ROLES = ("embedding", "hidden", "output", "bias", "norm")

_EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)
_PROJECTION_TYPES: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.modules.batchnorm._NormBase,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)


@dataclass(frozen=True)
class ParamInfo:
    """A trainable parameter with what a policy can match on."""

    name: str
    param: torch.Tensor
    module_name: str
    module: nn.Module
    role: str

    @property
    def ndim(self) -> int:
        return self.param.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    # Norm layers from other libraries (apex, timm, user code) by name, e.g. "FusedRMSNorm".
    return type(module).__name__.lower().endswith("norm")


def describe_parameters(
    model: nn.Module, roles: Mapping[str, str] | None = None
) -> list[ParamInfo]:
    """Trainable parameters of ``model`` in registration order, each with its role.

    A parameter shared by several modules (tied weights) appears once, under its first name.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    overrides: dict[str, str] = {}
    hook = getattr(model, "optlab_roles", None)
    if callable(hook):
        overrides.update(hook() or {})
    if roles:
        overrides.update(roles)
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise ValueError(
                f"role override {pattern!r}: {role!r} is not a role; use one of {', '.join(ROLES)}"
            )

    owners: list[tuple[str, torch.Tensor, str, nn.Module]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{local}" if module_name else local
            owners.append((full, param, module_name, module))

    # Every projection module, tied or not: a tied head is still the last projection, and its
    # weight keeps the role of its first owner (the embedding), so no other layer becomes "output".
    projections = [
        id(m.weight)
        for _, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, _PROJECTION_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    has_embedding_module = any(isinstance(m, _EMBEDDING_TYPES) for *_, m in owners)
    input_weight = projections[0] if projections and not has_embedding_module else None
    output_weight = projections[-1] if projections else None
    if input_weight == output_weight:
        input_weight = None

    infos = []
    for name, param, module_name, module in owners:
        if not param.requires_grad:
            continue
        role = next((r for pat, r in overrides.items() if fnmatch.fnmatchcase(name, pat)), None)
        if role is None:
            if _is_norm(module):
                role = "norm"
            elif isinstance(module, _EMBEDDING_TYPES) or id(param) == input_weight:
                role = "embedding"
            elif id(param) == output_weight:
                role = "output"
            elif param.ndim < 2:
                role = "bias"
            else:
                role = "hidden"
        infos.append(ParamInfo(name, param, module_name, module, role))
    return infos
