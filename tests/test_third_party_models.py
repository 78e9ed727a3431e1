"""Roles, matrix views and a constrained Muon policy on models this project did not write.

Every model is built from its library's config with random weights (no download). For each, the
role of every parameter is asserted against what the model's authors meant (hand-written name
rules below, not the inference under test), then a sphere + Stiefel + Muon policy trains a few
CPU steps with a finite loss, the constraints hold afterwards, and SpectralMonitor runs.
"""

from __future__ import annotations

import fnmatch
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_optlab import OptLabMixin, build_optimizer, describe_parameters, explain
from lightning_optlab.callbacks import ManifoldRetraction, SpectralMonitor
from lightning_optlab.optim.matrix import MatrixView

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

warnings.filterwarnings("ignore", module="transformers")


# --------------------------------------------------------------------------- the models

def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=61, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg), _tokens(61), _lm_loss


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=61,
                                   max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg), _tokens(61), _lm_loss


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=61, max_position_embeddings=16,
                                  num_labels=3)
    return transformers.BertForSequenceClassification(cfg), _tokens(61), _classify_loss


def _timm_vit():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, num_classes=5, reg_tokens=2)
    return model, _images(32), _classify_loss


def _timm_resnet():
    return timm.create_model("resnet10t", num_classes=5), _images(32), _classify_loss


def _timm_convnext():
    return timm.create_model("convnext_atto", num_classes=5), _images(32), _classify_loss


def _tv_resnet():
    return torchvision.models.resnet18(num_classes=5), _images(32), _classify_loss


def _tv_convnext():
    cfg = [torchvision.models.convnext.CNBlockConfig(16, 32, 1), torchvision.models.convnext.CNBlockConfig(32, None, 2)]
    return torchvision.models.ConvNeXt(cfg, num_classes=5), _images(32), _classify_loss


def _tv_vit():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    return model, _images(32), _classify_loss


