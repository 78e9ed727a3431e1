"""The role and the matrix view of each trainable parameter, inferred from what it is.

This is the one place roles are defined. A policy usually matches on them, so they follow the
research plan's components:

* ``norm``: every parameter of a normalization module (LayerNorm, RMSNorm, BatchNorm, GroupNorm,
  and other libraries' ``*Norm`` classes, e.g. HF ``LlamaRMSNorm``).
* ``embedding``: weights of ``nn.Embedding``/``nn.EmbeddingBag``; learned tables added to
  activations that a model keeps as bare parameters (position tables, class/register/mask tokens:
  a leading broadcast dim as in (1, N, d), or a name such as ``pos_embed``, ``cls_token``); and,
  in a model without an embedding module, the *input layer*: the first projection.
* ``output``: the weight of the last projection (the head). A tied head shares its tensor with
  the embedding and is claimed once, as ``embedding``. A model with a single layer has it here.
* ``bias``: biases, gains, scalars and every other tensor with fewer than two non-singleton dims
  (a per-channel scale stored as (C, 1, 1) is a vector, not a matrix).
* ``hidden``: every other matrix or kernel.

Projections are ``nn.Linear``, ``nn.Bilinear``, convolutions (transposed ones too), HF
``Conv1D``, ``nn.MultiheadAttention``'s in-projections and the weights of ``nn.LSTM``/``GRU``/
``RNN``, in ``named_modules()`` order. The input and output layers are looked for among the
projections at the model's boundary: one inside a repeated block (a layer of a ModuleList or
Sequential of two or more blocks of one class, such as transformer layers or ResNet blocks) is
``hidden`` however it is placed. So a bare ``nn.Transformer`` has neither.

Each parameter also gets its :class:`~lightning_optlab.optim.matrix.MatrixView` (Linear and conv
(out, in*k); HF ``Conv1D`` and ConvTranspose stored fan-in first; tables one row per entry;
vectors none) and, for packed projections whose blocks are known to be contiguous equal matrices
(``MultiheadAttention.in_proj_weight``, a ``qkv``/``c_attn``/``Wqkv``/``qkv_proj`` projection with
out = 3 * in, LSTM and GRU gates), the number of blocks, which a rule may ask to split.

Where inference cannot know, :func:`~lightning_optlab.policy.explain` shows it, and a model can
say what it means: define ``optlab_roles()`` returning ``{name glob: role}``, or pass ``roles=``;
overrides win over inference.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from ..optim.matrix import DEFAULT_VIEW, VECTOR_VIEW, MatrixView, default_view

ROLES = ("embedding", "hidden", "output", "bias", "norm")

_EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)
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
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Fused projections whose q, k, v blocks are contiguous rows when out == 3 * in (timm ViT,
# HF GPT-2, MosaicBERT, Phi-3 without GQA, this package's GPT). Head-interleaved layouts such as
# GPT-NeoX's `query_key_value` are not split.
_PACKED_QKV_NAMES = frozenset({"qkv", "c_attn", "wqkv", "qkv_proj", "in_proj"})
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# Bare learned tables added to activations, by the attribute names the common libraries use.
_TABLE_NAME = re.compile(r"pos|position|token|cls|embed|register|latent|prompt", re.IGNORECASE)


@dataclass(frozen=True)
class ParamInfo:
    """A trainable parameter with what a policy can match on and how it reads as a matrix.

    ``view`` is the matrix view with ``blocks`` set for packed projections; a rule without
    ``split_packed`` uses ``view.unsplit()``. ``tied`` lists the other names of a shared tensor.
    """

    name: str
    param: torch.Tensor
    module_name: str
    module: nn.Module
    role: str
    view: MatrixView = DEFAULT_VIEW
    tied: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ndim(self) -> int:
        return self.param.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    # Norm layers from other libraries (apex, timm, HF, user code) by name, e.g. "LlamaRMSNorm".
    return type(module).__name__.lower().endswith("norm")


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 family): y = x @ W + b with W stored (in, out).
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.ndim == 2
        and w.shape[-1] == getattr(module, "nf", None)
    )


def projection_views(module_name: str, module: nn.Module) -> dict[str, MatrixView]:
    """``{local parameter name: matrix view}`` of the projection weights ``module`` owns itself."""
    local = module_name.rpartition(".")[2].lower()

    def qkv(weight: torch.Tensor, layout: str) -> MatrixView:
        rows, cols = MatrixView(layout).shape(weight.shape)
        packed = local in _PACKED_QKV_NAMES and rows == 3 * cols
        return MatrixView(layout, 3 if packed else 1)

    if isinstance(module, nn.modules.conv._ConvNd):
        return {"weight": MatrixView("in_out" if module.transposed else "out_in")}
    if isinstance(module, nn.Linear):
        return {"weight": qkv(module.weight, "out_in")}
    if isinstance(module, nn.Bilinear):
        return {"weight": DEFAULT_VIEW}
    if _is_hf_conv1d(module):
        return {"weight": qkv(module.weight, "in_out")}
    if isinstance(module, nn.MultiheadAttention):
        views = {n: DEFAULT_VIEW for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")}
        views["in_proj_weight"] = MatrixView("out_in", 3)
        return {n: v for n, v in views.items() if getattr(module, n, None) is not None}
    if isinstance(module, nn.RNNBase):
        gates = _RNN_GATES.get(module.mode.split("_")[0], 1)
        return {
            n: MatrixView("out_in", 1 if n.startswith("weight_hr") else gates)
            for n, _ in module.named_parameters(recurse=False)
            if n.startswith("weight_")
        }
    return {}


def _repeated_blocks(model: nn.Module) -> set[str]:
    """Names of modules that are one of >= 2 sibling blocks of one (non-container) class."""
    out: set[str] = set()
    for parent_name, parent in model.named_modules():
        by_class: dict[type, list[str]] = {}
        for child_name, child in parent.named_children():
            if isinstance(child, _CONTAINERS) or not any(True for _ in child.children()):
                continue  # leaf layers (Sequential(Linear, ReLU, Linear)) are not blocks
            by_class.setdefault(type(child), []).append(child_name)
        for names in by_class.values():
            if len(names) >= 2:
                out.update(f"{parent_name}.{n}" if parent_name else n for n in names)
    return out


def _inside(module_name: str, blocks: set[str]) -> bool:
    parts = module_name.split(".")
    return any(".".join(parts[:k]) in blocks for k in range(1, len(parts) + 1))


def _owned_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str, nn.Module]]:
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            yield (f"{module_name}.{local}" if module_name else local), param, module_name, module


def _bare_view_and_role(local: str, param: torch.Tensor) -> tuple[MatrixView, str]:
    """A >= 2-D parameter no known layer type explains: a table, a vector, or a user's own matrix."""
    view = default_view(param)
    if (param.ndim >= 3 and param.shape[0] == 1) or _TABLE_NAME.search(local):
        return (MatrixView("table") if view.is_matrix else VECTOR_VIEW), "embedding"
    return view, ("hidden" if view.is_matrix else "bias")


