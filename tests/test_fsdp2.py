"""FSDP2 (fully_shard, DTensor parameters) on CPU with gloo: the element-wise rules step the
shards, Muon and the Sinkhorn rules step whole matrices on owner ranks (all-to-all there and
back), SPARKLES steps gathered whole tensors with its state, the Stiefel retraction runs on
owner ranks with the count agreed over the ranks and the sphere on each rank's rows, exactly as
one process steps the whole model; the NaN/Inf guard refuses a step on every rank when one
rank's shard is bad; a rule that declares no sharded path (a user's one-file rule), and
FSDP1's flat parameters, are refused when the optimizer is built."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_optlab import build_optimizer

ELEMENTWISE = ("sgd", "adam", "adamw", "rmsprop", "adamw_spam")
GATHERED = ("muon", "sinkgd", "sinkhorn_tanh", "sparkles")
LION = os.path.join(os.path.dirname(__file__), "toy_rules", "lion.py")  # sharding left at "refuse"
CONSTRAINED = {"rules": [
    {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02, "constraint": "stiefel"},
    {"match": {"role": "output"}, "optimizer": "adamw", "lr": 1e-2, "constraint": "sphere"},
    {"match": {}, "optimizer": "adamw", "lr": 1e-2},
]}


def _retracted_training(model):
    """4 steps of the constrained policy, each followed by the plan's retraction (as
    ManifoldRetraction runs it); the fit-start retraction first."""
    from lightning_optlab.manifolds.plan import find_targets, plan_retractions

    opt = build_optimizer(model, CONSTRAINED)
    plan = plan_retractions(find_targets(model, [opt], None, {"steps": 5, "tol": "auto", "schedule": "predict",
                                                             "precision": "auto"}))
    plan.retract_to(12, 1e-6)
    steps, before = [], {}
    for x, y in _batches():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        before = {k: float(v) for k, v in plan.retract(measure=True).items()}
        steps.append(dict(plan.last_stiefel_steps))
    return {**{k: float(v) for k, v in plan.distances_after().items()}, **before, "steps": steps}





def _far_retraction(model):
    """The hidden matrix tripled, far past what the step count can be predicted for: the plan
    falls back to checking every iteration (on 2 ranks one of them holds no matrix of the bucket)."""
    from lightning_optlab.manifolds.plan import find_targets, plan_retractions

    opt = build_optimizer(model, CONSTRAINED)
    plan = plan_retractions(find_targets(model, [opt], None, {"steps": 12, "tol": "auto", "schedule": "predict",
                                                             "precision": "auto"}))
    with torch.no_grad():
        model[2].weight.mul_(3.0)
    metrics = plan.retract(measure=True)
    whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    return whole, dict(plan.last_stiefel_steps), float(metrics["manifold/stiefel_distance_before/hidden"])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10),
                               torch.nn.ReLU(), torch.nn.Linear(10, 4))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]


def _policy(rule):
    extra = {"stochastic_threshold": 1e3} if rule == "sparkles" else {}  # its kicks fire on shards too
    return {"rules": [{"match": {"role": "hidden"}, "optimizer": rule, "lr": 0.02, **extra},
                      {"match": {}, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1}]}


def _train(model, rule):
    opt = build_optimizer(model, _policy(rule))
    for x, y in _batches():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


def _sharded():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _owner_round_trip(world):
    """Tensors of uneven rows (fewer rows than ranks, too) and two dtypes, row-sharded: each whole
    tensor reaches only its owner, and each rank gets its rows of the owners' results (x 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_optlab.optim.sharded import assign_owners, gather_to_owners, scatter_from_owners

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(shape, generator=g, dtype=dtype) for shape, dtype in
            [((10, 3), torch.float32), ((7, 5), torch.float64), ((1, 4), torch.float32), ((4,), torch.float32),
             ((13, 2, 2), torch.float64), ((2, 6), torch.float32)]]
    likes = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    costs = [t.numel() for t in full]
    owners = assign_owners(likes, costs)
    whole = gather_to_owners(likes, [t.to_local() for t in likes], owners)
    parts = scatter_from_owners(likes, {i: 2 * w for i, w in whole.items()}, owners)
    return {"owners": owners, "costs": costs, "mine": sorted(whole),
            "whole_exact": all(torch.equal(w, full[i]) for i, w in whole.items()),
            "parts_exact": all(torch.equal(part, (2 * like).to_local()) and part.dtype == like.dtype
                               for part, like in zip(parts, likes))}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {"params": {}, "state_is_dtensor": {}, "refused": {}}
    try:
        out["owner_round_trip"] = _owner_round_trip(world)
        for rule in ELEMENTWISE + GATHERED:
            model = _sharded()
            opt = _train(model, rule)
            out["params"][rule] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            out["state_is_dtensor"][rule] = all(  # (vacuous for the stateless rules)
                type(v).__name__ == "DTensor" for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.ndim > 0)
        import importlib.util

        spec = importlib.util.spec_from_file_location("toy_lion", LION)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers "lion"
        try:
            build_optimizer(_sharded(), _policy("lion"))
            out["refused"] = None
        except ValueError as err:
            out["refused"] = str(err)
        model = _sharded()
        out["retracted_distances"] = _retracted_training(model)
        out["retracted"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        out["far"] = _far_retraction(_sharded())
        # a NaN in one rank's shard: both ranks refuse the step, no weight changes anywhere
        model = _sharded()
        opt = build_optimizer(model, _policy("adamw"))
        x, y = _batches()[0]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        if rank == 1:
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        try:
            opt.step()
            out["nan"] = None
        except FloatingPointError as err:
            out["nan"] = str(err)
        out["unchanged"] = all(torch.equal(before[n], p.full_tensor()) for n, p in model.named_parameters())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears the group down while another is still in a collective
        dist.destroy_process_group()
    _exit_quietly()


def _exit_quietly():
    """Reached only on success: leave without interpreter teardown, where a gloo thread still
    joinable can abort the process ("terminate called without an active exception", seen once
    in CI after every result was written)."""
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, tmp_path_factory):
    """Every rank's results; on 4 ranks the 10-row layer's shards are uneven (3, 3, 3, 1)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"fsdp2_{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("rule", ELEMENTWISE + GATHERED)
def test_rules_on_fsdp2_shards_equal_one_process(ranks, rule):
    """Element-wise rules on the shards, Muon on gathered matrices (its Newton-Schulz work split
    across the two ranks), the Sinkhorn rules on gathered whole tensors: the parameters after 4
    steps equal one process's, on both ranks."""
    reference = _model()
    _train(reference, rule)
    for out in ranks:
        assert out["state_is_dtensor"][rule], "the optimizer state stays sharded (DTensor)"
        for name, p in reference.named_parameters():
            torch.testing.assert_close(out["params"][rule][name], p.detach(), rtol=0, atol=1e-6, msg=f"{rule} {name}")
    for name in ranks[0]["params"][rule]:
        for other in ranks[1:]:
            assert torch.equal(ranks[0]["params"][rule][name], other["params"][rule][name])


