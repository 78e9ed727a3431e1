"""Per-operation benchmark of issue 8: optimizer steps, retraction, SVDs and the spectral monitor
on the byte-level GPT, each next to its peer and floor.

What it measures (median over ``--repeats`` after ``--warmup``; CUDA events on GPU,
``perf_counter`` on CPU), on the GPT built on the device (default: the 42M preset, batch 16 x 1024,
bf16 autocast on CUDA):

* ``fwd_bwd``: forward + backward of one batch (the unit the overheads are expressed in).
* ``rules``: one ``ModularOptimizer`` step per rule on the tensors it gets under the standard
  policy -- ``muon``, ``sinkgd``, ``sinkhorn_tanh`` on the hidden matrices (the 2-D weights inside
  the blocks); ``adamw``, ``adamw_spam``, ``sparkles`` on all parameters; ``adamw`` on the
  non-hidden ones -- with real gradients (one backward, copied onto fresh parameter copies), next
  to the peer on the same tensors: ``torch.optim.Muon`` for muon, ``torch.optim.AdamW(fused=True)``
  for the others. Also the optimizer-state bytes per parameter
  (:func:`lightning_optlab.optim.optimizer_state_bytes`) and, on CUDA, the allocator's persistent
  and peak deltas of the first step.
* ``floors``: FLOPs of the quintic Newton-Schulz iterations on the hidden matrices (per iteration
  on X (m x n), m <= n: X X^T = 2 m^2 n, A A = 2 m^3, B X = 2 m^2 n), divided by the dense bf16 peak
  (``--peak-tflops``, 989 for H100 SXM) and by the achieved rate the issue quotes
  (``--achieved-tflops``, 785: the issue's 0.97 ms floor). Both are reported; the issue's "<= 2x
  the NS floor" target is judged against the issue's convention (achieved rate).
* ``stiefel``: :func:`lightning_optlab.manifolds.stiefel_retract` of every hidden matrix, from an
  on-manifold start (exact polar factor) perturbed by one real muon step, batched by shape (the
  list API) and one matrix at a time; with a fixed 5 iterations and with the adaptive mode the
  installed API offers (detected with ``inspect``; what was used is recorded); as % of fwd+bwd.
* ``svdvals``: ``torch.linalg.svdvals`` of every hidden matrix, one by one and batched by shape.
* ``spectral_monitor``: a short Lightning fit of the GPT (AdamW policy, synthetic batches) with and
  without :class:`~lightning_optlab.callbacks.SpectralMonitor` at ``--monitor-every`` (scaled-down
  cadence so that it fires a few times); per-step times (synchronised), the cost per snapshot, and
  the overhead projected to the default cadence (every 100 steps).

Every measurement is wrapped so that one failure records its error string in the JSON and the
rest goes on. ``--time-limit`` skips the sections still to come once the budget is spent (recorded
as skipped). Results: ``<out>/ops.json``; a table on stdout. ``benchmarks/report.py`` turns the
JSON into ``docs/benchmarks.md``.

Run (GPU, full; ~1-2 minutes on an H100)::

    PYTHONPATH=. python benchmarks/bench_ops.py --out $OUT/ops

CPU smoke (seconds)::

    PYTHONPATH=. python benchmarks/bench_ops.py --tiny --device cpu --out /tmp/ops
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    quiet_lightning,
    error_record,
    pick_device,
    run_metadata,
    synchronize,
    text_table,
    time_fn,
    write_json,
)

# Rules measured, on the tensors the standard policy gives them, with their peer and target.
# (label, registry name, scope, hyperparameters, peer, max ratio ours/peer)
RULE_CASES: list[tuple[str, str, str, dict[str, Any], str, float | None]] = [
    ("muon", "muon", "hidden", {"lr": 0.02}, "muon", None),  # muon has its own targets
    ("sinkgd", "sinkgd", "hidden", {"lr": 1e-3}, "adamw_fused", 2.0),
    ("sinkhorn_tanh", "sinkhorn_tanh", "hidden", {"lr": 3e-4, "tau": 0.1, "n_iter": 5}, "adamw_fused", 2.0),
    # the SinkGD notes' ablation arms S2 and S3 alone (evidence row 4d: is 10 iterations dearer than 3?)
    ("sinkhorn_tanh S2 (all)", "sinkhorn_tanh", "all", {"lr": 3e-4, "tau": 0.05, "n_iter": 10}, "adamw_fused", None),
    ("sinkhorn_tanh S3 (all)", "sinkhorn_tanh", "all", {"lr": 3e-4, "tau": 0.2, "n_iter": 3}, "adamw_fused", None),
    # opt-in CUDA graphs: faster, but they keep ~4-5 B/param of workspace (see optim/sinkgd.py)
    ("sinkgd, cuda_graph", "sinkgd", "hidden", {"lr": 1e-3, "cuda_graph": "auto"}, "adamw_fused", 2.0),
    ("sinkhorn_tanh, cuda_graph", "sinkhorn_tanh", "hidden", {"lr": 3e-4, "tau": 0.1, "n_iter": 5, "cuda_graph": "auto"},
     "adamw_fused", 2.0),
    # issue 19: the guard on, within 1.1x of fused AdamW
    ("adamw (all)", "adamw", "all", {"lr": 3e-3}, "adamw_fused", 1.1),
    # the same without ModularOptimizer's NaN/Inf guard (its one host sync per step)
    ("adamw (all), check_finite off", "adamw", "all", {"lr": 3e-3, "__check_finite": False}, "adamw_fused", 1.1),
    ("muon, check_finite off", "muon", "hidden", {"lr": 0.02, "__check_finite": False}, "muon", None),
    ("adamw (non-hidden)", "adamw", "rest", {"lr": 3e-3}, "adamw_fused", 1.1),
    ("adamw_spam (all)", "adamw_spam", "all", {"lr": 6e-4}, "adamw_fused", 1.5),
    ("sparkles (all)", "sparkles", "all", {"lr": 1e-3}, "adamw_fused", 2.0),
]
# The memory-traffic floor of each rule: bytes it must read and write per fp32 parameter and
# step (weights read and written, the gradient read, each state tensor read and written), at
# the measured copy bandwidth. The Sinkhorn rules' iterations are counted as one read of the
# gradient (a lower bound: a fused kernel could keep the scale vectors on chip); Muon's floor
# is its Newton-Schulz FLOPs (section floors), its traffic shown for reference.
RULE_TRAFFIC_BYTES = {
    "adam": 28, "adamw": 28, "adamw_spam": 28,  # p r/w, g r, m r/w, v r/w
    "sparkles": 36,  # + the previous gradient r/w
    "sgd": 20, "muon": 20,  # p r/w, g r, momentum r/w
    "sinkgd": 12, "sinkhorn_tanh": 12,  # p r/w, g r; no state
}
MUON_MAX_MS = 2.0  # issue 8: muon step <= 2.0 ms on the H100 setup
MUON_MIN_SPEEDUP = 5.0  # >= 5x faster than torch.optim.Muon
MUON_MAX_FLOOR_RATIO = 2.0  # <= 2x the NS floor
STIEFEL_MAX_PCT = 5.0  # retraction of every hidden matrix <= 5% of fwd+bwd
MONITOR_MAX_PCT = 1.0  # SpectralMonitor at its default cadence <= 1% of training time
MONITOR_DEFAULT_EVERY = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (ops.json is written there)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny GPT, few repeats (seconds)")
    p.add_argument("--size", default=None, help="GPT preset (default 42m, tiny with --tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (2 with --tiny)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 30; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 5; 1 with --tiny)")
    p.add_argument("--svd-repeats", type=int, default=None, help="repeats for svdvals (default 3; 1 with --tiny)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--achieved-tflops", type=float, default=785.0, help="achieved bf16 matmul rate the issue's NS floor uses")
    p.add_argument("--retract-tol", type=float, default=1e-3, help="tol of the adaptive Stiefel retraction")
    p.add_argument("--retract-max-steps", type=int, default=5, help="max iterations of the adaptive retraction")
    p.add_argument("--retract-kwargs", default=None, help="JSON dict of kwargs for the adaptive retraction (overrides detection)")
    p.add_argument("--monitor-steps", type=int, default=None, help="steps of each monitor fit (default 400; 8 with --tiny)")
    p.add_argument("--monitor-every", type=int, default=None, help=f"SpectralMonitor cadence in the fit (default {MONITOR_DEFAULT_EVERY}, the monitor's default; 3 with --tiny)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; later sections are skipped past it (default 200; 120 with --tiny)")
    p.add_argument("--monitor-repeats", type=int, default=None, help="interleaved (without, with) fit pairs; the faster fit of each counts (default 2; 1 with --tiny)")
    p.add_argument("--monitor-kwargs", default="{}", help='JSON of extra SpectralMonitor arguments, e.g. {"method": "svd"}')
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated sections to run")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(size="tiny" if tiny else "42m", batch_size=2 if tiny else 16, repeats=3 if tiny else 30,
                    warmup=1 if tiny else 5, svd_repeats=1 if tiny else 3, monitor_steps=8 if tiny else 400,
                    monitor_every=3 if tiny else MONITOR_DEFAULT_EVERY, monitor_repeats=1 if tiny else 2, time_limit=120.0 if tiny else 200.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# Model, batch, gradients


def build_model(args, device):
    from lightning_optlab.models import GPT

    torch.manual_seed(args.seed)
    model = GPT(size=args.size).to(device)
    model.train()
    T = args.seq_len or model.context_length
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, 256, (args.batch_size, T + 1), generator=g)
    batch = (data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device))
    return model, batch


def autocast_ctx(device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU smoke runs in fp32 (CPU bf16 autocast is slow)


def split_parameters(model):
    """(hidden infos, other infos) by the roles the policy builder infers."""
    from lightning_optlab.policy import describe_parameters

    infos = describe_parameters(model)
    hidden = [i for i in infos if i.role == "hidden"]
    rest = [i for i in infos if i.role != "hidden"]
    return hidden, rest


def fresh_params(infos, grads) -> list[torch.Tensor]:
    """Leaf copies of the parameters, each with a copy of its real gradient."""
    out = []
    for info in infos:
        p = info.param.detach().clone().requires_grad_(True)
        p.grad = grads[info.name].clone()
        out.append(p)
    return out


def ns_flops(shapes: list[tuple[int, int]], steps: int) -> float:
    """FLOPs of ``steps`` quintic NS iterations: per iteration on X (m x n), m <= n,
    X X^T (2 m^2 n) + A A (2 m^3) + B X (2 m^2 n)."""
    total = 0.0
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += 4.0 * m * m * n + 2.0 * m ** 3
    return total * steps


# ---------------------------------------------------------------------------------------------
# Optimizers under test and their peers


def make_ours(rule: str, params, hp):
    from lightning_optlab.optim import ModularOptimizer

    options = {k[2:]: v for k, v in hp.items() if k.startswith("__")}
    hp = {k: v for k, v in hp.items() if not k.startswith("__")}
    return ModularOptimizer([{"params": params, "algorithm": rule, "name": rule, **hp}], **options)


def make_peer(peer: str, params, hp):
    if peer == "muon":
        # Same hyperparameters as our muon rule (torch's default weight decay is 0.1, ours 0).
        return torch.optim.Muon(params, lr=hp.get("lr", 0.02), weight_decay=0.0, momentum=0.95,
                                nesterov=True, ns_steps=5, adjust_lr_fn="original")
    if peer == "adamw_fused":
        return torch.optim.AdamW(params, lr=hp.get("lr", 1e-3), fused=True)
    raise ValueError(peer)


def measure_step(make: Callable, infos, grads, device, repeats, warmup) -> dict[str, Any]:
    """Memory of the first step, then the median step time of ``make(params)``."""
    from lightning_optlab.optim import optimizer_state_bytes

    params = fresh_params(infos, grads)
    numel = sum(p.numel() for p in params)
    rec: dict[str, Any] = {"tensors": len(params), "numel": numel}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    opt = make(params)
    opt.step()
    synchronize(device)
    state = optimizer_state_bytes(opt)
    rec["state_bytes"] = state
    rec["state_bytes_per_param"] = state / numel
    if device.type == "cuda":
        rec["persistent_delta_bytes_per_param"] = (torch.cuda.memory_allocated(device) - base) / numel
        rec["peak_delta_bytes_per_param"] = (torch.cuda.max_memory_allocated(device) - base) / numel
    rec.update(time_fn(opt.step, device, repeats, warmup))
    rec["finite"] = bool(all(torch.isfinite(p).all() for p in params))
    del opt, params
    return rec


# ---------------------------------------------------------------------------------------------
# Sections


def section_fwd_bwd(ctx):
    model, batch, device, args = ctx["model"], ctx["batch"], ctx["device"], ctx["args"]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with autocast_ctx(device):
            loss = model.loss(batch)
        loss.backward()

    rec = time_fn(fwd_bwd, device, args.repeats, args.warmup)
    rec["tokens"] = batch[0].numel()
    rec["autocast"] = "bf16" if device.type == "cuda" else "none (fp32)"
    # Real gradients for everything that follows: one more backward, copied.
    fwd_bwd()
    synchronize(device)
    ctx["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return rec


def _ensure_grads(ctx):
    if "grads" not in ctx:  # fwd_bwd section skipped or failed before taking them
        model, batch, device = ctx["model"], ctx["batch"], ctx["device"]
        model.zero_grad(set_to_none=True)
        with autocast_ctx(device):
            model.loss(batch).backward()
        ctx["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return ctx["grads"]


def copy_bandwidth(ctx) -> dict[str, Any]:
    """Bytes per second of a device-to-device copy (read + write), cached in ``ctx``: the rate
    the rules' memory-traffic floors use."""
    if "copy_bandwidth" not in ctx:
        device, args = ctx["device"], ctx["args"]
        n = (128 if device.type == "cuda" else 8) * 2**20  # fp32 values: 512 MB / 32 MB
        src = torch.empty(n, device=device).uniform_()
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), device, max(5, args.repeats // 3), 2)
        ctx["copy_bandwidth"] = {"bytes": 2 * 4 * n, "median_ms": t["median_ms"],
                                 "bytes_per_s": 2 * 4 * n / (t["median_ms"] * 1e-3)}
        del src, dst
    return ctx["copy_bandwidth"]


def section_rules(ctx):
    device, args = ctx["device"], ctx["args"]
    grads = _ensure_grads(ctx)
    bandwidth = copy_bandwidth(ctx)["bytes_per_s"]
    scopes = {"hidden": ctx["hidden"], "rest": ctx["rest"], "all": ctx["hidden"] + ctx["rest"]}
    peers: dict[tuple[str, str], dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for label, rule, scope, hp, peer, max_ratio in RULE_CASES:
        if ctx["over_time"]():
            out[label] = {"skipped": "time limit"}
            continue
        rec: dict[str, Any] = {"rule": rule, "scope": scope, "hyperparameters": hp, "peer": peer,
                               "target_max_ratio": max_ratio}
        try:
            rec["ours"] = measure_step(lambda ps: make_ours(rule, ps, hp), scopes[scope], grads, device,
                                       args.repeats, args.warmup)
        except Exception as exc:  # noqa: BLE001 - recorded, the rest goes on
            rec["ours"] = error_record(exc)
        key = (peer, scope)
        if key not in peers:
            try:
                peers[key] = measure_step(lambda ps: make_peer(peer, ps, hp), scopes[scope], grads, device,
                                          args.repeats, args.warmup)
            except Exception as exc:  # noqa: BLE001
                peers[key] = error_record(exc)
        rec["peer_result"] = peers[key]
        ours_ms, peer_ms = rec["ours"].get("median_ms"), peers[key].get("median_ms")
        rec["ratio"] = ours_ms / peer_ms if ours_ms and peer_ms else None
        numel = sum(i.param.numel() for i in scopes[scope])
        rec["traffic_bytes_per_param"] = RULE_TRAFFIC_BYTES.get(rule)
        if rec["traffic_bytes_per_param"]:
            rec["traffic_floor_ms"] = rec["traffic_bytes_per_param"] * numel / bandwidth * 1e3
            rec["traffic_floor_ratio"] = ours_ms / rec["traffic_floor_ms"] if ours_ms else None
        out[label] = rec
    return out


def section_floors(ctx):
    args = ctx["args"]
    shapes = [tuple(i.param.reshape(i.param.shape[0], -1).shape) for i in ctx["hidden"]]
    steps = 5
    flops = ns_flops(shapes, steps)
    bandwidth = copy_bandwidth(ctx)
    return {
        "copy_bandwidth_gb_s": bandwidth["bytes_per_s"] / 1e9,
        "traffic_bytes_per_param": RULE_TRAFFIC_BYTES,
        "ns_steps": steps,
        "hidden_shapes": [list(s) for s in shapes],
        "ns_flops": flops,
        "peak_tflops": args.peak_tflops,
        "achieved_tflops": args.achieved_tflops,
        "ns_floor_ms_at_peak": flops / (args.peak_tflops * 1e12) * 1e3,
        "ns_floor_ms_at_achieved": flops / (args.achieved_tflops * 1e12) * 1e3,
        "convention": (
            f"floor = NS FLOPs / rate; 'at_peak' divides by the dense bf16 peak ({args.peak_tflops:g} "
            f"TFLOP/s), 'at_achieved' by the achieved rate the issue quotes ({args.achieved_tflops:g} "
            "TFLOP/s, its 0.97 ms). The <= 2x floor target is judged at the achieved rate."
        ),
    }


def adaptive_retract_modes(args) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Adaptive Stiefel retraction modes the installed API offers (name -> kwargs), and its parameters.

    Detected with ``inspect``: a ``schedule`` parameter gives ``predict`` (iteration count chosen
    from the measured distance) and ``check`` (stop at ``tol``, one sync per iteration); a bare
    ``tol`` gives the check mode; ``adaptive`` is used if a future API names it so.
    """
    from lightning_optlab.manifolds import stiefel_retract

    params = list(inspect.signature(stiefel_retract).parameters)
    if args.retract_kwargs:
        return {"adaptive": json.loads(args.retract_kwargs)}, params
    base = {"steps": args.retract_max_steps, "tol": args.retract_tol}
    if "schedule" in params:
        return {"adaptive": {**base, "schedule": "predict"}, "adaptive_check": {**base, "schedule": "check"}}, params
    if "adaptive" in params:
        return {"adaptive": {"adaptive": True, **({"tol": args.retract_tol} if "tol" in params else {})}}, params
    if "tol" in params:
        return {"adaptive": base}, params
    return {}, params


def section_stiefel(ctx):
    from lightning_optlab.manifolds import stiefel_distance, stiefel_retract, stiefel_retract_exact

    device, args, grads = ctx["device"], ctx["args"], _ensure_grads(ctx)
    hidden = ctx["hidden"]
    # On-manifold start (exact polar factors), then one real muon step moves them off it.
    start = stiefel_retract_exact([i.param.detach().float() for i in hidden])
    params = [w.clone().requires_grad_(True) for w in start]
    for p, info in zip(params, hidden):
        p.grad = grads[info.name].clone()
    make_ours("muon", params, {"lr": 0.02}).step()
    perturbed = [p.detach() for p in params]
    dist_before = torch.stack(stiefel_distance(perturbed)).float()
    rec: dict[str, Any] = {
        "matrices": len(perturbed),
        "start": "exact polar factor of each hidden weight, then one muon step (lr 0.02) with real gradients",
        "distance_before_max": float(dist_before.max()),
        "distance_before_mean": float(dist_before.mean()),
    }
    adaptive, api_params = adaptive_retract_modes(args)
    rec["api_parameters"] = api_params
    modes = {"fixed_5": {"steps": 5}, **adaptive}
    if not adaptive:
        rec["adaptive"] = "not offered by this stiefel_retract (no 'schedule'/'tol'/'adaptive' parameter)"
    fwd_bwd_ms = (ctx["results"].get("fwd_bwd") or {}).get("median_ms")
    for mode, kw in modes.items():
        m: dict[str, Any] = {"kwargs": kw}
        for how, fn in (
            ("batched", lambda kw=kw: stiefel_retract(perturbed, **kw)),
            ("one_by_one", lambda kw=kw: [stiefel_retract(w, **kw) for w in perturbed]),
        ):
            try:
                t = time_fn(fn, device, args.repeats, args.warmup)
                result = fn()
                after = torch.stack(stiefel_distance(result)).float()
                t["distance_after_max"] = float(after.max())
                if fwd_bwd_ms:
                    t["pct_of_fwd_bwd"] = 100.0 * t["median_ms"] / fwd_bwd_ms
                m[how] = t
            except Exception as exc:  # noqa: BLE001
                m[how] = error_record(exc)
        # Iterations actually run (adaptive): the PolarNS record of one batched call per shape.
        try:
            from lightning_optlab.manifolds import polar_newton_schulz

            pkw = {k: v for k, v in kw.items() if k in inspect.signature(polar_newton_schulz).parameters}
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for w in perturbed:
                by_shape.setdefault(tuple(w.shape), []).append(w)
            m["iterations_per_shape"] = {
                "x".join(map(str, s)): polar_newton_schulz(torch.stack(ws), **pkw).steps for s, ws in by_shape.items()
            }
        except Exception as exc:  # noqa: BLE001
            m["iterations_per_shape"] = error_record(exc)
        rec[mode] = m
    rec["in_place"] = _stiefel_in_place(ctx, perturbed, fwd_bwd_ms)
    return rec


def _stiefel_in_place(ctx, perturbed, fwd_bwd_ms) -> dict[str, Any]:
    """What ManifoldRetraction runs after each optimizer step: ``stiefel_retract_`` on the
    parameters themselves (predict schedule, CUDA graph where available). Each timed call first
    restores the perturbed weights (one foreach copy, timed alone and subtracted)."""
    from lightning_optlab import manifolds

    device, args = ctx["device"], ctx["args"]
    if not hasattr(manifolds, "stiefel_retract_"):
        return {"skipped": "this version has no in-place stiefel_retract_"}
    kw = {"steps": args.retract_max_steps, "tol": args.retract_tol}
    work = [w.clone() for w in perturbed]
    out: dict[str, Any] = {"kwargs": kw}

    def reset():
        torch._foreach_copy_(work, perturbed)

    def retract():
        reset()
        return manifolds.stiefel_retract_(work, **kw)

    try:
        both = time_fn(retract, device, args.repeats, args.warmup)
        alone = time_fn(reset, device, args.repeats, args.warmup)
        out["median_ms"] = both["median_ms"] - alone["median_ms"]
        out["reset_ms"] = alone["median_ms"]
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            retract()
        synchronize(device)
        out["wall_ms_per_call_incl_reset"] = (time.perf_counter() - t0) * 1e3 / args.repeats
        results = retract()
        out["steps_per_bucket"] = [int(r.steps) for r in results]
        out["fallback_buckets"] = sum(bool(r.fallback) for r in results)
        after = torch.stack(manifolds.stiefel_distance(work)).float()
        out["distance_after_max"] = float(after.max())
        if fwd_bwd_ms:
            out["pct_of_fwd_bwd"] = 100.0 * out["median_ms"] / fwd_bwd_ms
            out["wall_pct_of_fwd_bwd"] = 100.0 * (out["wall_ms_per_call_incl_reset"] - alone["median_ms"]) / fwd_bwd_ms
    except Exception as exc:  # noqa: BLE001
        out.update(error_record(exc))
    return out


def section_svdvals(ctx):
    device, args = ctx["device"], ctx["args"]
    mats = [i.param.detach().float().reshape(i.param.shape[0], -1) for i in ctx["hidden"]]
    by_shape: dict[tuple, torch.Tensor] = {}
    for w in mats:
        by_shape.setdefault(tuple(w.shape), []).append(w)  # type: ignore[arg-type]
    stacks = [torch.stack(ws) for ws in by_shape.values()]
    rec: dict[str, Any] = {"matrices": len(mats)}
    for how, fn in (
        ("one_by_one", lambda: [torch.linalg.svdvals(w) for w in mats]),
        ("batched", lambda: [torch.linalg.svdvals(s) for s in stacks]),
    ):
        try:
            rec[how] = time_fn(fn, device, args.svd_repeats, 1)
        except Exception as exc:  # noqa: BLE001
            rec[how] = error_record(exc)
    return rec


def _monitor_fit(ctx, with_monitor: bool, log_dir: str, steps: int | None = None) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_optlab.callbacks import SpectralMonitor
    from lightning_optlab.models import GPT

    device, args = ctx["device"], ctx["args"]
    T = args.seq_len or ctx["model"].context_length
    steps = steps or args.monitor_steps
    g = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, 256, (steps * args.batch_size, T + 1), generator=g)
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=args.batch_size, shuffle=False)

    class StepClock(pl.Callback):
        """Synchronised wall time of each training batch (hooks included); last in the list."""

        def __init__(self):
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            self._last = time.perf_counter()
            self.times.append((self._last - self._t0) * 1e3)

        def on_train_end(self, trainer, pl_module):
            # runs after the monitor's on_train_end (list order): its end-of-fit flush and logging
            self.end_ms = (time.perf_counter() - self._last) * 1e3

    torch.manual_seed(args.seed)
    model = GPT(size=args.size, policy={"rules": [{"match": {}, "optimizer": "adamw", "lr": 3e-4}]})
    clock = StepClock()
    monitor = SpectralMonitor(every_n_steps=args.monitor_every, **json.loads(args.monitor_kwargs)) if with_monitor else None
    callbacks = ([monitor] if monitor else []) + [clock]
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=max(1, steps // 2),
        logger=TensorBoardLogger(log_dir, name="monitor" if with_monitor else "plain"), callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    fit_s = time.perf_counter() - t0
    skip = min(5, max(1, steps // 5))  # warm-up steps left out of the figures
    times = clock.times[skip:]
    rec = {"steps_timed": len(times), "warmup_steps_skipped": skip, "fit_wall_s": fit_s,
           "total_ms": sum(times), "median_step_ms": statistics.median(times), "max_step_ms": max(times),
           "warmup_ms": sum(clock.times[:skip]), "end_of_fit_ms": getattr(clock, "end_ms", None)}
    if monitor is not None:
        snap_steps = [i for i in range(skip, len(clock.times)) if i % args.monitor_every == 0]
        rec["snapshot_steps"] = snap_steps
        rec["snapshot_step_ms"] = [clock.times[i] for i in snap_steps]
        rec["skipped_snapshots"] = monitor.skipped_snapshots
        rec["logged_snapshot_step"] = monitor.last_step
    del trainer, model
    return rec


def section_spectral_monitor(ctx):
    import tempfile

    args = ctx["args"]
    rec: dict[str, Any] = {"every_n_steps": args.monitor_every, "default_every_n_steps": MONITOR_DEFAULT_EVERY,
                           "steps": args.monitor_steps, "policy": "adamw on all parameters (lr 3e-4)",
                           "data": "synthetic random bytes (no loader cost)"}
    # Two interleaved pairs (without, with, without, with); each configuration's faster fit
    # counts: the fit-to-fit drift of the GPU (~1-2%) is as large as the target itself.
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory(prefix="optlab_bench_monitor_") as tmp:
        # an untimed short fit first: the process's first fit pays CUDA/Lightning start-up costs
        # that would otherwise land on whichever configuration runs first
        try:
            _monitor_fit(ctx, False, tmp, steps=min(20, args.monitor_steps))
        except Exception:  # noqa: BLE001 - the timed fits report their own errors
            pass
        for _ in range(args.monitor_repeats):
            for name, flag in (("without", False), ("with", True)):
                try:
                    runs[name].append(_monitor_fit(ctx, flag, tmp))
                except Exception as exc:  # noqa: BLE001
                    runs[name].append(error_record(exc))
    for name, fits in runs.items():
        good = [f for f in fits if "total_ms" in f]
        rec[name] = min(good, key=lambda f: f["total_ms"]) if good else fits[-1]
        rec[f"{name}_total_ms_all"] = [f.get("total_ms") for f in fits]
    plain, mon = rec.get("without", {}), rec.get("with", {})
    if "total_ms" in plain and "total_ms" in mon:
        base_step = plain["median_step_ms"]
        # Steady state: the timed steps (snapshot steps, logging, the worker's CPU load) plus the
        # fit's end-of-fit wait for the last snapshot; the first snapshot's one-time setup (pinned
        # host buffers, the worker thread) happens in the untimed warm-up steps and is reported
        # on its own, as is the whole-fit wall-time difference.
        end_extra = max(0.0, (mon.get("end_of_fit_ms") or 0.0) - (plain.get("end_of_fit_ms") or 0.0))
        extra = mon["total_ms"] - plain["total_ms"] + end_extra
        timed_snaps = len(mon.get("snapshot_steps") or []) - int(mon.get("skipped_snapshots") or 0)
        rec["end_of_fit_extra_ms"] = end_extra
        rec["steady_extra_ms"] = extra
        rec["snapshots_taken"] = max(1, timed_snaps)
        rec["cost_per_snapshot_ms"] = extra / max(1, timed_snaps)
        rec["overhead_pct_projected_default"] = 100.0 * rec["cost_per_snapshot_ms"] / (MONITOR_DEFAULT_EVERY * base_step)
        rec["overhead_pct_measured"] = 100.0 * extra / plain["total_ms"]
        rec["one_time_setup_ms"] = mon.get("warmup_ms", 0.0) - plain.get("warmup_ms", 0.0)
        rec["fit_wall_extra_s"] = mon["fit_wall_s"] - plain["fit_wall_s"]
        snaps = mon.get("snapshot_step_ms") or []
        if snaps:
            # The part the training thread pays on the snapshot step itself (Grams, copies, enqueueing).
            rec["snapshot_step_extra_ms"] = statistics.fmean(snaps) - base_step
        rec["max_step_ms_ratio"] = mon["max_step_ms"] / base_step
        rec["median_step_ms_ratio"] = mon["median_step_ms"] / base_step
    return rec


SECTIONS: dict[str, Callable] = {
    "fwd_bwd": section_fwd_bwd,
    "rules": section_rules,
    "floors": section_floors,
    "stiefel": section_stiefel,
    "svdvals": section_svdvals,
    "spectral_monitor": section_spectral_monitor,
}


# ---------------------------------------------------------------------------------------------
# Checks (issue 8 targets) and the printed table


def _check(checks, ident, what, value, op, threshold, unit=""):
    passed = None
    if value is not None:
        passed = bool(value <= threshold) if op == "<=" else bool(value >= threshold) if op == ">=" else bool(value == threshold)
    checks.append({"id": ident, "what": what, "value": value, "op": op, "target": threshold, "unit": unit,
                   "passed": passed})


def compute_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    rules = results.get("rules") or {}
    floors = results.get("floors") or {}
    muon = rules.get("muon") or {}
    muon_ms = (muon.get("ours") or {}).get("median_ms")
    peer_ms = (muon.get("peer_result") or {}).get("median_ms")
    _check(checks, "muon_ms", "muon step on the hidden matrices", muon_ms, "<=", MUON_MAX_MS, "ms")
    _check(checks, "muon_speedup", "torch.optim.Muon / muon (speed-up)",
           peer_ms / muon_ms if muon_ms and peer_ms else None, ">=", MUON_MIN_SPEEDUP, "x")
    floor = floors.get("ns_floor_ms_at_achieved")
    _check(checks, "muon_floor_ratio",
           f"muon / NS floor at {floors.get('achieved_tflops', '?')} TFLOP/s",
           muon_ms / floor if muon_ms and floor else None, "<=", MUON_MAX_FLOOR_RATIO, "x")
    for label, rec in rules.items():
        if rec.get("target_max_ratio") is not None:
            _check(checks, f"ratio:{label}", f"{label} / fused AdamW (same tensors)", rec.get("ratio"), "<=",
                   rec["target_max_ratio"], "x")
    sink = (rules.get("sinkgd") or {}).get("ours") or {}
    _check(checks, "sinkgd_state", "sinkgd optimizer-state bytes per parameter", sink.get("state_bytes_per_param"),
           "==", 0.0, "B/param")
    if "persistent_delta_bytes_per_param" in sink:
        _check(checks, "sinkgd_persistent", "sinkgd allocator delta after a step, bytes per parameter",
               sink["persistent_delta_bytes_per_param"], "<=", 0.0, "B/param")
    st = results.get("stiefel") or {}
    in_place = st.get("in_place") or {}
    if in_place.get("pct_of_fwd_bwd") is not None:  # what ManifoldRetraction runs
        best = in_place
        mode = f"in place, predict {json.dumps(in_place.get('kwargs'))}"
    else:
        chosen = st.get("adaptive") if isinstance(st.get("adaptive"), dict) else st.get("fixed_5")
        best = (chosen or {}).get("batched") or {}
        mode = f"adaptive {json.dumps(chosen.get('kwargs'))}, batched" if chosen is st.get("adaptive") and chosen else "fixed 5, batched"
    _check(checks, "stiefel_pct", f"Stiefel retraction of every hidden matrix ({mode}), % of fwd+bwd",
           best.get("pct_of_fwd_bwd"), "<=", STIEFEL_MAX_PCT, "%")
    mon = results.get("spectral_monitor") or {}
    _check(checks, "monitor_pct", f"SpectralMonitor at every {MONITOR_DEFAULT_EVERY} steps, % of training (projected)",
           mon.get("overhead_pct_projected_default"), "<=", MONITOR_MAX_PCT, "%")
    if (mon.get("overhead_pct_projected_default") or 0.0) < 0:
        # the fits with the monitor ran faster than those without: the difference is the
        # fit-to-fit noise, not a cost, and proves nothing either way
        checks[-1]["passed"] = None
        checks[-1]["what"] += " (negative: below the fit-to-fit noise)"
    skipped = (mon.get("with") or {}).get("skipped_snapshots")
    # a monitor that skips snapshots has not measured anything at that cadence: its overhead
    # figure alone would pass for the wrong reason
    _check(checks, "monitor_skipped", f"SpectralMonitor snapshots skipped at every {mon.get('every_n_steps')} steps",
           skipped, "==", 0, "")
    return checks


def summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    """(figure, ours ms, peer, peer ms, ratio, floor ms) rows for stdout and the report."""
    rows: list[list[Any]] = []
    fb = results.get("fwd_bwd") or {}
    rows.append(["forward+backward", fb.get("median_ms"), "-", None, None, None])
    floors = results.get("floors") or {}
    for label, rec in (results.get("rules") or {}).items():
        ours = rec.get("ours") or {}
        peer = rec.get("peer_result") or {}
        peer_name = {"muon": "torch.optim.Muon", "adamw_fused": "AdamW(fused=True)"}.get(rec.get("peer"), rec.get("peer"))
        floor = floors.get("ns_floor_ms_at_achieved") if rec.get("rule") == "muon" else rec.get("traffic_floor_ms")
        rows.append([f"{label} step", ours.get("median_ms", ours.get("error", rec.get("skipped"))), peer_name,
                     peer.get("median_ms"), rec.get("ratio"), floor])
    st = results.get("stiefel") or {}
    for mode in ("fixed_5", "adaptive", "adaptive_check"):
        for how in ("batched", "one_by_one"):
            r = (st.get(mode) or {}).get(how) if isinstance(st.get(mode), dict) else None
            if r:
                rows.append([f"stiefel {mode} {how}", r.get("median_ms", r.get("error")), "% fwd+bwd",
                             r.get("pct_of_fwd_bwd"), None, None])
    ip = st.get("in_place") or {}
    if "median_ms" in ip or "error" in ip:
        rows.append(["stiefel in place (ManifoldRetraction)", ip.get("median_ms", ip.get("error")), "% fwd+bwd",
                     ip.get("pct_of_fwd_bwd"), None, None])
    sv = results.get("svdvals") or {}
    for how in ("one_by_one", "batched"):
        r = sv.get(how)
        if r:
            rows.append([f"svdvals {how}", r.get("median_ms", r.get("error")), "-", None, None, None])
    mon = results.get("spectral_monitor") or {}
    if "cost_per_snapshot_ms" in mon:
        rows.append(["spectral monitor, per snapshot", mon["cost_per_snapshot_ms"], "% at every 100",
                     mon.get("overhead_pct_projected_default"), None, None])
    return rows


def print_tables(data: dict[str, Any]) -> None:
    r = data["results"]
    print(f"\nbench_ops: {data['device_name']} | torch {data['torch_version']} | {data['date']} | {data['commit']}")
    print(text_table(["figure", "ours ms", "peer", "peer ms / value", "ratio", "floor ms"], summary_rows(r)))
    print()
    rows = [[c["what"], c["value"], f"{c['op']} {c['target']:g} {c['unit']}",
             "-" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")] for c in data["checks"]]
    print(text_table(["target", "value", "target", "result"], rows))
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    for k, v in errors.items():
        print(f"  section {k} failed: {v}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "commit")}
    data = run_metadata(device, args.commit, settings)
    data["kind"] = "ops"
    data["mode"] = "tiny" if args.tiny else "full"
    results: dict[str, Any] = {}
    data["results"] = results
    data["section_wall_s"] = {}
    quiet_lightning()
    try:
        model, batch = build_model(args, device)
        hidden, rest = split_parameters(model)
        results["model"] = {
            "size": args.size, "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_matrices": len(hidden), "hidden_parameters": sum(i.param.numel() for i in hidden),
            "batch": list(batch[0].shape),
        }
    except Exception as exc:  # noqa: BLE001 - nothing else can run; still write the JSON
        results["model"] = error_record(exc)
        sections = []
    ctx = {
        "args": args, "device": device, "results": results,
        "over_time": lambda: time.perf_counter() - t_start > args.time_limit,
    }
    if sections:
        ctx.update(model=model, batch=batch, hidden=hidden, rest=rest)
    for name in sections:
        if ctx["over_time"]():
            results[name] = {"skipped": f"time limit ({args.time_limit:g} s) reached"}
            continue
        t0 = time.perf_counter()
        print(f"[bench_ops] {name} ...", flush=True)
        try:
            results[name] = SECTIONS[name](ctx)
        except Exception as exc:  # noqa: BLE001
            results[name] = error_record(exc)
        data["section_wall_s"][name] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
    data["checks"] = compute_checks(results)
    data["wall_s"] = time.perf_counter() - t_start
    path = write_json(args.out, "ops.json", data)
    print_tables(data)
    print(f"\nwrote {path} ({data['wall_s']:.1f} s)")
    return data


if __name__ == "__main__":
    main()
