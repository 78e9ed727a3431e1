"""SinkGD / Sinkhorn-tanh CUDA-graph steps equal their eager steps (runs where CUDA is; the GPU
benchmark run executes this file too). CPU: forcing the graph is an error, bad values refused."""

import pytest
import torch

from lightning_optlab.optim import ModularOptimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHAPES = [(64, 48), (64, 48), (48, 64), (32, 32), (16, 8, 3, 3), (48,), ()]
RULES = {
    "sinkgd": dict(lr=0.02, weight_decay=0.1, sinkhorn_iterations=5),
    "sinkhorn_tanh": dict(lr=0.02, weight_decay=0.1, tau=0.1, n_iter=5),
}


def make(device, rule, cuda_graph, shapes=SHAPES, **hp):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    opt = ModularOptimizer([{"params": params, "algorithm": rule, **RULES[rule], "cuda_graph": cuda_graph, **hp}])
    return params, opt


def grads_for(step, device, shapes=SHAPES):
    gen = torch.Generator().manual_seed(100 + step)
    # rows spanning six decades, so the Sinkhorn scales matter
    return [(torch.randn(s, generator=gen) * (torch.logspace(-3, 3, s[0])[(...,) + (None,) * (len(s) - 1)]
             if len(s) >= 2 else 1.0)).to(device) for s in shapes]


def run(opt, params, steps, device, lrs=None):
    for step in steps:
        for p, g in zip(params, grads_for(step, device)):
            p.grad = g
        if lrs:
            opt.param_groups[0]["lr"] = lrs[step]
        opt.step()


@cuda
@pytest.mark.parametrize("rule", list(RULES))
def test_graph_step_equals_eager_step_through_lr_changes_and_recapture(rule):
    lrs = [0.02, 0.02, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005]
    eager_p, eager = make("cuda", rule, False)
    graph_p, graph = make("cuda", rule, True)
    run(eager, eager_p, range(8), "cuda", lrs)
    run(graph, graph_p, range(8), "cuda", lrs)
    assert graph.param_groups[0]["_runtime"][f"{rule}_graph"].graph is not None  # really captured
    assert "_runtime" not in eager.param_groups[0] or not eager.param_groups[0]["_runtime"]
    for a, b in zip(eager_p, graph_p):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    # stateless: nothing in the state dict, no runtime object saved
    saved = graph.state_dict()
    assert saved["state"] == {} and all("_runtime" not in g for g in saved["param_groups"])
    # a hyperparameter change recaptures instead of replaying a stale graph
    first = graph.param_groups[0]["_runtime"][f"{rule}_graph"]
    key = "sinkhorn_iterations" if rule == "sinkgd" else "n_iter"
    for opt in (eager, graph):
        opt.param_groups[0]["weight_decay"] = 0.0
        opt.param_groups[0][key] = 2
    run(eager, eager_p, range(3), "cuda")
    run(graph, graph_p, range(3), "cuda")
    assert graph.param_groups[0]["_runtime"][f"{rule}_graph"] is not first
    for a, b in zip(eager_p, graph_p):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@cuda
@pytest.mark.parametrize("rule", list(RULES))
def test_auto_falls_back_to_eager_for_bf16_weights_and_missing_gradients(rule):
    params, opt = make("cuda", rule, "auto", shapes=[(16, 8), (16, 8)])
    params[0].grad = torch.randn(16, 8, device="cuda")  # the second has no gradient
    before = params[1].detach().clone()
    opt.step()
    assert "_runtime" not in opt.param_groups[0] or not opt.param_groups[0]["_runtime"]
    assert torch.equal(params[1], before)
    with pytest.raises(RuntimeError, match="cuda_graph=True needs fp32 contiguous weights"):
        p = torch.randn(8, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.randn_like(p)
        ModularOptimizer([{"params": [p], "algorithm": rule, "cuda_graph": True}]).step()


@pytest.mark.parametrize("rule", list(RULES))
def test_forcing_the_graph_where_it_cannot_run_is_an_error(rule):
    params, opt = make("cpu", rule, True)
    for p, g in zip(params, grads_for(0, "cpu")):
        p.grad = g
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=f"{rule} .*cuda_graph=True needs fp32 contiguous weights on one CUDA device"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="cuda_graph must be 'auto', true or false"):
        make("cpu", rule, "always")
    # auto and False run the eager step on CPU, with the same result
    results = []
    for setting in ("auto", False):
        ps, o = make("cpu", rule, setting)
        run(o, ps, range(2), "cpu")
        results.append(ps)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", list(RULES))
def test_static_stack_body_with_device_scalar_lr_equals_eager_step_on_cpu(rule):
    # the graph's step (static stacks, gradients copied in, lr a 0-d tensor) runs the same
    # function as the eager step; off CUDA its CapturedStep runs it eagerly every call
    from lightning_optlab.optim.sinkgd import (
        _SINKGD_GRAPH_KEYS, _SINKHORN_TANH_GRAPH_KEYS, _sinkgd_body, _sinkhorn_tanh_body,
    )
    from lightning_optlab.optim.stateless_graph import StatelessGraph

    keys, body = (_SINKGD_GRAPH_KEYS, _sinkgd_body) if rule == "sinkgd" else (_SINKHORN_TANH_GRAPH_KEYS, _sinkhorn_tanh_body)
    eager_p, eager = make("cpu", rule, False)
    static_p, holder = make("cpu", rule, False)
    group = holder.param_groups[0]
    graph = StatelessGraph(static_p, group, keys, body)
    grads = grads_for(3, "cpu")
    for p, g in zip(eager_p, grads):
        p.grad = g
    eager.step()
    with torch.no_grad():  # as inside Optimizer.step
        graph.step([g.clone() for g in grads], group)
    assert graph.graph is None and not graph.captured.capturable
    for a, b in zip(eager_p, static_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any((a - b).abs().max() > 0 for a, b in zip(eager_p, make("cpu", rule, False)[0]))  # it moved


@cuda
@pytest.mark.parametrize("rule", list(RULES))
def test_graph_step_equals_eager_step_with_matrix_views(rule):
    """HF Conv1D (in, out), ConvTranspose (in, out, k, k) and (C, 1, 1) vectors through the
    graph's strided stack views: the eager step's update."""
    shapes = [(48, 64), (64, 48), (8, 16, 3, 3), (16, 1, 1)]
    codes = ["in_out", "in_out", "in_out", "vector"]
    eager_p, eager = make("cuda", rule, False, shapes, matrix_views=codes)
    graph_p, graph = make("cuda", rule, True, shapes, matrix_views=codes)
    for step in range(4):
        for params, opt in ((eager_p, eager), (graph_p, graph)):
            for p, g in zip(params, grads_for(step, "cuda", shapes)):
                p.grad = g
            opt.step()
    assert graph.param_groups[0]["_runtime"][f"{rule}_graph"].graph is not None
    for a, b in zip(eager_p, graph_p):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