class _BareTransformer(nn.Module):
    """``nn.Transformer`` as it comes: inputs already embedded, no head."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=64, batch_first=True, dropout=0.0)

    def forward(self, x):
        return self.transformer(x, x)


def _transformer():
    return _BareTransformer(), lambda g: torch.randn(4, 6, 32, generator=g), _regress_loss


class _LSTMLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(61, 24)
        self.lstm = nn.LSTM(24, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 61)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def _lstm():
    return _LSTMLanguageModel(), _tokens(61), _lm_loss


def _tokens(vocab):
    return lambda g: torch.randint(0, vocab, (4, 12), generator=g)


def _images(size):
    return lambda g: torch.randn(4, 3, size, size, generator=g)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _lm_loss(out, x):
    logits = _logits(out)[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _classify_loss(out, x):
    logits = _logits(out)
    return nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1])


def _regress_loss(out, x):
    return (out - x.flip(1)).square().mean()


# --------------------------------------------------------------------------- what the authors meant
# (pattern, role), first match wins; every parameter must be matched by one.

NORM = ["*norm*.weight", "*norm*.bias", "*ln_*", "*LayerNorm*", "*bn*", "*.ln.*"]

EXPECTED = {
    "gpt2": [("transformer.wte.weight", "embedding"), ("transformer.wpe.weight", "embedding"),
             ("*ln_*", "norm"), ("*.bias", "bias"), ("*.c_attn.weight", "hidden"), ("*.c_proj.weight", "hidden"),
             ("*.c_fc.weight", "hidden")],
    "llama": [("model.embed_tokens.weight", "embedding"), ("*layernorm*", "norm"), ("model.norm.weight", "norm"),
              ("model.layers.*_proj.weight", "hidden"), ("lm_head.weight", "output")],
    "bert": [("bert.embeddings.*_embeddings.weight", "embedding"), ("*LayerNorm*", "norm"), ("*.bias", "bias"),
             ("bert.encoder.*.weight", "hidden"), ("bert.pooler.dense.weight", "hidden"),
             ("classifier.weight", "output")],
    "timm_vit": [("cls_token", "embedding"), ("reg_token", "embedding"), ("pos_embed", "embedding"),
                 ("patch_embed.proj.weight", "embedding"), ("*norm*", "norm"), ("*.bias", "bias"),
                 ("blocks.*.weight", "hidden"), ("head.weight", "output")],
    # resnet10t: a deep stem conv1 = (conv, bn, act) x 3 and avg-down shortcuts (pool, conv, bn)
    "timm_resnet": [("conv1.0.weight", "embedding"), ("*bn*", "norm"), ("conv1.1.*", "norm"),
                    ("conv1.4.*", "norm"), ("conv1.*.weight", "hidden"), ("layer*.downsample.2.*", "norm"),
                    ("layer*.weight", "hidden"), ("fc.weight", "output"), ("fc.bias", "bias")],
    "timm_convnext": [("stem.0.weight", "embedding"), ("stem.1.*", "norm"), ("*norm*", "norm"),
                      ("stages.*.downsample.0.*", "norm"), ("*.gamma", "bias"), ("*.bias", "bias"),
                      ("stages.*.weight", "hidden"), ("head.fc.weight", "output")],
    "tv_resnet": [("conv1.weight", "embedding"), ("*bn*", "norm"), ("*downsample.1.*", "norm"),
                  ("layer*.weight", "hidden"), ("fc.weight", "output"), ("fc.bias", "bias")],
    # features.0 stem (conv, LayerNorm2d); CNBlock: block.0 dwconv, block.2 LayerNorm, block.3/5 MLP;
    # downsample: (LayerNorm2d, conv); classifier: (LayerNorm2d, Flatten, Linear)
    "tv_convnext": [("features.0.0.weight", "embedding"), ("features.0.1.*", "norm"), ("*.layer_scale", "bias"),
                    ("*.block.2.*", "norm"), ("features.2.0.*", "norm"), ("classifier.0.*", "norm"),
                    ("*.bias", "bias"), ("features.*.weight", "hidden"), ("classifier.2.weight", "output")],
    "tv_vit": [("class_token", "embedding"), ("encoder.pos_embedding", "embedding"),
               ("conv_proj.weight", "embedding"), ("*ln*", "norm"), ("*bias", "bias"),
               ("encoder.layers.*weight", "hidden"), ("heads.head.weight", "output")],
    "transformer": [("*norm*", "norm"), ("*bias", "bias"), ("*weight", "hidden")],
    "lstm": [("emb.weight", "embedding"), ("lstm.weight_*", "hidden"), ("lstm.bias_*", "bias"),
             ("head.weight", "output"), ("head.bias", "bias")],
}

BUILDERS = {
    "gpt2": _gpt2, "llama": _llama, "bert": _bert, "timm_vit": _timm_vit, "timm_resnet": _timm_resnet,
    "timm_convnext": _timm_convnext, "tv_resnet": _tv_resnet, "tv_convnext": _tv_convnext,
    "tv_vit": _tv_vit, "transformer": _transformer, "lstm": _lstm,
}


def _expected_role(model_key: str, name: str) -> str:
    for pattern, role in EXPECTED[model_key]:
        if fnmatch.fnmatchcase(name, pattern):
            return role
    raise AssertionError(f"{model_key}: no expectation written for {name}")


@pytest.mark.parametrize("key", list(BUILDERS))
def test_every_parameter_gets_the_role_its_authors_meant(key):
    torch.manual_seed(0)
    model, _, _ = BUILDERS[key]()
    infos = describe_parameters(model)
    assert {i.name for i in infos} == {n for n, p in model.named_parameters() if p.requires_grad}
    wrong = [(i.name, list(i.shape), i.role, _expected_role(key, i.name)) for i in infos
             if i.role != _expected_role(key, i.name)]
    assert not wrong, f"{key}: (name, shape, inferred, expected): {wrong}"


def test_matrix_views_of_third_party_layers():
    torch.manual_seed(0)
    views = {i.name: i.view for i in describe_parameters(_gpt2()[0])}
    # HF Conv1D stores (in, out): c_fc (32 -> 128) is the 128 x 32 matrix, c_attn three 32 x 32 blocks
    assert views["transformer.h.0.mlp.c_fc.weight"] == MatrixView("in_out")
    assert views["transformer.h.0.mlp.c_fc.weight"].shape((32, 128)) == (128, 32)
    assert views["transformer.h.0.attn.c_attn.weight"] == MatrixView("in_out", 3)
    vit = {i.name: i.view for i in describe_parameters(_tv_vit()[0])}
    assert vit["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"] == MatrixView("out_in", 3)
    assert vit["encoder.pos_embedding"] == MatrixView("table")  # (1, 17, 32): 17 rows of 32
    assert vit["class_token"] == MatrixView("vector")
    lstm = {i.name: i.view for i in describe_parameters(_lstm()[0])}
    assert lstm["lstm.weight_ih_l0"] == MatrixView("out_in", 4) and lstm["lstm.weight_hh_l1"].blocks == 4
    tv = {i.name: i for i in describe_parameters(_tv_convnext()[0])}
    assert tv["features.1.0.layer_scale"].view == MatrixView("vector")


def test_a_lone_stateful_block_is_still_the_input_layer():
    # no embedding module: the first projection (the LSTM's input weights) is the input layer
    model = nn.Sequential(nn.LSTM(8, 16, batch_first=True))
    roles = {i.name: i.role for i in describe_parameters(model)}
    assert roles["0.weight_ih_l0"] == "embedding" and roles["0.weight_hh_l0"] == "output"


# --------------------------------------------------------------------------- training a few steps

POLICY = {"rules": [
    {"name": "emb", "match": {"role": "embedding", "ndim": ">=2"}, "optimizer": "adamw", "lr": 1e-3,
     "weight_decay": 0.0, "constraint": "sphere", "optional": True},
    {"name": "hidden", "match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02, "constraint": "stiefel",
     "split_packed": True},
    {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0},
]}


class _Wrapped(OptLabMixin, pl.LightningModule):
    def __init__(self, net, make_batch, loss_fn, policy):
        super().__init__(policy=policy)
        self.net, self.make_batch, self.loss_fn = net, make_batch, loss_fn
        self.losses = []

    def training_step(self, batch, batch_idx):
        x = self.make_batch(torch.Generator().manual_seed(batch_idx))
        loss = self.loss_fn(self.net(x), x)
        self.losses.append(float(loss))
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(3, 1), batch_size=1)


@pytest.mark.parametrize("key", list(BUILDERS))
def test_sphere_stiefel_muon_policy_trains_and_constraints_hold(key, tmp_path):
    torch.manual_seed(0)
    net, make_batch, loss_fn = BUILDERS[key]()
    if key == "transformer":
        net.eval()  # dropout off: the loss is compared across steps only for finiteness anyway
    model = _Wrapped(net, make_batch, loss_fn, POLICY)
    monitor = SpectralMonitor(every_n_steps=1, wait_if_busy=True)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ManifoldRetraction(), monitor])
    trainer.fit(model)
    assert len(model.losses) == 3 and all(math.isfinite(v) for v in model.losses), model.losses
    infos = {i.name: i for i in describe_parameters(model)}
    for group in trainer.optimizers[0].param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            view = MatrixView.parse(group["matrix_views"][group["param_names"].index(name)])
            W = (view.to_matrix(p.detach()) if view.is_matrix else p.detach().reshape(1, -1)).double()
            if group["constraint"] == "stiefel":
                mats = W if W.ndim == 3 else W[None]
                for m in mats:  # float64 check, independent of the retraction's own distance
                    k = min(m.shape)
                    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
                    err = (gram - torch.eye(k, dtype=torch.float64)).norm() / math.sqrt(k)
                    assert err < 2e-3, (key, name, float(err))
            elif group["constraint"] == "sphere":
                norms = W.norm(dim=-1)
                norms = norms[norms != 0]  # a zero row (BERT's padding embedding) stays zero
                assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4), (key, name)
            if group["name"] == "hidden":
                assert infos[name].role == "hidden"
    assert monitor.skipped == 0
    # the monitor logged figures for every tracked matrix of the hidden group
    assert trainer.callback_metrics is not None


# --------------------------------------------------------------------------- one update, two layouts

def test_muon_update_on_hf_conv1d_equals_the_same_layer_as_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 32)  # y = x @ W + b, W (in 32, out 96)
    linear = nn.Linear(32, 96)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    x = torch.randn(64, 32)  # a full-rank gradient
    for module in (conv, linear):
        module(x).square().sum().backward()
    policy = {"rules": [{"match": {"ndim": 2}, "optimizer": "muon", "lr": 0.02, "ns_dtype": "float32"},
                        {"match": {}, "optimizer": "adamw"}]}
    updates = []
    for module in (conv, linear):
        before = module.weight.detach().clone()
        build_optimizer(module, policy).step()
        updates.append(module.weight.detach() - before)
    torch.testing.assert_close(updates[0].T, updates[1], rtol=1e-5, atol=1e-7)
    # the 'original' shape scale is sqrt(max(1, 96/32)) = 1.73 for both (1.0 if read as 32 x 96):
    # ||update|| = lr * scale * ||polar||_F, ||polar||_F ~ sqrt(32) up to Newton-Schulz's spread
    scale = updates[1].norm().item() / (0.02 * math.sqrt(32))
    assert 1.5 < scale < 1.95, scale


def test_split_packed_muon_equals_separate_q_k_v_layers():
    """Muon with ``split_packed`` on a fused QKV orthogonalizes each block: the same update as
    three separate Linear layers (the layout of Llama-style models)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, bias=False)
    q, k, v = (nn.Linear(16, 16, bias=False) for _ in range(3))
    grad = torch.randn(48, 16)
    for i, layer in enumerate((q, k, v)):
        layer.weight.grad = grad[16 * i:16 * (i + 1)].clone()
    mha.in_proj_weight.grad = grad.clone()
    mha.out_proj.weight.grad = torch.zeros(16, 16)
    rule = {"match": {"name": "*in_proj_weight"}, "optimizer": "muon", "lr": 0.02, "ns_dtype": "float32",
            "split_packed": True}
    before = mha.in_proj_weight.detach().clone()
    build_optimizer(mha, [rule, {"match": {}, "optimizer": "sgd", "lr": 0.0}]).step()
    packed = mha.in_proj_weight.detach() - before
    separate = []
    for layer in (q, k, v):
        before = layer.weight.detach().clone()
        build_optimizer(layer, [{"match": {}, "optimizer": "muon", "lr": 0.02, "ns_dtype": "float32"}]).step()
        separate.append(layer.weight.detach() - before)
    torch.testing.assert_close(packed, torch.cat(separate), rtol=1e-5, atol=1e-7)
    # without split_packed the fused matrix is one 48 x 16 polar factor: a different update
    mha2 = nn.MultiheadAttention(16, 2, bias=False)
    mha2.in_proj_weight.grad = grad.clone()
    before = mha2.in_proj_weight.detach().clone()
    build_optimizer(mha2, [{**rule, "split_packed": False}, {"match": {}, "optimizer": "sgd", "lr": 0.0}]).step()
    assert not torch.allclose(mha2.in_proj_weight.detach() - before, packed, atol=1e-4)


