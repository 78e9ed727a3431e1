"""GPT: shapes, causality, attention against a float64 reference, roles, size, training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_optlab.data import TextDataModule
from lightning_optlab.models import GPT
from lightning_optlab.policy import build_param_groups, describe_parameters

ADAMW = {"rules": [{"match": {}, "optimizer": "adamw", "lr": 3e-3}]}


def _tiny(**kw):
    torch.manual_seed(0)
    return GPT(size="tiny", policy=ADAMW, **kw)


def test_logits_shape_and_context_limit():
    model = _tiny()
    idx = torch.randint(0, 256, (3, 17))
    assert model(idx).shape == (3, 17, 256)
    assert model.context_length == 64
    with pytest.raises(ValueError, match="context_length 64"):
        model(torch.randint(0, 256, (1, 65)))


def test_output_at_t_does_not_depend_on_later_tokens():
    model = _tiny().double().eval()
    idx = torch.randint(0, 256, (2, 32))
    t = 12
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.randint(0, 254, changed[:, t + 1 :].shape)) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-3  # later positions do see them


def test_attention_matches_a_float64_masked_softmax_reference():
    model = _tiny().double().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(64, dim=-1)
    heads = lambda z: z.view(2, 9, 4, 16).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 9, 64))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-12)


def test_roles_untied():
    roles = {p.name: p.role for p in describe_parameters(_tiny())}
    assert roles["tok_emb.weight"] == roles["pos_emb.weight"] == "embedding"
    assert roles["lm_head.weight"] == "output"
    assert [n for n, r in roles.items() if r == "output"] == ["lm_head.weight"]
    for layer in range(2):
        for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
            assert roles[f"blocks.{layer}.{name}.weight"] == "hidden"
            assert roles[f"blocks.{layer}.{name}.bias"] == "bias"
        for ln in ("ln1", "ln2"):
            assert roles[f"blocks.{layer}.{ln}.weight"] == roles[f"blocks.{layer}.{ln}.bias"] == "norm"
    assert roles["ln_f.weight"] == "norm"


def test_tied_head_is_one_tensor_claimed_once():
    model = _tiny(tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    infos = describe_parameters(model)
    roles = {p.name: p.role for p in infos}
    assert "lm_head.weight" not in roles and roles["tok_emb.weight"] == "embedding"
    assert "output" not in roles.values()  # the last FFN projection is not mistaken for the head
    assert roles["blocks.1.mlp.proj.weight"] == "hidden"
    policy = {
        "rules": [
            {"match": {"role": "embedding"}, "optimizer": "adamw", "lr": 1e-3},
            {"match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.1},
            {"match": {}, "optimizer": "adam", "lr": 1e-3},
        ]
    }
    groups = build_param_groups(model, policy)
    claimed = [id(p) for g in groups for p in g["params"]]
    assert len(claimed) == len(set(claimed)) == len({id(p) for p in model.parameters()})
    emb = next(g for g in groups if g["algorithm"] == "adamw")
    assert emb["param_names"] == ["tok_emb.weight", "pos_emb.weight"]


def _expected_count(V, d, L, ctx, ratio=4, tied=False):
    # Independent of the model code: embeddings + L blocks + final LN + head.
    per_block = (
        2 * (2 * d)  # two LayerNorms (weight, bias)
        + (d * 3 * d + 3 * d)  # qkv
        + (d * d + d)  # attention output projection
        + (d * ratio * d + ratio * d)  # FFN in
        + (ratio * d * d + d)  # FFN out
    )
    return V * d + ctx * d + L * per_block + 2 * d + (0 if tied else V * d)


def test_default_size_is_the_42m_gpt_counted_on_meta():
    with torch.device("meta"):
        model = GPT()
        tied = GPT(tie_weights=True)
    assert model.tok_emb.weight.is_meta
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_count(256, 768, 6, 1024) == 43_708_416
    assert sum(p.numel() for p in model.blocks.parameters()) == 42_527_232  # the "42M"
    assert sum(p.numel() for p in tied.parameters()) == _expected_count(256, 768, 6, 1024, tied=True)
    assert (model.d_model, model.n_layers, model.context_length) == (768, 6, 1024)
    assert model.blocks[0].attn.n_heads == 12


@pytest.mark.parametrize("size, dims, count", [
    ("150m", (1024, 12, 16), 152_729_600), ("680m", (1536, 24, 16), 682_318_848), ("1.2b", (2048, 24, 16), 1_211_748_352),
])
def test_sweep_presets_match_the_closed_form_count(size, dims, count):
    with torch.device("meta"):
        model = GPT(size=size)
    d, layers, heads = dims
    assert (model.d_model, model.n_layers, model.blocks[0].attn.n_heads) == dims
    assert sum(p.numel() for p in model.parameters()) == _expected_count(256, d, layers, 1024) == count


def test_explicit_dims_override_the_preset_and_bad_ones_are_refused():
    with torch.device("meta"):
        model = GPT(size="tiny", d_model=32, n_layers=3, context_length=16)
    assert (model.d_model, model.n_layers, model.context_length) == (32, 3, 16)
    assert sum(p.numel() for p in model.parameters()) == _expected_count(256, 32, 3, 16)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        GPT(size="huge")
    with pytest.raises(ValueError, match="n_heads"):
        GPT(size="tiny", d_model=30)
    with pytest.raises(ValueError, match="n_layers"):
        GPT(size="tiny", n_layers=0)


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_tiny_gpt_learns_stdlib_text_on_cpu(tmp_path):
    model = _tiny()
    dm = TextDataModule(block_size=64, batch_size=8, max_bytes=200_000, val_windows=8, cache_dir=str(tmp_path))
    losses = _Losses()
    trainer = L.Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
        limit_val_batches=1, val_check_interval=40,
    )
    trainer.fit(model, dm)
    assert losses.losses[0] == pytest.approx(math.log(256), abs=0.3)  # uniform over bytes at init
    assert sum(losses.losses[-5:]) / 5 < losses.losses[0] - 1.0
    assert model.tokens_seen == 40 * 8 * 64
    assert float(trainer.callback_metrics["train/tokens"]) == 40 * 8 * 64
    val = trainer.callback_metrics["val/loss"]
    torch.testing.assert_close(trainer.callback_metrics["val/bpb"], val / math.log(2))
