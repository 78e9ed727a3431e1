"""Measurement callbacks in short CPU fits: TensorBoard tags, gradient semantics, timing, LR scaling."""

import copy
import math
import statistics
import time

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optlab.callbacks import (
    ComponentGradientAnalysis,
    ModularLRScaling,
    NewtonSchulzAnalysis,
    SpectralMonitor,
    StepTimeMonitor,
)
from lightning_optlab.policy import build_optimizer

POLICY = {"rules": [
    {"match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.05, "name": "hidden"},
    {"match": {"role": "embedding"}, "optimizer": "adamw", "lr": 1e-3, "name": "input"},
    {"match": {}, "optimizer": "adamw", "lr": 1e-3, "name": "rest"},
]}


class Tiny(L.LightningModule):
    def __init__(self, d_in=12, width=16, classes=5, policy=POLICY, scheduler=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))
        self.policy, self.scheduler = policy, scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = build_optimizer(self, self.policy)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def loader(n=64, d_in=12, classes=5, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 6)
    return L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=callbacks,
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                     log_every_n_steps=1, accelerator="cpu", devices=1, **kw)


def read_events(log_dir):
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def np_effective_rank(A):
    s = np.linalg.svd(A, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_fit_with_all_callbacks_writes_tensorboard_tags(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    initial = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters() if p.ndim == 2}
    cbs = [
        StepTimeMonitor(log_every_n_steps=2),
        SpectralMonitor(every_n_steps=2, image_every_n_steps=4, top_k=3, wait_if_busy=True),
        NewtonSchulzAnalysis(every_n_steps=2, steps=(1, 5), log_per_matrix=True, wait_if_busy=True),
        ComponentGradientAnalysis(every_n_steps=2, wait_if_busy=True),
        ModularLRScaling(depth_scaling="inv_sqrt", adaptation="grad_norm", log_every_n_steps=1),
    ]
    tr = trainer(tmp_path, cbs)
    tr.fit(model, loader())
    ea = read_events(tr.logger.log_dir)
    scalars, hists, images = set(ea.Tags()["scalars"]), set(ea.Tags()["histograms"]), set(ea.Tags()["images"])
    expected = set()
    for kind in ("weights", "gradients"):
        for scope in ("component/input", "component/hidden", "component/output", "group/hidden", "group/input",
                      "group/rest", "matrix/net.2.weight"):
            for m in ("effective_rank", "stable_rank", "condition_number", "top3_concentration", "spectral_norm"):
                expected.add(f"spectral/{kind}/{scope}/{m}")
    for part in ("forward_backward", "optimizer", "retraction", "monitors", "callbacks", "other", "total"):
        expected.add(f"step_time/{part}_ms")
    expected |= {"step_time/optimizer_share", "step_time/monitors_share", "throughput/samples_per_sec"}
    for s in (1, 5):
        for f in ("cosine", "angle_deg", "information_loss", "orthogonality_error"):
            expected |= {f"ns_analysis/steps_{s}/{f}", f"ns_analysis/matrix/net.4.weight/steps_{s}/{f}"}
    for c in ("input", "hidden", "output"):
        for f in ("effective_rank", "relative_effective_rank", "ns_effective_rank", "benefit_ratio", "information_loss"):
            expected.add(f"gradient_analysis/{c}/{f}")
    for g in ("hidden", "input", "rest"):
        expected |= {f"lr_scaling/{g}/effective_lr", f"lr_scaling/{g}/multiplier", f"lr_scaling/{g}/depth"}
    assert not expected - scalars, sorted(expected - scalars)
    for kind in ("weights", "gradients"):
        for name in ("net.0.weight", "net.2.weight", "net.4.weight", "net.6.weight"):
            assert f"spectral/{kind}/spectrum/{name}" in hists
        assert f"spectral/{kind}/spectrum_plot/net.2.weight" in images
    assert "gradient_analysis/recommendations/text_summary" in ea.Tags()["tensors"]
    # every cadence step (0, 2, 4) was measured and logged before fit ended
    assert [e.step for e in ea.Scalars("spectral/gradients/component/hidden/effective_rank")] == [0, 2, 4]
    assert [e.step for e in ea.Images("spectral/weights/spectrum_plot/net.2.weight")] == [0, 4]
    img = ea.Images("spectral/weights/spectrum_plot/net.2.weight")[0]
    assert img.width > 100 and img.height > 100
    # step 0 weights are the initial weights: figures against a numpy reference
    ev = ea.Scalars("spectral/weights/matrix/net.2.weight/effective_rank")[0]
    assert ev.step == 0 and ev.value == pytest.approx(np_effective_rank(initial["net.2.weight"]), rel=1e-4)
    h = ea.Histograms("spectral/weights/spectrum/net.0.weight")[0]
    s0 = np.linalg.svd(initial["net.0.weight"], compute_uv=False)
    assert h.step == 0 and h.histogram_value.num == len(s0)
    assert h.histogram_value.max == pytest.approx(s0.max(), rel=1e-5)
    # built in the worker (histogram_stats), written raw: the same numbers numpy gives
    assert h.histogram_value.min == pytest.approx(s0.min(), rel=1e-4, abs=1e-6)
    assert h.histogram_value.sum == pytest.approx(s0.sum(), rel=1e-5)
    assert h.histogram_value.sum_squares == pytest.approx((s0 ** 2).sum(), rel=1e-5)
    assert sum(h.histogram_value.bucket) == len(s0)
    ref_counts, _ = np.histogram(s0, bins=len(h.histogram_value.bucket) - 1)
    assert list(h.histogram_value.bucket)[1:] == ref_counts.tolist()
    comp = ea.Scalars("spectral/weights/component/hidden/effective_rank")[0]
    hidden_ref = np.mean([np_effective_rank(initial[n]) for n in ("net.2.weight", "net.4.weight")])
    assert comp.value == pytest.approx(hidden_ref, rel=1e-4)
    # recommendation table in the log dir
    report = (tmp_path / "run" / "version_0" / "gradient_recommendations.md").read_text()
    assert "| hidden |" in report and "| input |" in report and "| output |" in report
    assert "sgd" in report and "adamw" in report  # the rules the components were trained with


def reference_accumulated_grads(model, batches, autocast_dtype=None):
    """d(mean over micro-batches of the loss)/dW by hand, as Lightning accumulates it."""
    ref = copy.deepcopy(model)
    ref.zero_grad()
    for x, y in batches:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(ref(x), y) / len(batches)
        loss.backward()
    return {n: p.grad.detach().double() for n, p in ref.named_parameters() if p.ndim == 2}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-gradscaler"])
def test_gradient_metrics_see_accumulated_unscaled_gradient(tmp_path, precision):
    torch.manual_seed(1)
    model = Tiny()
    dl = loader(n=32, batch_size=8)
    batches = [b for _, b in zip(range(3), dl)]
    autocast = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed-gradscaler": torch.float16}[precision]
    ref = reference_accumulated_grads(model, batches, autocast)
    kw = {"precision": precision} if precision != "16-mixed-gradscaler" else {
        # fp16 AMP with a loss scaler on CPU: gradients are 2**12 x too large until unscaled
        "plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))]}
    spec = SpectralMonitor(every_n_steps=1, weights=False, image_every_n_steps=None, wait_if_busy=True)
    comp = ComponentGradientAnalysis(every_n_steps=1, wait_if_busy=True)
    tr = trainer(tmp_path, [spec, comp], max_steps=1, accumulate_grad_batches=3, **kw)
    tr.fit(model, dl)
    assert spec.last_step == 0
    rtol = {"32-true": 1e-4, "bf16-mixed": 2e-2, "16-mixed-gradscaler": 5e-3}[precision]
    for name, G in ref.items():
        s_ref = np.linalg.svd(G.numpy(), compute_uv=False)
        s = spec.last_spectra[("gradients", name)].double().numpy()
        np.testing.assert_allclose(s[:4], s_ref[:4], rtol=rtol, err_msg=name)
    hidden = [np_effective_rank(ref[n].numpy()) for n in ("net.2.weight", "net.4.weight")]
    assert comp.last_metrics["gradient_analysis/hidden/effective_rank"] == pytest.approx(np.mean(hidden), rel=5 * rtol)


class _Stamp(L.Callback):
    """Independent step clock: first callback's batch start to last callback's batch end."""

    def __init__(self, role, shared):
        self.role, self.shared = role, shared

    def on_train_batch_start(self, *args):
        if self.role == "first":
            self.shared["t0"] = time.perf_counter()

    def on_train_batch_end(self, *args):
        if self.role == "last":
            self.shared.setdefault("ms", []).append((time.perf_counter() - self.shared["t0"]) * 1000)


def test_step_time_parts_add_up_to_measured_step_time(tmp_path):
    torch.manual_seed(0)
    model = Tiny(d_in=128, width=256, classes=10)
    dl = loader(n=64 * 30, d_in=128, classes=10, batch_size=64)
    shared = {}
    st = StepTimeMonitor(log_every_n_steps=5)
    cbs = [_Stamp("first", shared), st, SpectralMonitor(every_n_steps=5, image_every_n_steps=None),
           NewtonSchulzAnalysis(every_n_steps=5, steps=(1, 3))]
    try:
        from lightning_optlab.callbacks import ManifoldRetraction
        cbs.append(ManifoldRetraction({"net.0.weight": "sphere", "net.2.weight": "stiefel"}))
        with_retraction = True
    except Exception:  # the retraction callback belongs to another part of the package
        with_retraction = False
    cbs.append(_Stamp("last", shared))
    tr = trainer(tmp_path, cbs, max_steps=24)
    tr.fit(model, dl)
    recs = list(st.records)
    assert len(recs) == 24 == len(shared["ms"])
    ratios = []
    for r, ref in zip(recs[2:], shared["ms"][2:]):  # first steps: warm-up
        parts = sum(r[f"{p}_ms"] for p in ("forward_backward", "optimizer", "retraction", "monitors", "callbacks"))
        assert min(r["forward_backward_ms"], r["optimizer_ms"], r["monitors_ms"]) > 0
        ratios.append(parts / ref)
    assert 0.9 <= statistics.median(ratios) <= 1.1, ratios
    if with_retraction:
        assert statistics.median(r["retraction_ms"] for r in recs) > 0
    monitor_steps = [r["monitors_ms"] for r in recs if int(r["step"]) % 5 == 0]
    quiet_steps = [r["monitors_ms"] for r in recs if int(r["step"]) % 5]
    assert statistics.median(monitor_steps) > statistics.median(quiet_steps)  # the snapshots are counted
    ea = read_events(tr.logger.log_dir)
    steps = [e.step for e in ea.Scalars("step_time/total_ms")]
    assert steps == [4, 9, 14, 19, 23]
    sps = ea.Scalars("throughput/samples_per_sec")[0].value
    window = recs[:5]
    assert sps == pytest.approx(5 * 64 / (sum(r["total_ms"] for r in window) / 1000), rel=1e-4)
    assert "throughput/tokens_per_sec" not in ea.Tags()["scalars"]  # float features: no tokens


class TinyLM(L.LightningModule):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.emb(x)).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # a plain optimizer: roles by fallback


def test_tokens_per_second_from_token_batches_and_plain_optimizer(tmp_path):
    x = torch.randint(0, 11, (32, 7))
    dl = DataLoader(TensorDataset(x, x), batch_size=4)
    st = StepTimeMonitor(log_every_n_steps=4)
    spec = SpectralMonitor(every_n_steps=2, image_every_n_steps=None, wait_if_busy=True)
    trainer(tmp_path, [st, spec], max_steps=4).fit(TinyLM(), dl)
    rec = st.records[0]
    assert rec["samples"] == 4 and rec["tokens"] == 28
    assert "spectral/weights/component/input/effective_rank" in spec.last_metrics  # nn.Embedding -> input
    assert "spectral/weights/component/output/effective_rank" in spec.last_metrics
    ea = read_events(str(tmp_path / "run" / "version_0"))
    tps, sps = ea.Scalars("throughput/tokens_per_sec")[0].value, ea.Scalars("throughput/samples_per_sec")[0].value
    assert tps == pytest.approx(7 * sps, rel=1e-6)


class _LrProbe(L.Callback):
    """Reads the lr the scheduler set (batch start) and the lr the step uses (before the step)."""

    def __init__(self):
        self.base, self.used, self.grad, self.w_before, self.w_after = [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.base.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.used.append([g["lr"] for g in optimizer.param_groups])
        self.grad.append([[p.grad.detach().clone() for p in g["params"]] for g in optimizer.param_groups])
        self.w_before.append(pl_module.net[2].weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.w_after.append(pl_module.net[2].weight.detach().clone())


SGD_POLICY = {"rules": [
    {"match": {"role": "embedding"}, "optimizer": "sgd", "lr": 0.1, "name": "input"},
    {"match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.1, "name": "hidden"},
    {"match": {}, "optimizer": "sgd", "lr": 0.1, "name": "rest"},
]}


def test_lr_scaling_multiplies_the_scheduler_lr_and_restores_it(tmp_path):
    torch.manual_seed(0)
    # ExponentialLR is chainable: it multiplies the lr it finds, so a multiplier left in place would compound
    model = Tiny(policy=SGD_POLICY, scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5))
    probe = _LrProbe()
    scaling = ModularLRScaling(depth_scaling="linear", min_factor=0.25, log_every_n_steps=1)
    tr = trainer(tmp_path, [scaling, probe], max_steps=4)
    tr.fit(model, loader())
    # depths by first parameter position: input=1 (net.0.weight), hidden=2 (net.2.weight), rest=3 (net.0.bias? no:
    # 'rest' holds biases and the output; its first parameter net.0.bias comes right after net.0.weight)
    assert scaling._group_depth == [1, 3, 2]
    factors = [1.0, 0.25, 0.625]
    for t in range(4):
        assert probe.base[t] == pytest.approx([0.1 * 0.5 ** t] * 3)  # the scheduler's own values
        assert probe.used[t] == pytest.approx([0.1 * 0.5 ** t * f for f in factors])
        # the update the optimizer made used the scaled lr: W' = W - lr_used * G (SGD, no momentum)
        g = probe.grad[t][1][0]
        torch.testing.assert_close(probe.w_after[t], probe.w_before[t] - probe.used[t][1] * g)
    ea = read_events(tr.logger.log_dir)
    assert [round(e.value, 8) for e in ea.Scalars("lr_scaling/hidden/effective_lr")] == [
        round(0.1 * 0.5 ** t * 0.25, 8) for t in range(4)]
    assert scaling.state_dict() == {"adaptive": {}}


def test_lr_scaling_grad_norm_balances_update_norms_and_resumes(tmp_path):
    torch.manual_seed(0)
    probe = _LrProbe()
    scaling = ModularLRScaling(adaptation="grad_norm", ema=0.0, min_multiplier=1e-3, max_multiplier=1e3)
    trainer(tmp_path, [scaling, probe], max_steps=3).fit(Tiny(policy=SGD_POLICY), loader())
    for t in range(3):
        u = [lr * math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
             for lr, grads in zip(probe.used[t], probe.grad[t])]
        assert u == pytest.approx([u[0]] * 3, rel=1e-5)  # equal shares of lr * ||G||
    state = scaling.state_dict()
    assert set(state["adaptive"]) == {"input", "hidden", "rest"}
    resumed = ModularLRScaling(adaptation="grad_norm")
    resumed.load_state_dict(state)
    assert resumed.adaptive == state["adaptive"]


@pytest.mark.parametrize("make, match", [
    (lambda: SpectralMonitor(every_n_steps=0), "every_n_steps=50"),
    (lambda: SpectralMonitor(every_n_steps=10, image_every_n_steps=15), "multiple of every_n_steps"),
    (lambda: SpectralMonitor(weights=False, gradients=False), "enable one"),
    (lambda: SpectralMonitor(top_k=0), "top_k=5"),
    (lambda: NewtonSchulzAnalysis(steps=(0,)), "positive integers"),
    (lambda: NewtonSchulzAnalysis(components=("middle",)), "input"),
    (lambda: NewtonSchulzAnalysis(source="adam"), "momentum"),
    (lambda: ComponentGradientAnalysis(ns_steps=0), "ns_steps=5"),
    (lambda: ModularLRScaling(depth_scaling="cosine"), "inv_sqrt"),
    (lambda: ModularLRScaling(adaptation="lars"), "trust_ratio"),
    (lambda: StepTimeMonitor(log_every_n_steps=-1), "log_every_n_steps"),
])
def test_bad_arguments_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_lr_scaling_unknown_group_names_the_groups(tmp_path):
    tr = trainer(tmp_path, [ModularLRScaling(depths={"blocks": 2})], max_steps=1)
    with pytest.raises(ValueError, match=r"its groups are \['hidden', 'input', 'rest'\]"):
        tr.fit(Tiny(), loader())


def test_spectral_monitor_gram_method_matches_float64_svd(tmp_path):
    """method='gram' (the default on CUDA) on CPU: same tags, spectra equal to a float64 SVD of
    the weights at the snapshot step."""
    torch.manual_seed(0)
    model = Tiny()
    initial = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters() if p.ndim == 2}
    spec = SpectralMonitor(every_n_steps=2, image_every_n_steps=None, wait_if_busy=True, method="gram")
    trainer(tmp_path, [spec], max_steps=1).fit(model, loader())
    assert spec.last_step == 0
    for name, W in initial.items():
        s_ref = np.linalg.svd(W, compute_uv=False)
        s = spec.last_spectra[("weights", name)].double().numpy()
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-7 * s_ref[0], err_msg=name)
    assert spec.last_metrics["spectral/weights/matrix/net.2.weight/effective_rank"] == pytest.approx(
        np_effective_rank(initial["net.2.weight"]), rel=1e-5)
    assert "spectral/gradients/component/hidden/condition_number" in spec.last_metrics


def test_spectral_monitor_method_arguments():
    with pytest.raises(ValueError, match="method='eig'.*'auto', 'gram_host', 'svd', 'gram', 'lanczos'"):
        SpectralMonitor(method="eig")
    with pytest.raises(ValueError, match="gram_dtype='float16'.*float64"):
        SpectralMonitor(gram_dtype="float16")


def test_background_worker_uses_its_own_share_of_cpu_threads():
    """The worker's torch ops run with half the intra-op threads (or the given count); the
    training thread keeps its own count (torch.set_num_threads is per thread)."""
    from lightning_optlab.callbacks._worker import BackgroundWorker

    main_threads = torch.get_num_threads()
    for threads, expected in ((None, max(1, main_threads // 2)), (1, 1)):
        worker = BackgroundWorker("probe", threads=threads)
        assert worker.submit("t", torch.get_num_threads)
        assert worker.flush() == [("t", expected)]
        worker.close()
        assert torch.get_num_threads() == main_threads
    with pytest.raises(ValueError, match="probe: threads must be >= 1"):
        BackgroundWorker("probe", threads=0)


# --- method="gram_host" (the CUDA default), forced on CPU tensors -------------------------------


class _SnapshotProbe(L.Callback):
    """After the monitor (wait_if_busy=True: its snapshot is logged within the hook): float64
    copies of what it measured, and the spectra it produced, per snapshot step."""

    def __init__(self, monitor, every, nan_at=None):
        self.monitor, self.every, self.nan_at = monitor, every, nan_at
        self.tensors, self.spectra, self.metrics = {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step % self.every:
            return
        self.tensors[step] = {(kind, n): (p if kind == "weights" else p.grad).detach().double().clone()
                              for n, p in pl_module.named_parameters() if p.ndim >= 2
                              for kind in ("weights", "gradients")}
        assert self.monitor.last_step == step
        self.spectra[step] = {k: v.clone() for k, v in self.monitor.last_spectra.items()}
        self.metrics[step] = dict(self.monitor.last_metrics)


class _PoisonGradient(L.Callback):
    """Before the monitor: a NaN in one gradient at one step (what an AMP overflow leaves)."""

    def __init__(self, name, step):
        self.name, self.step = name, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            dict(pl_module.named_parameters())[self.name].grad[0, 0] = float("nan")


class TinyConv(L.LightningModule):
    """A conv kernel (flattened to (out, in*kh*kw)) next to linear layers of both orientations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # (4, 3, 3, 3) -> (4, 27)
        self.fc1 = nn.Linear(4 * 4 * 4, 10)  # (10, 64)
        self.fc2 = nn.Linear(10, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.conv(x)).flatten(1)
        return nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(h))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def np_figures(A, k):
    s = np.linalg.svd(A, compute_uv=False)
    p = s / s.sum()
    return {"effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "stable_rank": float((s ** 2).sum() / s[0] ** 2), "condition_number": float(s[0] / s[-1]),
            f"top{k}_concentration": float(s[:k].sum() / s.sum()), "spectral_norm": float(s[0])}


@pytest.mark.parametrize("gram_dtype", ["float64", "float32"])
def test_gram_host_on_cpu_matches_float64_svd_and_the_svd_path(tmp_path, monkeypatch, gram_dtype):
    """method='gram_host' forced on CPU tensors (Gram in the training thread, eigvalsh in the
    worker): spectra and logged figures equal numpy float64 SVDs of the measured tensors within
    the documented floor, and the logged tags and values equal those of method='svd' on the
    same run; one matrix per stack (GRAM_STACK_ELEMENTS=1) gives the same."""
    import lightning_optlab.callbacks._spectra as spectral_mod

    runs = {}
    for method, stack_elements in (("svd", None), ("gram_host", None), ("gram_host", 1)):
        if stack_elements is not None:
            monkeypatch.setattr(spectral_mod, "GRAM_STACK_ELEMENTS", stack_elements)
        torch.manual_seed(0)
        mon = SpectralMonitor(every_n_steps=2, top_k=3, wait_if_busy=True, method=method, gram_dtype=gram_dtype)
        probe = _SnapshotProbe(mon, 2)
        tr = trainer(tmp_path / f"{method}_{stack_elements}", [mon, probe], max_steps=4)
        tr.fit(Tiny(), loader())
        runs[(method, stack_elements)] = (probe, read_events(tr.logger.log_dir))
        monkeypatch.undo()
    floor = 1e-7 if gram_dtype == "float64" else 2e-3  # of sigma_max (singular_values_gram's doc)
    ref_probe, ref_ea = runs[("svd", None)]
    for key in (("gram_host", None), ("gram_host", 1)):
        probe, ea = runs[key]
        assert sorted(probe.spectra) == [0, 2]
        for step, tensors in probe.tensors.items():
            torch.testing.assert_close(tensors, ref_probe.tensors[step])  # the same run
            for (kind, name), T in tensors.items():
                s_ref = np.linalg.svd(T.numpy(), compute_uv=False)
                s = probe.spectra[step][(kind, name)]
                assert s.dtype == torch.float32 and s.shape == s_ref.shape
                err = np.abs(s.double().numpy() - s_ref)
                assert np.all(err <= floor * s_ref[0] + 1e-6 * s_ref), (key, step, kind, name, err.max() / s_ref[0])
                figs = np_figures(T.numpy(), 3)
                for metric, value in figs.items():
                    got = probe.metrics[step][f"spectral/{kind}/matrix/{name}/{metric}"]
                    if metric == "condition_number" and value > 1e-2 / floor:
                        # beyond the floor (rank-deficient gradients of batch 8): only a lower bound
                        assert got >= 1e-2 / floor, (key, step, kind, name, got, value)
                        continue
                    # float32: noise singular values (~1e-3 sigma_max) of the rank-deficient gradients
                    # add a little entropy (documented: effective rank within 0.5%)
                    rel = 1e-4 if gram_dtype == "float64" else 5e-2 if metric == "condition_number" else 5e-3
                    assert got == pytest.approx(value, rel=rel), (key, step, kind, name, metric)
        # TensorBoard read back: same tags and steps as the svd path, values within the precision
        tags = set(ea.Tags()["scalars"])
        assert tags == set(ref_ea.Tags()["scalars"])
        assert set(ea.Tags()["histograms"]) == set(ref_ea.Tags()["histograms"])
        for tag in (t for t in tags if t.startswith("spectral/")):
            got, ref = ea.Scalars(tag), ref_ea.Scalars(tag)
            assert [e.step for e in got] == [e.step for e in ref] == [0, 2], tag
            if "gradients" in tag and "condition_number" in tag:
                continue  # rank-deficient gradients: both methods' sigma_min is rounding noise (checked above)
            rel = 5e-2 if gram_dtype == "float32" and "condition_number" in tag else 5e-3 if gram_dtype == "float32" else 1e-4
            for a, b in zip(got, ref):
                assert a.value == pytest.approx(b.value, rel=rel, abs=1e-6), tag
        assert ea.Scalars("spectral/gradients/nonfinite_matrices")[-1].value == 0


def test_gram_host_conv_kernel_and_nonfinite_gradient_left_out(tmp_path):
    """A NaN gradient is left out of that snapshot and counted; the other matrices (a conv kernel
    flattened, a wide and a tall linear weight) match numpy; the next snapshot measures it again."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dl = DataLoader(TensorDataset(torch.randn(12, 3, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g)),
                    batch_size=4)
    mon = SpectralMonitor(every_n_steps=1, wait_if_busy=True, method="gram_host", top_k=2)
    probe = _SnapshotProbe(mon, 1)
    tr = trainer(tmp_path, [_PoisonGradient("fc1.weight", 1), mon, probe], max_steps=2)
    tr.fit(TinyConv(), dl)
    assert sorted(probe.spectra) == [0, 1]
    assert ("gradients", "fc1.weight") in probe.spectra[0]
    assert ("gradients", "fc1.weight") not in probe.spectra[1]
    assert ("weights", "fc1.weight") in probe.spectra[1]
    assert probe.metrics[0]["spectral/gradients/nonfinite_matrices"] == 0
    assert probe.metrics[1]["spectral/gradients/nonfinite_matrices"] == 1
    for step in (0, 1):
        for key, s in probe.spectra[step].items():
            T = probe.tensors[step][key]
            A = T.reshape(T.shape[0], -1).numpy()
            s_ref = np.linalg.svd(A, compute_uv=False)
            np.testing.assert_allclose(s.double().numpy(), s_ref, rtol=1e-5, atol=1e-7 * s_ref[0], err_msg=str(key))
    assert probe.spectra[0][("weights", "conv.weight")].shape == (4,)
    ea = read_events(tr.logger.log_dir)
    assert [e.value for e in ea.Scalars("spectral/gradients/nonfinite_matrices")] == [0, 1]
    assert [e.step for e in ea.Scalars("spectral/gradients/matrix/fc1.weight/effective_rank")] == [0]
    assert [e.step for e in ea.Scalars("spectral/weights/matrix/fc1.weight/effective_rank")] == [0, 1]


def test_busy_worker_skips_snapshots_and_the_fit_end_logs_the_one_in_flight(tmp_path):
    """While the worker is busy with a snapshot the next ones are skipped (counted, warned, logged
    under their steps); at the end of the fit the snapshot in flight is waited for and logged."""
    import threading

    gate = threading.Event()
    mon = SpectralMonitor(every_n_steps=1, method="gram_host")
    compute = mon._engine._groups_from_grams

    def held(*args):
        gate.wait(30)  # the worker stays busy until the fit ends
        return compute(*args)

    mon._engine._groups_from_grams = held

    class Release(L.Callback):  # runs before the monitor's on_train_end flush
        def on_train_end(self, trainer, pl_module):
            assert mon._worker.busy
            gate.set()

    torch.manual_seed(0)
    model = Tiny()
    initial = model.net[2].weight.detach().double().numpy().copy()
    tr = trainer(tmp_path, [Release(), mon], max_steps=4)
    with pytest.warns(UserWarning, match="SpectralMonitor: the SVDs of the previous snapshot"):
        tr.fit(model, loader())
    assert mon.skipped_snapshots == 3 and mon.last_step == 0 and set(mon.worker_seconds) == {0}
    ea = read_events(tr.logger.log_dir)
    skipped = ea.Scalars("spectral/skipped_snapshots")
    assert [(e.step, e.value) for e in skipped] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    ev = ea.Scalars("spectral/weights/matrix/net.2.weight/effective_rank")
    assert [e.step for e in ev] == [0]
    assert ev[0].value == pytest.approx(np_effective_rank(initial), rel=1e-5)
    assert mon.state_dict() == {"skipped_snapshots": 3}


def test_auto_method_picks_gram_host_for_cuda_and_svd_for_cpu():
    assert SpectralMonitor().method_for(256, cuda=True) == "gram_host"
    assert SpectralMonitor().method_for(257, cuda=True) == "lanczos"
    assert SpectralMonitor(exact_max_k=1024).method_for(768, cuda=True) == "gram_host"
    assert SpectralMonitor().method_for(4096, cuda=False) == "svd"
    for method in ("gram_host", "svd", "gram"):
        assert {SpectralMonitor(method=method).method_for(k, c) for c in (True, False) for k in (8, 4096)} == {method}


def test_spectral_monitor_logs_scalars_to_a_non_tensorboard_logger_and_warns_about_histograms(tmp_path):
    """Without a TensorBoardLogger the merged TensorBoard event has nowhere to go: the scalars
    reach the logger through log_metrics, and the missing histogram support is said once."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    csv_logger = CSVLogger(tmp_path, name="csv")
    t = L.Trainer(max_steps=4, logger=csv_logger, callbacks=[SpectralMonitor(every_n_steps=2, wait_if_busy=True)],
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  log_every_n_steps=1, accelerator="cpu", devices=1)
    with pytest.warns(UserWarning, match="no logger takes histograms"):
        t.fit(Tiny(), loader())
    with open(f"{csv_logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    key = "spectral/weights/component/hidden/effective_rank"
    logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    assert [s for s, _ in logged] == [0, 2]
    assert all(v > 1.0 for _, v in logged)