def test_sinkgd_and_sparkles_read_hf_conv1d_as_its_linear_twin():
    from transformers.pytorch_utils import Conv1D

    for rule in ({"optimizer": "sinkgd", "lr": 0.01}, {"optimizer": "sparkles", "lr": 0.01},
                 {"optimizer": "sinkhorn_tanh", "lr": 0.01}):
        torch.manual_seed(0)
        conv, linear = Conv1D(24, 8), nn.Linear(8, 24)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
        grad = torch.randn(24, 8)
        conv.weight.grad, linear.weight.grad = grad.T.clone(), grad.clone()
        conv.bias.grad = linear.bias.grad = torch.zeros(24)
        deltas = []
        for module in (conv, linear):
            before = module.weight.detach().clone()
            build_optimizer(module, [{"match": {}, **rule}]).step()
            deltas.append(module.weight.detach() - before)
        torch.testing.assert_close(deltas[0].T, deltas[1], rtol=1e-5, atol=1e-7, msg=str(rule))


def test_matrix_rules_refuse_a_per_channel_scale_with_the_fix():
    torch.manual_seed(0)
    net = _tv_convnext()[0]
    with pytest.raises(ValueError, match=r"features\.1\.0\.layer_scale.*a vector.*Match by role"):
        build_optimizer(net, [{"match": {"ndim": ">=2"}, "optimizer": "muon"}, {"match": {}, "optimizer": "adamw"}])