def test_owner_ranks_receive_whole_tensors_and_send_back_each_ranks_rows(ranks):
    """The all-to-all pair behind Muon and the Sinkhorn rules on FSDP2: the same owners on every
    rank, balanced by cost (largest first to the least loaded rank); each owner holds exactly
    its tensors, bit for bit, and every rank its rows of their results."""
    trips = [out["owner_round_trip"] for out in ranks]
    owners, costs = trips[0]["owners"], trips[0]["costs"]
    assert all(t["owners"] == owners for t in trips)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(len(ranks))]
    assert max(load) - min(load) <= max(costs)  # greedy largest-first: within one tensor's cost
    assert len(set(owners)) == min(len(ranks), len(costs))  # every rank computes something
    for r, t in enumerate(trips):
        assert t["mine"] == [i for i, o in enumerate(owners) if o == r]
        assert t["whole_exact"] and t["parts_exact"]


def test_a_rule_without_a_sharded_path_refuses_fsdp2_shards(ranks):
    for out in ranks:
        msg = out["refused"]
        assert msg is not None and "optimizer 'lion' needs whole tensors" in msg
        assert "DTensor, FSDP2" in msg and "adamw" in msg and "DDP" in msg


def test_retractions_of_sharded_parameters_equal_one_process(ranks):
    """Stiefel on the hidden matrix (on its owner rank, the count agreed over the ranks) and the
    sphere on the output rows (on each rank's rows), after every step: equal to one process, the
    same iteration counts every step, the same measured distances, on the manifold, on every rank."""
    reference = _model()
    distances = _retracted_training(reference)
    for out in ranks:
        for name, p in reference.named_parameters():
            torch.testing.assert_close(out["retracted"][name], p.detach(), rtol=0, atol=1e-6, msg=name)
        got, want = dict(out["retracted_distances"]), dict(distances)
        assert got.pop("steps") == want.pop("steps")  # the counts one process chose, every step
        assert got.keys() == want.keys()
        for key, d in got.items():
            if "_after" in key:
                assert d < 1e-3, (key, d)
            else:  # measured before the retraction: the worst matrix over the ranks
                assert d == pytest.approx(want[key], rel=1e-4, abs=1e-7), key


