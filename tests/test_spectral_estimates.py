"""The Lanczos spectrum estimate against float64 SVDs: the bounds its docstrings state, on
flat, Marchenko-Pastur, power-law, exponential, low-rank-plus-noise and rank-deficient spectra,
and SpectralMonitor in each method on a GPT, figures checked at the measured step."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_optlab.callbacks import SpectralMonitor
from lightning_optlab.models import GPT
from lightning_optlab.spectral import lanczos
from lightning_optlab.spectral.metrics import spectrum_metrics

# the documented bounds (spectral/lanczos.py and SpectralMonitor's docstring)
BOUNDS = {"spectral_norm": 1e-2, "stable_rank": 1e-2, "topk_concentration": 2e-2, "effective_rank": 5e-2}


def with_spectrum(kind, m, n, gen):
    k = min(m, n)
    if kind == "marchenko_pastur":
        return torch.randn(m, n, generator=gen, dtype=torch.float64)
    i = torch.arange(k, dtype=torch.float64)
    s = {
        "flat": 1 + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64),
        "power_law": (i + 1) ** -1.0,
        "exponential": torch.exp(-i / 20),
        "low_rank_plus_noise": torch.exp(-i / 5) + 1e-2,
        "rank_8": torch.where(i < 8, 1 + i / 4, torch.zeros_like(i)),
        "rank_half": torch.where(i < k // 2, 0.5 + torch.rand(k, generator=gen, dtype=torch.float64), torch.zeros_like(i)),
    }[kind]
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return (U * s) @ V.T


SPECTRA = ("flat", "marchenko_pastur", "power_law", "exponential", "low_rank_plus_noise", "rank_8", "rank_half")


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("shape", [(256, 1024), (768, 768), (1536, 512)])
def test_estimate_within_the_documented_bounds_of_a_float64_svd(kind, shape):
    gen = torch.Generator().manual_seed(SPECTRA.index(kind))
    W = with_spectrum(kind, *shape, gen)
    s_ref = np.linalg.svd(W.numpy(), compute_uv=False)
    s = lanczos.estimate_singular_values(W.float())
    assert s.shape == (min(shape),) and s.dtype == torch.float64
    assert torch.all(s[:-1] >= s[1:]), "descending"
    ref = spectrum_metrics(torch.from_numpy(s_ref), k=5)
    est = spectrum_metrics(s, k=5)
    for figure, bound in BOUNDS.items():
        rel = abs(float(est[figure]) / float(ref[figure]) - 1)
        assert rel <= bound, (kind, shape, figure, rel)
    # ||W||_F is exact (up to the float32 Gram)
    assert float((s ** 2).sum()) == pytest.approx(float((s_ref ** 2).sum()), rel=1e-5)
    # the condition number is a lower bound (beyond the float32 Gram's resolution, ~1e3, it may
    # read inf, as the exact float32 methods do)
    # read inf, as the exact float32 methods do), up to the float32 rounding of its smallest node
    cond = float(ref["condition_number"])
    if cond < 1e6:
        assert float(est["condition_number"]) <= cond * (1.05 + 2e-6 * cond ** 2)
    if kind.startswith("rank_"):
        rank = int((s_ref > 1e-8 * s_ref[0]).sum())
        got = int((s > 1e-3 * s[0]).sum())
        # below the deflation rank exactly; above it, within the density's sampling error
        assert got == rank if rank <= lanczos.DEFAULT_RANK else abs(got - rank) <= 0.02 * rank, (got, rank)


def test_sketch_is_batched_deterministic_and_names_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    W = torch.stack([with_spectrum(kind, 300, 400, gen) for kind in ("power_law", "flat", "rank_8")]).float()
    batched = lanczos.estimate_singular_values(W)
    one_by_one = torch.stack([lanczos.estimate_singular_values(w) for w in W])
    # one batch or one matrix at a time: the same estimate up to the probes drawn
    for a, b in zip(batched, one_by_one):
        assert float(spectrum_metrics(a)["effective_rank"]) == pytest.approx(float(spectrum_metrics(b)["effective_rank"]), rel=3e-2)
    assert torch.equal(lanczos.estimate_singular_values(W, seed=3), lanczos.estimate_singular_values(W, seed=3))
    with pytest.raises(ValueError, match="rank must be in"):
        lanczos.sketch_matrices(torch.eye(8)[None], rank=8)
    with pytest.raises(ValueError, match="k <= n"):
        lanczos.sketch_matrices(torch.ones(1, 9, 8))
    with pytest.raises(ValueError, match="probes and steps must be >= 1"):
        lanczos.lanczos_tridiagonals(torch.eye(8)[None], probes=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        lanczos.estimate_gram(torch.ones(1, 2, 3), "fp8")


def test_lanczos_quadrature_integrates_polynomials_exactly():
    """A Gauss rule of m nodes is exact for polynomials of degree < 2m: with a probe on a known
    matrix, sum_i w_i theta_i^j equals q^T G^j q for j < 2m."""
    gen = torch.Generator().manual_seed(0)
    G = with_spectrum("flat", 40, 40, gen)
    G = (G @ G.T)[None]
    alpha, beta = lanczos.lanczos_tridiagonals(G, probes=1, steps=5, generator=torch.Generator().manual_seed(1))
    nodes, weights = lanczos.gauss_quadrature(alpha, beta)
    q = torch.randint(0, 2, (1, 40, 1), generator=torch.Generator().manual_seed(1)).double().mul(2).sub(1)
    q = q / q.norm()
    for j in range(10):
        exact = float((q.mT @ torch.linalg.matrix_power(G, j) @ q).squeeze())
        assert float((weights * nodes ** j).sum()) == pytest.approx(exact, rel=1e-9)


def test_monitor_options_are_checked():
    with pytest.raises(ValueError, match=r"estimate=\{'probe': \.\.\.\}\): unknown option; the estimate takes rank"):
        SpectralMonitor(estimate={"probe": 4})
    with pytest.raises(ValueError, match=r"estimate=\{'steps': 0\}\): give an integer >= 1"):
        SpectralMonitor(estimate={"steps": 0})
    with pytest.raises(ValueError, match=r"estimate=\{'gram': 'fp16'\}\): use one of bfloat16, float32"):
        SpectralMonitor(estimate={"gram": "fp16"})
    with pytest.raises(ValueError, match=r"exact_max_k=-1"):
        SpectralMonitor(exact_max_k=-1)


# --- the monitor on a GPT, in each method --------------------------------------------------------


class _Probe(L.Callback):
    """After the monitor (wait_if_busy=True: its snapshot is logged within the hook): float64
    copies of the tensors it measured and the figures it logged, per snapshot step."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.tensors, self.metrics = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step % self.monitor.every_n_steps:
            return
        assert self.monitor.last_step == step
        self.tensors[step] = {(kind, n): (p if kind == "weights" else p.grad).detach().double().clone()
                              for n, p in pl_module.named_parameters() if p.ndim >= 2
                              for kind in ("weights", "gradients")}
        self.metrics[step] = dict(self.monitor.last_metrics)