def describe_parameters(
    model: nn.Module, roles: Mapping[str, str] | None = None, include_frozen: bool = False
) -> list[ParamInfo]:
    """Trainable parameters of ``model`` in registration order, each with its role and view.

    A parameter shared by several modules (tied weights) appears once, under its first name, with
    its other names in ``tied``. Frozen parameters (``requires_grad=False``) are left out unless
    ``include_frozen`` (the policy check uses them to say why a rule claims nothing).
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

    blocks = _repeated_blocks(model)
    owners: dict[int, tuple[str, torch.Tensor, str, nn.Module]] = {}
    aliases: dict[int, list[str]] = {}
    views: dict[int, MatrixView] = {}
    # Every projection, tied or not, in order: a tied head is still the last projection, and its
    # weight keeps the role of its first owner (the embedding), so no other layer becomes "output".
    boundary: list[int] = []
    view_cache: dict[int, dict[str, MatrixView]] = {}
    for full, param, module_name, module in _owned_parameters(model):
        if id(module) not in view_cache:
            view_cache[id(module)] = projection_views(module_name, module)
        local = full.rpartition(".")[2]
        view = view_cache[id(module)].get(local)
        if view is not None and not _inside(module_name, blocks):
            boundary.append(id(param))
        if id(param) in owners:
            aliases[id(param)].append(full)
            continue
        owners[id(param)] = (full, param, module_name, module)
        aliases[id(param)] = []
        if view is not None:
            views[id(param)] = view

    has_embedding_module = any(isinstance(m, _EMBEDDING_TYPES) for *_, m in owners.values())
    input_weight = boundary[0] if boundary and not has_embedding_module else None
    output_weight = boundary[-1] if boundary else None
    if input_weight == output_weight:
        input_weight = None

    infos = []
    for key, (name, param, module_name, module) in owners.items():
        if not param.requires_grad and not include_frozen:
            continue
        local = name.rpartition(".")[2]
        view = views.get(key)
        if _is_norm(module):
            view, role = default_view(param), "norm"
        elif isinstance(module, _EMBEDDING_TYPES) and local == "weight":
            view, role = DEFAULT_VIEW, "embedding"
        elif view is not None:
            role = "embedding" if key == input_weight else "output" if key == output_weight else "hidden"
        elif local.startswith("bias") or param.ndim < 2:
            view, role = VECTOR_VIEW, "bias"
        else:
            view, role = _bare_view_and_role(local, param)
        role = next((r for pat, r in overrides.items() if fnmatch.fnmatchcase(name, pat)), role)
        infos.append(ParamInfo(name, param, module_name, module, role, view, tuple(aliases[key])))
    return infos