def test_a_sharded_bucket_too_far_for_the_prediction_falls_back_on_every_rank(ranks):
    params, steps, before = _far_retraction(_model())
    for out in ranks:
        got_params, got_steps, got_before = out["far"]
        assert got_steps == steps and got_before == pytest.approx(before, rel=1e-6)
        for name, p in params.items():
            torch.testing.assert_close(got_params[name], p, rtol=0, atol=1e-6, msg=name)


def test_a_nan_in_one_ranks_shard_refuses_the_step_on_every_rank(ranks):
    for out in ranks:
        assert out["nan"] is not None and "'2.weight'" in out["nan"] and "NaN" in out["nan"]
        assert out["unchanged"]


def test_fsdp1_flat_parameters_are_refused_naming_model_parallel_strategy():
    class FlatParameter(torch.nn.Parameter):  # what FSDP1 marks its flattened buffers with
        _is_flat_param = True

    class Wrapped(torch.nn.Module):  # FSDP1's wrapper registers one flat buffer per unit
        def __init__(self):
            super().__init__()
            self._flat_param = FlatParameter(torch.zeros(16))

    model = Wrapped()
    with pytest.raises(ValueError, match="FSDP1 FlatParameter.*ModelParallelStrategy"):
        build_optimizer(model, {"rules": [{"match": {}, "optimizer": "adamw", "lr": 1e-3}]})


# --- distributed checkpoints: saved on 2 ranks, resumed on 1 and on 2 ---------------------------


