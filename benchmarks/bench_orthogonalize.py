"""Muon's orthogonalization against model size (issue 18): the project's GPT from 44M to 1.2B
parameters and HF GPT-2 small built from its config, real gradients of one bf16 forward and
backward, the hidden matrices.

Per model: forward+backward time; the muon step (ModularOptimizer, hidden matrices only) for
each Newton-Schulz variant -- the plain quintic, the Gram form (``ns_method``), the Polar Express
schedule (``ns_coefficients``) and both -- against ``torch.optim.Muon``; the 5-step plain-NS floor
(its FLOPs at the bf16 matmul rate measured here); and each variant's orthogonalization error
(relative Frobenius distance of NS(momentum-free gradient) from its exact polar factor, float64
SVD of a sample of matrices per shape) next to ``torch.optim.Muon``'s iteration in bf16.

    PYTHONPATH=. python benchmarks/bench_orthogonalize.py --out benchmarks/results/h200
    PYTHONPATH=. python benchmarks/bench_orthogonalize.py --models tiny --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ops import ns_flops
from benchmarks.common import error_record, pick_device, run_metadata, text_table, time_fn, write_json

BATCH = {"42m": 16, "150m": 8, "680m": 4, "1.2b": 2, "gpt2": 8, "tiny": 2}
VARIANTS = {
    "plain": {},
    "gram": {"ns_method": "auto"},
    "polar_express": {"ns_coefficients": "polar_express"},
    "gram + polar_express": {"ns_method": "auto", "ns_coefficients": "polar_express"},
}


def _model(name: str):
    if name == "gpt2":
        import transformers

        return transformers.GPT2LMHeadModel(transformers.GPT2Config()), 1024, 50257
    from lightning_optlab.models import GPT

    model = GPT(size=name)
    return model, model.context_length, 256


def _loss(model, tokens):
    out = model(tokens[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def matmul_tflops(device, n: int = 8192, repeats: int = 20) -> float:
    """The bf16 matmul rate this device reaches on a square product (the floor's denominator)."""
    if device.type != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    ms = time_fn(lambda: a @ a, device, repeats, 3)["median_ms"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _polar_error(G: torch.Tensor, O: torch.Tensor) -> float:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    P = U @ Vh
    return float((O.double() - P).norm() / P.norm())


def measure(name: str, device, repeats: int, sample: int) -> dict[str, Any]:
    from lightning_optlab import build_optimizer
    from lightning_optlab.optim.newton_schulz import newton_schulz, polar_express_schedule
    from lightning_optlab.policy import describe_parameters

    torch.manual_seed(0)
    model, T, vocab = _model(name)
    model = model.to(device)
    tokens = torch.randint(0, vocab, (BATCH.get(name, 2), T + 1), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with amp:
            loss = _loss(model, tokens)
        loss.backward()

    rec: dict[str, Any] = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
                           "batch": f"{BATCH.get(name, 2)} x {T}", "fwd_bwd_ms": time_fn(fwd_bwd, device, repeats, 2)["median_ms"]}
    hidden = [i for i in describe_parameters(model) if i.role == "hidden"]
    params = [i.param for i in hidden]
    grads = [p.grad.detach().clone() for p in params]
    shapes = [tuple(i.view.to_matrix(p).shape[-2:]) for i, p in zip(hidden, params)]
    rec["hidden_matrices"] = len(params)
    rec["ns_floor_flops"] = ns_flops(shapes, 5)
    hidden_ids = {id(p) for p in params}
    for p in model.parameters():  # the rest without gradients: their rule skips them
        if id(p) not in hidden_ids:
            p.grad = None
    for label, extra in VARIANTS.items():
        try:
            policy = {"rules": [{"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02, **extra},
                                {"match": {}, "optimizer": "sgd", "lr": 0.0}]}
            opt = build_optimizer(model, policy)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            rec[f"{label}_ms"] = time_fn(opt.step, device, repeats, 3)["median_ms"]
        except Exception as exc:  # noqa: BLE001
            rec[f"{label}_ms"] = error_record(exc)
    try:
        peer = torch.optim.Muon(params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                                adjust_lr_fn="original")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        rec["torch_muon_ms"] = time_fn(peer.step, device, repeats, 3)["median_ms"]
    except Exception as exc:  # noqa: BLE001
        rec["torch_muon_ms"] = error_record(exc)
    # orthogonalization error on a sample of matrices per shape (the gradient itself: no momentum)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    by_shape: dict[tuple, list] = {}
    for info, g in zip(hidden, grads):
        m = info.view.to_matrix(g)
        for mat in (m if m.ndim == 3 else m[None]):
            by_shape.setdefault(tuple(mat.shape), []).append(mat)
    errors: dict[str, list[float]] = {}
    for mats in by_shape.values():
        for G in mats[:sample]:
            variants = {"plain": newton_schulz(G, 5, dtype=dtype),
                        "gram": newton_schulz(G, 5, dtype=dtype, method="auto"),
                        "polar_express": newton_schulz(G, 5, polar_express_schedule(5), dtype=dtype),
                        "gram + polar_express": newton_schulz(G, 5, polar_express_schedule(5), dtype=dtype, method="auto")}
            for label, O in variants.items():
                errors.setdefault(label, []).append(_polar_error(G, O))
            try:  # torch.optim.Muon's own iteration, as its step runs it
                from torch.optim._muon import _zeropower_via_newtonschulz

                O = _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)
                errors.setdefault("torch_muon", []).append(_polar_error(G, O))
            except Exception:  # noqa: BLE001 - a torch without that private helper
                pass
    rec["polar_error"] = {k: sum(v) / len(v) for k, v in errors.items()}
    return rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="42m,150m,680m,1.2b,gpt2")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sample", type=int, default=2, help="matrices per shape whose polar error is measured")
    p.add_argument("--out", default=None)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    tflops = matmul_tflops(device)
    rows, records = [], []
    for name in args.models.split(","):
        try:
            rec = measure(name, device, args.repeats, args.sample)
        except Exception as exc:  # noqa: BLE001
            rec = {"model": name, **error_record(exc)}
        if device.type == "cuda":  # the model, its optimizers and grads are freed once measure returns
            torch.cuda.empty_cache()
        floor_ms = rec.get("ns_floor_flops", 0) / (tflops * 1e12) * 1e3 if "ns_floor_flops" in rec else None
        rec["ns_floor_ms"] = floor_ms
        records.append(rec)
        best = min((rec.get(f"{k}_ms") for k in VARIANTS if isinstance(rec.get(f"{k}_ms"), float)), default=None)
        err = rec.get("polar_error", {})
        def cell(v):
            return v.get("error", "error") if isinstance(v, dict) else v

        rows.append([name, rec.get("parameters"), cell(rec.get("fwd_bwd_ms", rec.get("error"))),
                     *[cell(rec.get(f"{k}_ms")) for k in VARIANTS], cell(rec.get("torch_muon_ms")), floor_ms, best / floor_ms if best and floor_ms else None,
                     *[err.get(k) for k in VARIANTS], err.get("torch_muon")])
    header = ["model", "parameters", "fwd+bwd ms", *[f"{k} ms" for k in VARIANTS], "torch.optim.Muon ms",
              "5-step NS floor ms", "best / floor", *[f"{k} polar err" for k in VARIANTS], "torch.optim.Muon polar err"]
    print(f"bf16 matmul rate: {tflops:.0f} TFLOP/s")
    print(text_table(header, rows))
    result = run_metadata(device, args.commit, vars(args))
    result.update({"kind": "orthogonalize", "mode": "tiny" if args.models == "tiny" else "full",
                   "matmul_tflops": tflops, "header": header, "rows": rows, "records": records})
    if args.out:
        print("wrote", write_json(args.out, "orthogonalize.json", result))
    return result


if __name__ == "__main__":
    main()