def _figures(T, k):
    s = np.linalg.svd(T, compute_uv=False)
    p = s / s.sum()
    return {"effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "stable_rank": float((s ** 2).sum() / s[0] ** 2), "condition_number": float(s[0] / s[-1]),
            f"top{k}_concentration": float(s[:k].sum() / s.sum()), "spectral_norm": float(s[0])}


def _fit(tmp_path, monitor, steps=3):
    torch.manual_seed(0)
    model = GPT(size="tiny", d_model=192, n_layers=1, n_heads=4, context_length=48,
                policy={"rules": [{"match": {}, "optimizer": "adamw", "lr": 1e-2}]})
    data = torch.randint(0, 256, (8 * steps, 49), generator=torch.Generator().manual_seed(0))
    probe = _Probe(monitor)
    tr = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=[monitor, probe],
                   max_steps=steps, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, log_every_n_steps=1, accelerator="cpu", devices=1)
    tr.fit(model, DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8))
    return probe


LOOSE = {"effective_rank": 5e-2, "stable_rank": 1e-2, "top3_concentration": 2e-2, "spectral_norm": 1e-2}


@pytest.mark.parametrize("method", ["svd", "gram", "gram_host", "lanczos", "mixed"])
def test_monitor_figures_match_float64_svds_of_the_measured_tensors(tmp_path, monkeypatch, method):
    """Every logged per-matrix figure at every snapshot step against a float64 SVD of the tensor
    the monitor measured: exact methods to float32 precision, the estimate within its bounds
    (``mixed``: what ``auto`` does on CUDA, exact below ``exact_max_k`` and the estimate above,
    forced on the CPU)."""
    kw = {"method": "lanczos" if method == "mixed" else method}
    if method == "mixed":
        from lightning_optlab.callbacks._spectra import SpectrumSnapshots

        monkeypatch.setattr(SpectrumSnapshots, "method_for",
                            lambda self, k, cuda: "gram_host" if k <= self.exact_max_k else "lanczos")
        kw = {"exact_max_k": 64}
    mon = SpectralMonitor(every_n_steps=2, top_k=3, wait_if_busy=True, **kw)
    probe = _fit(tmp_path, mon)
    assert sorted(probe.metrics) == [0, 2]
    checked = {"exact": 0, "estimated": 0}
    for step, tensors in probe.tensors.items():
        for (kind, name), T in tensors.items():
            k = min(T.shape)
            estimated = method == "lanczos" or (method == "mixed" and k > 64)
            for figure, value in _figures(T.numpy(), 3).items():
                got = probe.metrics[step][f"spectral/{kind}/matrix/{name}/{figure}"]
                if figure == "condition_number":
                    if estimated:
                        if value < 1e2:  # a lower bound in exact arithmetic; float32 ghosts
                            assert got <= value * 1.05, (step, kind, name)
                    elif value < 1e3:
                        assert got == pytest.approx(value, rel=1e-2), (step, kind, name)
                    continue
                rel = LOOSE[figure] if estimated else 1e-4
                assert got == pytest.approx(value, rel=rel), (method, step, kind, name, figure)
            checked["estimated" if estimated else "exact"] += 1
    assert checked["estimated" if method in ("lanczos", "mixed") else "exact"] > 0
    if method == "mixed":
        assert checked["exact"] > 0 and checked["estimated"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
@pytest.mark.parametrize("kind", SPECTRA)
def test_cuda_estimate_with_bf16_grams_within_the_bounds(kind):
    """The CUDA path (bf16 Grams with float32 accumulation, batched products on the GPU) against
    float64 SVDs, with the same bounds as the CPU path; and against the CPU path itself."""
    gen = torch.Generator().manual_seed(SPECTRA.index(kind))
    W = torch.stack([with_spectrum(kind, 512, 1536, gen) for _ in range(3)])
    X = W.float().cuda()
    sk = lanczos.sketch_matrices(X.clone(), precision="bfloat16")
    s_gpu = lanczos.spectrum_from_sketch(sk)
    s_cpu = lanczos.estimate_singular_values(W.float())
    for j in range(3):
        ref = spectrum_metrics(torch.linalg.svdvals(W[j]), k=5)
        for name, s in (("cuda", s_gpu[j]), ("cpu", s_cpu[j])):
            est = spectrum_metrics(s, k=5)
            for figure, bound in BOUNDS.items():
                rel = abs(float(est[figure]) / float(ref[figure]) - 1)
                assert rel <= bound, (name, kind, j, figure, rel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
def test_cuda_monitor_auto_logs_figures_of_the_measured_tensors(tmp_path):
    """method='auto' on CUDA (exact below exact_max_k=128, the estimate above) in a bf16-mixed fit:
    every per-matrix figure against a float64 SVD of the tensor measured at that step."""
    torch.manual_seed(0)
    mon = SpectralMonitor(every_n_steps=2, top_k=3, wait_if_busy=True, exact_max_k=128)
    model = GPT(size="tiny", d_model=384, n_layers=2, n_heads=6, context_length=64,
                policy={"rules": [{"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
                                  {"match": {}, "optimizer": "adamw", "lr": 3e-3}]})
    data = torch.randint(0, 256, (8 * 3, 65), generator=torch.Generator().manual_seed(0))
    probe = _Probe(mon)
    tr = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=[mon, probe], max_steps=3,
                   enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                   accelerator="gpu", devices=1, precision="bf16-mixed")
    tr.fit(model, DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8))
    seen = set()
    for step, tensors in probe.tensors.items():
        for (kind, name), T in tensors.items():
            estimated = min(T.shape) > 128
            seen.add(estimated)
            for figure, value in _figures(T.cpu().numpy(), 3).items():
                if figure == "condition_number":
                    continue
                got = probe.metrics[step][f"spectral/{kind}/matrix/{name}/{figure}"]
                assert got == pytest.approx(value, rel=LOOSE[figure] if estimated else 1e-3), (step, kind, name, figure)
    assert seen == {True, False}


def test_snapshot_batches_matrices_of_one_k_padded_with_zero_columns():
    """The engine's lanczos path puts matrices of one small side ``k`` and different long sides
    (and both orientations) in one padded batch: each figure against a float64 SVD of its own
    matrix, within the documented bounds; a non-finite matrix in the batch is left out."""
    from lightning_optlab.callbacks._spectra import SpectrumSnapshots

    gen = torch.Generator().manual_seed(3)
    kinds = ("power_law", "marchenko_pastur", "low_rank_plus_noise", "flat")
    shapes = ((256, 1024), (700, 256), (256, 256), (256, 513))
    W = {("weights", f"m{j}"): with_spectrum(kind, *shape, gen).float() for j, (kind, shape) in enumerate(zip(kinds, shapes))}
    W[("weights", "bad")] = torch.full((256, 300), float("nan"))
    engine = SpectrumSnapshots("test", method="lanczos")
    groups, sizes, total, _ = engine.spectra(engine.take(W, list(W)))
    assert total == 5 and len(groups) == 1 and sizes[("weights", "m1")] == (700, 256)
    metas, sv = groups[0]
    assert [m[1] for m in metas] == ["m0", "m1", "m2", "m3"]
    for m, s in zip(metas, sv):
        ref = spectrum_metrics(torch.linalg.svdvals(W[m].double()), k=5)
        est = spectrum_metrics(s.double(), k=5)
        for figure, bound in BOUNDS.items():
            rel = abs(float(est[figure]) / float(ref[figure]) - 1)
            assert rel <= bound, (m, figure, rel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
def test_cuda_captured_sketch_replays_equal_the_eager_sketch():
    """CapturedSketch on CUDA: the first call eager, the second captured, later ones replayed, each
    on new inputs, equal to sketch_matrices run eagerly on the same inputs (one specification:
    the graph's kernels are the eager ones, so to float32 rounding); the capture did not fail."""
    gen = torch.Generator().manual_seed(5)
    sketcher = lanczos.CapturedSketch((3, 256, 768), "cuda", rank=32, precision="bfloat16")
    for call, kind in enumerate(("power_law", "exponential", "marchenko_pastur", "rank_half")):
        X = torch.stack([with_spectrum(kind, 256, 768, gen) for _ in range(3)]).float().cuda()
        sketcher.inputs.copy_(X)
        got = sketcher.run()
        want = lanczos.sketch_matrices(X.clone(), 32, precision="bfloat16", starts=sketcher.starts)
        for name, t in want.tensors().items():
            torch.testing.assert_close(got.tensors()[name], t, rtol=1e-4, atol=1e-6, msg=f"call {call} {name}")
        torch.testing.assert_close(lanczos.spectrum_from_sketch(got), lanczos.spectrum_from_sketch(want), rtol=1e-4, atol=1e-8)
    assert sketcher.failed is None and sketcher._step.graph is not None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)"))])
def test_zero_and_repeated_spectra_are_estimated_without_failing(device):
    """A zero gradient (all-zero Gram) and an exactly repeated spectrum (identity rows) in one
    batch: no solver failure, zeros for the first, all-equal values for the second."""
    X = torch.zeros(2, 96, 200, device=device)
    X[1, :, :96] = torch.eye(96, device=device)
    s = lanczos.spectrum_from_sketch(lanczos.sketch_matrices(X.clone(), precision="bfloat16"))
    assert torch.all(s[0] == 0)
    torch.testing.assert_close(s[1], torch.ones(96, dtype=torch.float64), rtol=5e-3, atol=5e-3)  # bf16 on CUDA


def test_ns_figures_from_the_spectrum_equal_a_float64_iteration():
    """NS acts on singular values as a scalar polynomial: the figures computed from the spectrum
    equal those of the float64 quintic iteration of the matrix itself, for every step count."""
    from lightning_optlab.optim.newton_schulz import newton_schulz
    from lightning_optlab.spectral.ns import (
        ns_benefit, ns_benefit_of_spectrum, ns_figures, ns_figures_of_spectrum, ns_map_of_spectrum,
    )

    gen = torch.Generator().manual_seed(0)
    G = torch.stack([with_spectrum(kind, 40, 70, gen) for kind in ("power_law", "rank_8", "marchenko_pastur")])
    s = torch.linalg.svdvals(G)
    mapped = ns_map_of_spectrum(s, (1, 2, 3, 5, 10))
    for t, o in mapped.items():
        O = newton_schulz(G, steps=t, dtype=torch.float64, eps=1e-300)
        # (the polynomial is not monotone: compare as sets of singular values)
        torch.testing.assert_close(o.sort(-1, descending=True).values, torch.linalg.svdvals(O), rtol=1e-9, atol=1e-9)
        ref, got = ns_figures(G, O), ns_figures_of_spectrum(s, o)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-7, atol=1e-6)
    ref, got = ns_benefit(G, steps=5, dtype=torch.float64), ns_benefit_of_spectrum(s, 5)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key].double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="step counts >= 0"):
        ns_map_of_spectrum(s, (-1,))