def _steps(model, opt, batches):
    for x, y in batches:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _checkpoint_worker(rank, world, port, path, phase):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _sharded()
        opt = build_optimizer(model, _policy("muon"))  # muon on hidden matrices, adamw elsewhere
        if phase == "save":
            _steps(model, opt, _batches()[:2])
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        else:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            _steps(model, opt, _batches()[2:])
            full = {n: p.full_tensor() for n, p in model.named_parameters()}
            if rank == 0:
                torch.save(full, os.path.join(path, f"resumed_on_{world}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    _exit_quietly()


def test_a_checkpoint_saved_on_two_ranks_resumes_on_one_or_two_as_if_uninterrupted(tmp_path):
    """torch.distributed.checkpoint of the model and the ModularOptimizer (DTensor states: Muon's
    momentum, AdamW's moments and steps) after 2 of 4 steps on 2 ranks, resumed on 1 rank and on 2:
    the parameters after the last 2 steps equal an uninterrupted single-process run."""
    path = str(tmp_path / "ckpt")
    mp.spawn(_checkpoint_worker, args=(2, _free_port(), path, "save"), nprocs=2, join=True)
    for world in (1, 2):
        mp.spawn(_checkpoint_worker, args=(world, _free_port(), path, "load"), nprocs=world, join=True)
    reference = _model()
    _steps(reference, build_optimizer(reference, _policy("muon")), _batches())
    for world in (1, 2):
        resumed = torch.load(os.path.join(path, f"resumed_on_{world}.pt"))
        for name, p in reference.named_parameters():
            torch.testing.assert_close(resumed[name], p.detach(), rtol=0, atol=1e-6, msg=f"world {world}: {name}")


# --- Lightning: ModelParallelStrategy (fully_shard in configure_model) end to end --------------

FIT_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp2_fit.py")


def _fit(out, world, mode="fit"):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, FIT_SCRIPT, str(out), str(world), mode], cwd=out, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return torch.load(out / f"{mode}_world{world}.pt")


@pytest.fixture(scope="module")
def lightning_fits(tmp_path_factory):
    """4 steps on 2 ranks (a Lightning distributed checkpoint after step 2) and on one process."""
    out = tmp_path_factory.mktemp("lightning_fsdp2")
    return out, _fit(out, 2), _fit(out, 1)


def _close(a, b, name):
    # the key part of qkv.bias has a zero gradient in exact arithmetic (softmax ignores a shift of
    # the scores), so AdamW normalizes rounding noise there: its entries move by up to a few
    # percent of one step (lr 3e-3) with the reduction order
    atol = 2e-4 if name.endswith("qkv.bias") else 2e-5
    torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


def test_lightning_model_parallel_fit_with_retraction_and_monitor_equals_one_process(lightning_fits):
    """Lightning's ModelParallelStrategy on 2 CPU processes (gloo), the GPT's blocks and root
    fully_shard-ed in configure_model: Muon + Stiefel on the hidden matrices, AdamW + sphere on the
    embedding, AdamW elsewhere, a warm-up + cosine schedule, ManifoldRetraction and SpectralMonitor
    (shards gathered to rank zero) -- the parameters after 4 steps and the monitor's figures equal
    one unsharded process that sees the same samples."""
    _, sharded, single = lightning_fits
    assert sharded["sharded"] == "DTensor" and single["sharded"] == "Parameter"
    assert sharded["steps"] == single["steps"] == 4 and sharded["world"] == 2
    for name, p in single["params"].items():
        _close(sharded["params"][name], p, name)
    # the retraction measured on the logging steps (sharded: every rank takes part), the last one here
    distances = [k for k in single["manifold"] if "distance" in k]
    assert distances and set(sharded["manifold"]) == set(single["manifold"])
    for key in distances:
        assert sharded["manifold"][key] == pytest.approx(single["manifold"][key], rel=0.05, abs=2e-6), key
    assert sharded["spectral_step"] == single["spectral_step"] == 3
    # (a gradient's condition number is set by a sigma_min at rounding level: not compared)
    figures = [k for k in single["spectral"] if "/matrix/" in k and not k.endswith("condition_number")]
    assert figures and set(sharded["spectral"]) == set(single["spectral"])
    for key in figures:
        assert sharded["spectral"][key] == pytest.approx(single["spectral"][key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("world", [2, 1], ids=["on 2 ranks", "on 1 rank"])
def test_lightning_distributed_checkpoint_resumes_as_if_uninterrupted(lightning_fits, world):
    """``fit(ckpt_path=...)`` from the Lightning distributed checkpoint written on 2 ranks after
    step 2 (model shards; the ModularOptimizer's DTensor states: Muon's momentum, AdamW's moments
    and steps; the schedule; the callbacks' state), continued on 2 ranks or on 1: on 2 the last 2
    steps give bit for bit the uninterrupted run (so no retraction is skipped or doubled, though
    torch's checkpoint loader runs a zero-lr step to build the optimizer state); on 1 they equal it
    up to the reduction order, as a one-process run does."""
    out, sharded, _ = lightning_fits
    resumed = _fit(out, world, "resume")
    assert resumed["steps"] == 4 and resumed["sharded"] == "DTensor"
    assert resumed["lr"] == sharded["lr"]
    assert resumed["spectral_step"] == 3 and set(resumed["spectral"]) == set(sharded["spectral"])
    for name, p in sharded["params"].items():
        if world == 2:
            assert torch.equal(resumed["params"][name], p), name
        else:
            _close(resumed["params"][name], p, name)
    figures = [k for k in sharded["spectral"] if "/matrix/" in k and not k.endswith("condition_number")]
    for key in figures:
        want = sharded["spectral"][key]
        assert resumed["spectral"][key] == (want if world == 2 else pytest.approx(want, rel=1e-3, abs=1e-5)), key


# --- a model we did not write: HF GPT-2 (Conv1D in_out weights, the packed c_attn) -------------

GPT2_POLICY = {"rules": [
    {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02, "constraint": "stiefel"},
    {"match": {"role": "embedding"}, "optimizer": "adamw", "lr": 1e-2, "constraint": "sphere"},
    {"match": {}, "optimizer": "adamw", "lr": 1e-2},
]}


def _gpt2_training(shard: bool):
    """3 steps of Muon + Stiefel on GPT-2's hidden matrices and AdamW + sphere on its embeddings,
    each step followed by the plan's retraction; every rank sees the same batch."""
    import transformers
    from lightning_optlab.manifolds.plan import find_targets, plan_retractions

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=61, n_positions=16))
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    opt = build_optimizer(model, GPT2_POLICY)
    plan = plan_retractions(find_targets(model, [opt], None, {"steps": 5, "tol": "auto", "schedule": "predict",
                                                             "precision": "auto"}))
    g, steps = torch.Generator().manual_seed(1), []
    for _ in range(3):
        x = torch.randint(0, 61, (4, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        plan.retract(measure=False)
        steps.append(dict(plan.last_stiefel_steps))
    whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    return whole, steps


def _gpt2_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _gpt2_training(shard=True)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "gpt2.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    _exit_quietly()


def test_hf_gpt2_on_fsdp2_owner_ranks_equals_one_process(tmp_path):
    """HF GPT-2 fully_shard-ed on 2 ranks: Muon and the Stiefel retraction on owner ranks (its
    Conv1D weights are stored (in, out); c_attn packs q, k, v), the sphere on the embedding rows.
    Every rank sees the same batch, so the averaged gradients are each rank's own: the
    parameters equal one process's and each step runs the same Stiefel counts."""
    pytest.importorskip("transformers")
    mp.spawn(_gpt2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got, got_steps = torch.load(tmp_path / "gpt2.pt")
    want, want_steps = _gpt2_training(shard=False)
    assert got_steps == want_steps and len(want_steps[-1]) >= 3
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)