def test_role_policy_keeps_muon_off_convnext_layer_scale():
    torch.manual_seed(0)
    net = _tv_convnext()[0]
    opt = build_optimizer(net, POLICY)
    hidden = next(g for g in opt.param_groups if g["name"] == "hidden")
    assert not any(n.endswith("layer_scale") for n in hidden["param_names"])


def test_sphere_constraint_normalizes_rows_of_the_matrix_view(tmp_path):
    from transformers.pytorch_utils import Conv1D

    class Net(OptLabMixin, pl.LightningModule):
        def __init__(self):
            super().__init__(policy=[{"match": {"name": ["proj.weight", "pos"]}, "optimizer": "sgd", "lr": 0.1,
                                      "constraint": "sphere"}, {"match": {}, "optimizer": "sgd", "lr": 0.1}])
            self.proj = Conv1D(12, 6)  # (in 6, out 12): 12 output units, each a column
            self.pos = nn.Parameter(torch.randn(1, 5, 6))  # 5 table entries of 6

        def training_step(self, batch, batch_idx):
            return self.proj(batch[0] + self.pos).square().mean()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 5, 6)), batch_size=2)

    model = Net()
    pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(model)
    torch.testing.assert_close(model.proj.weight.detach().norm(dim=0), torch.ones(12))
    torch.testing.assert_close(model.pos.detach().norm(dim=-1), torch.ones(1, 5))


def test_explain_shows_views_ties_and_routing():
    torch.manual_seed(0)
    table = explain(_gpt2()[0], POLICY)
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "(= lm_head.weight)" in lines["transformer.wte.weight"]
    assert "3 x 32x32 (stored in,out)" in lines["transformer.h.0.attn.c_attn.weight"]
    assert "128x32 (stored in,out)" in lines["transformer.h.0.mlp.c_fc.weight"]
    assert lines["transformer.h.0.mlp.c_fc.weight"].split()[-3:] == ["hidden", "muon", "stiefel"]
