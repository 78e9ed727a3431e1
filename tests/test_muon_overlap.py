"""Muon's Newton-Schulz work during backward (MuonOverlap, MuonBackwardOverlap): the same steps as
the plain Muon step, bit for bit on CPU; the fallbacks where it would not be exact."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_optlab.optim.muon as muon_module
from lightning_optlab.optim import ModularOptimizer
from lightning_optlab.optim.muon_overlap import MuonOverlap
from lightning_optlab.policy import build_optimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def policy(nesterov=True, **muon):
    # Muon on every matrix: (16, 6), (16, 16) twice, (4, 16) -- same and different shapes.
    hp = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, **muon)
    return {"rules": [
        {"name": "matrices", "match": {"ndim": 2}, "optimizer": "muon", **hp},
        {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0},
    ]}


def make_mlp(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).to(device)


def batch(step, device="cpu", n=32):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=gen).to(device), torch.randint(0, 4, (n,), generator=gen).to(device)


def backward(model, step, device="cpu", scale=1.0, poison=False):
    x, y = batch(step, device)
    if poison:
        x[0, 0] = float("nan")
    (F.cross_entropy(model(x), y) * scale).backward()


def muon_buffers(opt):
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups if g["algorithm"] == "muon"
            for p in g["params"]]


def train(overlap, nesterov=True, steps=8, device="cpu", **muon):
    """Steps with an lr change at 3, a state_dict round trip into the same optimizer at 2 and into
    a fresh optimizer (and a fresh overlap) at 5."""
    model = make_mlp(device)
    opt = build_optimizer(model, policy(nesterov, **muon))
    ov = MuonOverlap(opt) if overlap else None
    counts = []
    for t in range(steps):
        if t == 2:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if t == 3:
            for g in opt.param_groups:
                g["lr"] *= 0.5
        if t == 5:
            saved = copy.deepcopy(opt.state_dict())
            opt = build_optimizer(model, policy(nesterov, **muon))
            opt.load_state_dict(saved)
            if ov is not None:
                counts.append(ov.overlapped_steps)
                ov.close()
                ov = MuonOverlap(opt)
        opt.zero_grad()
        if ov is not None:
            ov.arm()
        backward(model, t, device)
        if ov is not None:
            ov.disarm()
        opt.step()
    if ov is not None:
        counts.append(ov.overlapped_steps)
    return model, opt, counts


def assert_same(model_a, opt_a, model_b, opt_b, atol=0.0):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    for a, b in zip(muon_buffers(opt_a), muon_buffers(opt_b)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("nesterov", [True, False])
def test_overlapped_steps_equal_plain_steps_bit_for_bit_on_cpu(nesterov, monkeypatch):
    plain_model, plain_opt, _ = train(False, nesterov)
    start = make_mlp()
    # In overlapped steps no Newton-Schulz runs inside optimizer.step: the plain update is not called.
    real = muon_module.muon_update

    def forbidden(*args, **kwargs):
        raise AssertionError("the plain Muon update ran although the overlap had the directions")

    monkeypatch.setattr(muon_module, "muon_update", forbidden)
    model, opt, counts = train(True, nesterov)
    monkeypatch.setattr(muon_module, "muon_update", real)
    assert counts == [5, 3]  # every step (one muon group) used the pre-computed directions
    assert_same(model, opt, plain_model, plain_opt)  # same ops on CPU -> same bits
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 0.05


def test_unarmed_and_closed_overlap_leave_the_plain_step():
    model = make_mlp()
    opt = build_optimizer(model, policy())
    ov = MuonOverlap(opt)
    assert opt.param_groups[0]["_runtime"]["muon_overlap"] is ov
    backward(model, 0)
    opt.step()  # not armed: nothing pre-computed, plain step, no warning
    assert (ov.overlapped_steps, ov.plain_steps) == (0, 0)
    ov.close()
    assert "muon_overlap" not in opt.param_groups[0]["_runtime"]
    ov._armed = True  # as if armed: with the hooks removed nothing is computed during backward
    opt.zero_grad()
    backward(model, 1)
    assert ov._pending == {}
    opt.step()
    assert (ov.overlapped_steps, ov.plain_steps) == (0, 0)


def test_nan_gradient_is_refused_before_anything_changes_and_training_goes_on():
    def run(overlap):
        model = make_mlp()
        opt = build_optimizer(model, policy())
        ov = MuonOverlap(opt) if overlap else None
        for t in range(5):
            opt.zero_grad()
            if ov:
                ov.arm()
            backward(model, t, poison=(t == 2))
            if ov:
                ov.disarm()
            if t == 2:
                params = [p.detach().clone() for p in model.parameters()]
                buffers = muon_buffers(opt)
                with pytest.raises(FloatingPointError, match="non-finite gradient"):
                    opt.step()
                for p, q in zip(model.parameters(), params):
                    assert torch.equal(p, q)
                for b, c in zip(muon_buffers(opt), buffers):
                    assert torch.equal(b, c)
                continue
            opt.step()
        return model, opt, ov

    plain_model, plain_opt, _ = run(False)
    model, opt, ov = run(True)
    assert ov.overlapped_steps == 4 and ov.plain_steps == 0
    assert_same(model, opt, plain_model, plain_opt)


def test_gradient_clipping_after_backward_falls_back_to_the_plain_step_with_the_reason():
    def run(overlap):
        model = make_mlp()
        opt = build_optimizer(model, policy())
        ov = MuonOverlap(opt) if overlap else None
        for t in range(3):
            opt.zero_grad()
            if ov:
                ov.arm()
            backward(model, t)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
        return model, opt, ov

    plain_model, plain_opt, _ = run(False)
    with pytest.warns(UserWarning, match=r"gradient of '0.weight' changed after backward \(gradient clipping"):
        model, opt, ov = run(True)
    assert (ov.overlapped_steps, ov.plain_steps) == (0, 3)
    assert len(ov.fallback_reasons) == 1  # warned once, not per step
    assert_same(model, opt, plain_model, plain_opt)


@pytest.mark.parametrize("armed", ["last", "every", "first"])
def test_gradient_accumulation_is_exact_however_it_is_armed(armed):
    """Arming only the backward before a step is the intent; arming every micro-batch wastes work
    (each arm drops the last) and arming a non-last one is caught (the accumulation bumps the
    gradient's version): the steps are the plain ones in all three cases."""

    def run(overlap):
        model = make_mlp()
        opt = build_optimizer(model, policy())
        ov = MuonOverlap(opt) if overlap else None
        for t in range(3):
            opt.zero_grad()
            for micro in range(3):
                if ov and {"last": micro == 2, "every": True, "first": micro == 0}[armed]:
                    ov.arm()
                backward(model, 10 * t + micro, scale=1 / 3)
                if ov:
                    ov.disarm()
            opt.step()
        return model, opt, ov

    plain_model, plain_opt, _ = run(False)
    if armed == "first":
        with pytest.warns(UserWarning, match="changed after backward"):
            model, opt, ov = run(True)
        assert (ov.overlapped_steps, ov.plain_steps) == (0, 3)
    else:
        model, opt, ov = run(True)
        assert (ov.overlapped_steps, ov.plain_steps) == (3, 0)
    assert_same(model, opt, plain_model, plain_opt)


def test_hyperparameter_change_between_backward_and_step_falls_back():
    def run(overlap):
        model = make_mlp()
        opt = build_optimizer(model, policy())
        ov = MuonOverlap(opt) if overlap else None
        for t in range(3):
            opt.zero_grad()
            if ov:
                ov.arm()
            backward(model, t)
            if t == 1:
                opt.param_groups[0]["momentum"] = 0.5  # e.g. a momentum schedule between the two
            opt.step()
        return model, opt, ov

    plain_model, plain_opt, _ = run(False)
    with pytest.warns(UserWarning, match="hyperparameters of matrices changed between backward and step"):
        model, opt, ov = run(True)
    assert (ov.overlapped_steps, ov.plain_steps) == (2, 1)
    assert_same(model, opt, plain_model, plain_opt)


def test_overlap_is_refused_where_it_cannot_be_exact():
    model = make_mlp()
    with pytest.raises(RuntimeError, match="SGD is not a ModularOptimizer"):
        MuonOverlap(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no 'muon' param group"):
        MuonOverlap(ModularOptimizer(model.parameters(), algorithm="adamw", lr=1e-3))
    with pytest.raises(RuntimeError, match="ns_split=True needs an initialized torch.distributed process group"):
        MuonOverlap(build_optimizer(model, policy(ns_split=True)))


@cuda
@pytest.mark.parametrize("ns_dtype, atol", [("float32", 2e-5), ("auto", 1e-3)])
def test_overlapped_steps_equal_plain_steps_on_cuda(ns_dtype, atol):
    """On CUDA the plain step is the CUDA graph over stacked matrices; the overlap orthogonalizes
    one matrix per call on a side stream. cuBLAS may pick other kernels per batch size, so the
    results agree to rounding: fp32 NS to ~1e-6 per step, bf16 NS ('auto') to bf16's 2^-8 relative
    on an update of lr * O(0.25) entries per step (8 steps)."""
    plain_model, plain_opt, _ = train(False, device="cuda", ns_dtype=ns_dtype)
    model, opt, counts = train(True, device="cuda", ns_dtype=ns_dtype)
    torch.cuda.synchronize()
    assert counts == [5, 3]
    assert_same(model, opt, plain_model, plain_opt, atol=atol)


# ------------------------------------------------------------------------------- Lightning

L = pytest.importorskip("lightning.pytorch")
from lightning_optlab.callbacks import MuonBackwardOverlap  # noqa: E402
from lightning_optlab.callbacks.muon_overlap import overlap_fallback_reason  # noqa: E402


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return build_optimizer(self.net, policy())


def loader(n=64, batch_size=8):
    gen = torch.Generator().manual_seed(7)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def fit(callbacks, **kw):
    model = TinyModule()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )
    trainer.fit(model, loader())
    return model, trainer


@pytest.mark.parametrize("accumulate", [1, 3])
def test_callback_fit_equals_plain_fit(accumulate, caplog):
    plain, _ = fit([], accumulate_grad_batches=accumulate)
    cb = MuonBackwardOverlap()
    with caplog.at_level("INFO"):
        model, trainer = fit([cb], accumulate_grad_batches=accumulate)
    assert cb.reason is None
    assert "MuonBackwardOverlap: attached to 1 muon group(s), 4 matrices" in caplog.text
    steps = trainer.global_step
    assert steps == (8 if accumulate == 1 else 3)  # 8 batches; windows of 3 -> 3, 3, 2 (last batch steps)
    assert cb.armed_backwards == steps  # armed only before the backward a step follows
    assert (cb.overlapped_steps, cb.plain_steps) == (steps, 0)
    if accumulate > 1:
        assert f"accumulate_grad_batches={accumulate}: armed on the last micro-batch" in caplog.text
    assert cb.overlap is None  # closed at fit end: hooks removed
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_callback_falls_back_under_gradient_clipping_with_the_reason():
    plain, _ = fit([], gradient_clip_val=0.05)
    cb = MuonBackwardOverlap()
    with pytest.warns(UserWarning, match=r"MuonBackwardOverlap: not attached: gradient clipping \(gradient_clip_val=0.05\)"):
        model, _ = fit([cb], gradient_clip_val=0.05)
    assert cb.overlap is None and cb.armed_backwards == 0
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_fallback_reasons_for_ddp_amp_scaler_manual_optimization():
    opt = build_optimizer(make_mlp(), policy())

    def trainer(**kw):
        base = dict(gradient_clip_val=None, world_size=1, strategy=object(),
                    precision_plugin=types.SimpleNamespace(scaler=None), optimizers=[opt])
        return types.SimpleNamespace(**{**base, **kw})

    module = types.SimpleNamespace(automatic_optimization=True)
    assert overlap_fallback_reason(trainer(), module) is None
    assert "2 processes" in overlap_fallback_reason(trainer(world_size=2), module)
    scaled = trainer(precision_plugin=types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu")))
    assert "GradScaler" in overlap_fallback_reason(scaled, module)
    assert "gradient_clip_val=1.0" in overlap_fallback_reason(trainer(gradient_clip_val=1.0), module)
    assert "manual optimization" in overlap_fallback_reason(trainer(), types.SimpleNamespace(automatic_optimization=False))
    adamw_only = ModularOptimizer(make_mlp().parameters(), algorithm="adamw", lr=1e-3)
    assert "no 'muon' param group" in overlap_fallback_reason(trainer(optimizers=[adamw_only]), module)


def test_why_a_grad_scaler_is_refused_and_the_nan_check_is_not():
    """The version check cannot see AMP's fused unscale (no version bump): a GradScaler must be
    refused up front (the callback does). The same kernel with scale 1 is ModularOptimizer's NaN/Inf
    check, which is why that check does not defeat the overlap (the other tests step with it on)."""
    g = torch.randn(4, 4)
    before = g._version
    torch._amp_foreach_non_finite_check_and_unscale_([g], torch.zeros(1), torch.full((1,), 0.5))
    assert g._version == before
    p = nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.randn(4, 4)
    version = p.grad._version
    torch.nn.utils.clip_grad_value_([p], 0.1)
    assert p.grad._version > version  # clipping is seen


def test_backward_inside_autocast_does_not_change_the_directions():
    """Hooks run inside backward; a backward under autocast must not turn the fp32 Newton-Schulz
    of the hook into bf16 matmuls (the step, which it must equal, runs outside autocast)."""

    def run(overlap):
        model = make_mlp()
        opt = build_optimizer(model, policy())
        ov = MuonOverlap(opt) if overlap else None
        for t in range(3):
            opt.zero_grad()
            if ov:
                ov.arm()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                backward(model, t)
            opt.step()
        return model, opt, ov

    plain_model, plain_opt, _ = run(False)
    model, opt, ov = run(True)
    assert ov.overlapped_steps == 3
    assert_same(model, opt, plain_model, plain_opt)