class _GradProbe(L.Callback):
    """After the analyses (wait_if_busy=True): float64 copies of the gradients at each analysed step."""

    def __init__(self, every):
        self.every, self.grads = every, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every == 0:
            self.grads[trainer.global_step] = {n: p.grad.detach().double().clone()
                                              for n, p in pl_module.named_parameters() if p.ndim >= 2}


@pytest.mark.parametrize("method", ["auto", "lanczos", "iterate"])
def test_analyses_from_spectra_match_the_float64_iteration_of_the_measured_gradients(tmp_path, method):
    """NewtonSchulzAnalysis and ComponentGradientAnalysis computed from the spectra (exact on the
    CPU with 'auto'; the estimate with 'lanczos') against the float64 quintic iteration and SVDs
    of the gradients they measured, per matrix and per component."""
    from lightning_optlab.callbacks import ComponentGradientAnalysis, NewtonSchulzAnalysis
    from lightning_optlab.optim.newton_schulz import newton_schulz
    from lightning_optlab.spectral.ns import ns_benefit, ns_figures

    ns = NewtonSchulzAnalysis(every_n_steps=2, steps=(1, 5), components=("hidden",), log_per_matrix=True,
                              wait_if_busy=True, method=method)
    comp = ComponentGradientAnalysis(every_n_steps=2, wait_if_busy=True, method=method, filename=None)
    probe = _GradProbe(2)
    torch.manual_seed(0)
    model = GPT(size="tiny", d_model=192, n_layers=1, n_heads=4, context_length=48,
                policy={"rules": [{"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
                                  {"match": {}, "optimizer": "adamw", "lr": 1e-2}]})
    data = torch.randint(0, 256, (8 * 3, 49), generator=torch.Generator().manual_seed(0))
    tr = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=[ns, comp, probe], max_steps=3,
                   enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                   accelerator="cpu", devices=1)
    tr.fit(model, DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8))
    assert ns.last_step == 2 and comp.last_step == 2
    grads = probe.grads[2]
    tol = {"auto": 1e-4, "lanczos": 3e-2, "iterate": 1e-3}[method]  # iterate: float32 on the CPU
    hidden = [n for n in grads if n.startswith("blocks.")]
    for name in hidden:
        G = grads[name]
        for s in (1, 5):
            ref = ns_figures(G, newton_schulz(G, steps=s, dtype=torch.float64))
            for key in ("cosine", "information_loss", "orthogonality_error"):
                got = ns.last_metrics[f"ns_analysis/matrix/{name}/steps_{s}/{key}"]
                assert got == pytest.approx(float(ref[key]), rel=tol, abs=tol * 1e-2), (name, s, key)
    benefits = [ns_benefit(grads[n], steps=5, dtype=torch.float64) for n in hidden]
    for key in ("effective_rank", "ns_effective_rank", "benefit_ratio", "information_loss"):
        ref = float(np.mean([float(b[key]) for b in benefits]))
        assert comp.last_metrics[f"gradient_analysis/hidden/{key}"] == pytest.approx(ref, rel=tol * 2), key


