"""Muon's CUDA-graph step equals its eager step (runs where CUDA is; the GPU benchmark run
executes this file too)."""

import copy

import pytest
import torch

from lightning_optlab.optim import ModularOptimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHAPES = [(64, 48), (64, 48), (48, 64), (32, 32), (16, 8, 3, 3)]


def make(device, cuda_graph, **hp):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in SHAPES]
    opt = ModularOptimizer([{"params": params, "algorithm": "muon", "lr": 0.02, "weight_decay": 0.1,
                             "cuda_graph": cuda_graph, **hp}])
    return params, opt


def grads_for(step, device):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).to(device) for s in SHAPES]


def run(opt, params, steps, device, lrs=None):
    for step in steps:
        for p, g in zip(params, grads_for(step, device)):
            p.grad = g
        if lrs:
            opt.param_groups[0]["lr"] = lrs[step]
        opt.step()


@cuda
def test_graph_step_equals_eager_step_through_lr_changes_resume_and_recapture():
    lrs = [0.02, 0.02, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005]
    eager_p, eager = make("cuda", False)
    graph_p, graph = make("cuda", True)
    run(eager, eager_p, range(4), "cuda", lrs)
    run(graph, graph_p, range(4), "cuda", lrs)
    assert graph.param_groups[0]["_runtime"]["muon_graph"].graph is not None  # really captured
    saved = copy.deepcopy(graph.state_dict())
    assert all("_runtime" not in g for g in saved["param_groups"])
    resumed_p = [p.detach().clone().requires_grad_() for p in graph_p]
    resumed = ModularOptimizer([{"params": resumed_p, "algorithm": "muon", "lr": 0.02, "weight_decay": 0.1,
                                 "cuda_graph": True}])
    resumed.load_state_dict(saved)
    run(eager, eager_p, range(4, 8), "cuda", lrs)
    run(resumed, resumed_p, range(4, 8), "cuda", lrs)
    for a, b in zip(eager_p, resumed_p):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    # a hyperparameter change recaptures instead of replaying a stale graph
    for opt in (eager, resumed):
        opt.param_groups[0]["weight_decay"] = 0.0
        opt.param_groups[0]["ns_steps"] = 3
    run(eager, eager_p, range(8, 11), "cuda")
    run(resumed, resumed_p, range(8, 11), "cuda")
    for a, b in zip(eager_p, resumed_p):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_forcing_the_graph_where_it_cannot_run_is_an_error():
    params, opt = make("cpu", True)
    for p, g in zip(params, grads_for(0, "cpu")):
        p.grad = g
    with pytest.raises(RuntimeError, match="cuda_graph=True needs fp32 contiguous weights on one CUDA device"):
        opt.step()
    with pytest.raises(ValueError, match="cuda_graph must be 'auto', true or false"):
        make("cpu", "always")


@cuda
@pytest.mark.parametrize("rule", ["muon", "adamw"])
def test_prepared_step_still_refuses_a_nan_gradient_before_anything_changes(rule):
    """With the CUDA graph (muon) or torch's fused kernel (adamw), the step is prepared while the
    NaN/Inf check is in flight (gradients copied into the graph's buffers, argument lists built):
    a NaN must still raise, with weights and state untouched."""
    params, opt = make("cuda", True) if rule == "muon" else (None, None)
    if rule == "adamw":
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in SHAPES]
        opt = ModularOptimizer([{"params": params, "algorithm": "adamw", "lr": 1e-2,
                                 "param_names": [f"w{i}" for i in range(len(SHAPES))]}])
    run(opt, params, range(3), "cuda")  # warm-up and capture
    before = [p.detach().clone() for p in params]
    state_before = {k: {kk: vv.clone() for kk, vv in v.items() if torch.is_tensor(vv)} for k, v in opt.state.items()}
    for p, g in zip(params, grads_for(3, "cuda")):
        p.grad = g
    params[1].grad.view(-1)[5] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for k, v in opt.state.items():
        for kk, vv in state_before[k].items():
            assert torch.equal(v[kk], vv), kk


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_nan_check_handles_every_gradient_dtype_on_cuda(dtype):
    """GradScaler's fused check has no bf16 CUDA kernel; the optimizer's NaN/Inf guard must work
    for bf16 weights anyway (and refuse a NaN in them)."""
    p = torch.randn(8, 4, device="cuda", dtype=dtype, requires_grad=True)
    q = torch.randn(8, 4, device="cuda", requires_grad=True)
    opt = ModularOptimizer([{"params": [p, q], "algorithm": "adamw", "lr": 1e-2, "param_names": ["p", "q"]}])
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    p.grad[0, 0] = float("nan")
    before = p.detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite gradient.*'p'"):
        opt.step()
    assert torch.equal(p, before)


VIEW_SHAPES = [(48, 144), (48, 48), (144, 48), (64, 48), (8, 16, 3, 3)]
VIEW_CODES = ["in_out*3", "in_out", "out_in*3", "out_in", "in_out"]  # HF Conv1D, packed QKV, ConvTranspose


@cuda
def test_graph_step_equals_eager_step_with_matrix_views():
    """Transposed (HF Conv1D, ConvTranspose) and split packed views: the graph's strided views of
    its stacks give the eager step's update, the shape scale of each view included."""

    def build(cuda_graph):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in VIEW_SHAPES]
        opt = ModularOptimizer([{"params": params, "algorithm": "muon", "lr": 0.02, "weight_decay": 0.1,
                                 "cuda_graph": cuda_graph, "matrix_views": VIEW_CODES}])
        return params, opt

    eager_p, eager = build(False)
    graph_p, graph = build(True)
    for step in range(5):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(s, generator=gen).cuda() for s in VIEW_SHAPES]
        for params, opt in ((eager_p, eager), (graph_p, graph)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert graph.param_groups[0]["_runtime"]["muon_graph"].graph is not None
    for a, b in zip(eager_p, graph_p):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
