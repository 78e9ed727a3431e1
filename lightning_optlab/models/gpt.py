"""GPT: a byte-level decoder-only transformer for the language-model experiments.

The vocabulary is the 256 byte values (pair it with :class:`~lightning_optlab.data.TextDataModule`),
so nothing is downloaded. Blocks are pre-LayerNorm; attention is
``F.scaled_dot_product_attention(is_causal=True)``, which dispatches to flash / memory-efficient
kernels on GPU.

Sizes (``size=``; explicit ``d_model``/``n_layers``/``n_heads``/``context_length`` override the
preset). Counts are for the defaults (biases on, untied head, ``mlp_ratio`` 4):

=========  =======  ========  =======  =======  ====================================
size       d_model  n_layers  n_heads  context  parameters
=========  =======  ========  =======  =======  ====================================
``42m``    768      6         12       1024     43,708,416 (42,527,232 in the blocks)
``150m``   1024     12        16       1024     152,729,600
``680m``   1536     24        16       1024     682,318,848
``1.2b``   2048     24        16       1024     1,211,748,352 (for the benchmarks' size sweeps)
``small``  256      4         4        256      3,356,160
``tiny``   64       2         4        64       136,960 (for tests and CPU smoke runs)
=========  =======  ========  =======  =======  ====================================

``42m`` is the research plan's "42M GPT": 42.5M parameters in the six transformer blocks, plus
1.2M in the token/position embeddings and the head (43.5M with ``tie_weights``).

Parameter roles, as :func:`~lightning_optlab.policy.describe_parameters` infers them (modules are
registered in data-flow order for this): ``tok_emb.weight`` and ``pos_emb.weight`` are
``embedding``; the attention (``qkv``, ``proj``) and FFN (``fc``, ``proj``) weights are ``hidden``;
LayerNorm parameters are ``norm``; Linear biases are ``bias``; ``lm_head.weight`` is ``output``, or,
with ``tie_weights``, the token embedding itself (one tensor, claimed once, role ``embedding``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from ..module import OptLabMixin

VOCAB_SIZE = 256  # bytes

SIZES: dict[str, dict[str, int]] = {
    "42m": dict(d_model=768, n_layers=6, n_heads=12, context_length=1024),
    "150m": dict(d_model=1024, n_layers=12, n_heads=16, context_length=1024),
    "680m": dict(d_model=1536, n_layers=24, n_heads=16, context_length=1024),
    "1.2b": dict(d_model=2048, n_layers=24, n_heads=16, context_length=1024),
    "small": dict(d_model=256, n_layers=4, n_heads=4, context_length=256),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, context_length=64),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, bias: bool, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_heads, bias, dropout)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = FeedForward(d_model, mlp_ratio * d_model, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(OptLabMixin, LightningModule):
    """Byte-level GPT (vocabulary 256) trained with a per-layer optimizer policy.

    Example::

        model = GPT(size="tiny", policy={"rules": [
            {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
            {"match": {}, "optimizer": "adamw", "lr": 3e-3},
        ]})

    Args:
        policy: the optimizer policy (see :class:`~lightning_optlab.policy.Policy`).
        scheduler: optional LR schedule spec (as for :class:`~lightning_optlab.models.MLPClassifier`).
        size: preset, ``42m`` (default), ``150m``, ``680m``, ``1.2b``, ``small`` or ``tiny`` (see the
            module docstring).
        d_model, n_layers, n_heads, context_length: override the preset's value when given.
        mlp_ratio: FFN width as a multiple of ``d_model``.
        bias: biases in the Linear and LayerNorm layers.
        tie_weights: share the output head with the token embedding.
        dropout: dropout on attention weights and residual branches.
    """

    def __init__(
        self,
        policy: Any = None,
        scheduler: dict | None = None,
        size: str = "42m",
        d_model: int | None = None,
        n_layers: int | None = None,
        n_heads: int | None = None,
        context_length: int | None = None,
        mlp_ratio: int = 4,
        bias: bool = True,
        tie_weights: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(policy=policy, scheduler=scheduler)
        if size not in SIZES:
            raise ValueError(f"GPT: unknown size {size!r}; use one of {', '.join(SIZES)}")
        dims = dict(SIZES[size])
        for key, value in (
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("context_length", context_length),
        ):
            if value is not None:
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"GPT: {key} must be a positive int, got {value!r}")
                dims[key] = value
        if dims["d_model"] % dims["n_heads"]:
            raise ValueError(
                f"GPT: d_model {dims['d_model']} is not divisible by n_heads {dims['n_heads']}; "
                "pick n_heads that divides d_model"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPT: dropout must be in [0, 1), got {dropout!r}")
        self.save_hyperparameters()
        self.d_model = dims["d_model"]
        self.n_layers = dims["n_layers"]
        self.context_length = dims["context_length"]
        self.tie_weights = tie_weights

        # Registration order = data-flow order: it is what makes the inferred roles right.
        self.tok_emb = nn.Embedding(VOCAB_SIZE, self.d_model)
        self.pos_emb = nn.Embedding(self.context_length, self.d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(self.d_model, dims["n_heads"], mlp_ratio, bias, dropout) for _ in range(self.n_layers)
        )
        self.ln_f = nn.LayerNorm(self.d_model, bias=bias)
        self.lm_head = nn.Linear(self.d_model, VOCAB_SIZE, bias=False)
        self._init_weights()
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.tokens_seen = 0

    def _init_weights(self) -> None:
        # GPT-2 initialisation; residual output projections scaled by 1/sqrt(2 n_layers).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layers))

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): each block, then the root,
        ``fully_shard``-ed over the data-parallel mesh, so every parameter is a DTensor the
        policy's rules step (see README, "Past one GPU"). Nothing under other strategies. A mesh of
        one device is sharded too: Lightning loads a distributed checkpoint only into DTensor
        parameters, so a run saved on several ranks can resume on one."""
        mesh = self.device_mesh
        if mesh is None or "data_parallel" not in (mesh.mesh_dim_names or ()):
            return
        from torch.distributed.fsdp import fully_shard

        for block in self.blocks:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B, T, 256)`` for byte ids ``idx`` of shape ``(B, T)``."""
        T = idx.shape[1]
        if T > self.context_length:
            raise ValueError(
                f"GPT: sequence length {T} exceeds context_length {self.context_length}; "
                "use shorter windows (data block_size) or a larger context_length"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.tokens_seen += batch[0].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log("val/bpb", loss / math.log(2), on_step=False, on_epoch=True)  # bits per byte

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.loss(batch), on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