@pytest.mark.parametrize("scale", [1e-18, 1e-6, 1e15])
def test_estimate_is_scale_invariant_down_to_tiny_gradients(scale):
    """A gradient of 1e-18 (its Gram's entries underflow float32) is estimated as well as one of
    order 1: the spectrum scales with the matrix."""
    gen = torch.Generator().manual_seed(0)
    W = with_spectrum("power_law", 300, 500, gen).float()
    s1 = lanczos.estimate_singular_values(W)
    s2 = lanczos.estimate_singular_values(W * scale)
    assert torch.isfinite(s2).all()
    torch.testing.assert_close(s2 / scale, s1, rtol=1e-4, atol=1e-6 * float(s1[0]))


def _third_party_models():
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)  # the same random weights every run
    yield "HF GPT-2", transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1))
    yield "HF Llama (GQA)", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=1000))
    yield "timm ResNet-50", timm.create_model("resnet50", pretrained=False)


def test_estimate_within_the_bounds_on_third_party_weights_and_gradients():
    """Models this project did not write, built from their configs: every hidden matrix with a
    small side above 256, read through its matrix view (GPT-2's Conv1D stored (in, out), conv
    kernels flattened), its weight and its gradient, against float64 SVDs -- one matrix at a time,
    and all of a model's together through the monitors' engine (one padded batch per small side)."""
    from lightning_optlab.callbacks._spectra import SpectrumSnapshots
    from lightning_optlab.policy import describe_parameters

    checked = 0
    for label, model in _third_party_models():
        batch = {}
        torch.manual_seed(0)
        if label.startswith("timm"):
            model(torch.randn(2, 3, 64, 64)).square().mean().backward()
        else:
            ids = torch.randint(0, model.config.vocab_size, (2, 64))
            model(ids, labels=ids).loss.backward()
        for info in describe_parameters(model):
            if info.role != "hidden":
                continue
            for t in (info.param, info.param.grad):
                W = info.view.to_matrix(t.detach())
                W = W.reshape(W.shape[0], -1) if W.ndim == 2 or W.ndim > 3 else W[0]
                if min(W.shape) <= 256:
                    continue
                s = lanczos.estimate_singular_values(W.float())
                if not W.any():  # no gradient reaches it (timm zero-initialises each block's last BatchNorm)
                    assert not s.any()
                    continue
                ref = spectrum_metrics(torch.linalg.svdvals(W.double()), k=5)
                est = spectrum_metrics(s, k=5)
                for figure, bound in BOUNDS.items():
                    rel = abs(float(est[figure]) / float(ref[figure]) - 1)
                    assert rel <= bound, (label, tuple(W.shape), figure, rel)
                batch[("gradients" if t is info.param.grad else "weights", info.name)] = (W.float(), ref)
                checked += 1
        engine = SpectrumSnapshots("test", method="lanczos")
        tensors = {key: W for key, (W, _) in batch.items()}
        groups, _, total, _ = engine.spectra(engine.take(tensors, list(tensors)))
        assert total == len(batch) and sum(len(metas) for metas, _ in groups) == len(batch)
        for metas, sv in groups:
            for m, s in zip(metas, sv):
                est, ref = spectrum_metrics(s.double(), k=5), batch[(m[0], m[1])][1]
                for figure, bound in BOUNDS.items():
                    rel = abs(float(est[figure]) / float(ref[figure]) - 1)
                    assert rel <= bound, (label, "engine", m[1], figure, rel)
    assert checked >= 20
