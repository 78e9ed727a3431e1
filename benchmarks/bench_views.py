"""Muon on models this project did not write: the step with each parameter's matrix view.

For HF GPT-2 (Conv1D weights stored (in, out)), an HF Llama-style model and the project's GPT, the
hidden matrices get the policy's Muon rule; the table prints the Muon step time (CUDA graph where
eligible, and forced eager), with packed projections whole and split (``split_packed``), and the
largest deviation of the graph step from the eager step after a few steps.

    python benchmarks/bench_views.py --out benchmarks/results
    python benchmarks/bench_views.py --models gpt --repeats 1   # one model, a quick check
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from benchmarks.common import pick_device, run_metadata, text_table, time_fn, write_json
from lightning_optlab import build_optimizer


def _models():
    """key -> (label, a function building the model): the model then lives only inside ``_measure``."""
    import transformers

    from lightning_optlab.models import GPT

    warnings.filterwarnings("ignore", module="transformers")
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    return {"gpt2": ("HF GPT-2 124M", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config())),
            "llama": ("HF Llama 12 x 1024 (GQA)", lambda: transformers.LlamaForCausalLM(cfg)),
            "gpt": ("GPT 44M (this project)", GPT)}


def _policy(split: bool, cuda_graph: bool | str):
    return {"rules": [
        {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02, "split_packed": split,
         "cuda_graph": cuda_graph},
        {"match": {}, "optimizer": "adamw", "lr": 1e-3},
    ]}


def _measure(label: str, model: torch.nn.Module, device: torch.device, repeats: int):
    """Table rows and JSON records of one model: packed projections whole and split."""
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    for split in (False, True):
        times, finals = {}, {}
        for graph in ("auto", False):
            m = copy.deepcopy(model)
            for p, q in zip(m.parameters(), model.parameters()):
                p.grad = q.grad.clone()
            opt = build_optimizer(m, _policy(split, graph))
            muon = [g for g in opt.param_groups if g["algorithm"] == "muon"]
            for g in opt.param_groups:  # time the Muon groups alone
                if g["algorithm"] != "muon":
                    g["lr"] = 0.0
            for _ in range(4):
                opt.step()
            finals[graph] = [p.detach().clone() for g in muon for p in g["params"]]
            times[graph] = time_fn(opt.step, device, repeats, warmup=3)["median_ms"]
            if graph == "auto":
                used_graph = any("muon_graph" in g.get("_runtime", {}) for g in muon)
        count = sum(len(g["params"]) for g in muon)
        diff = max(float((a - b).abs().max()) for a, b in zip(finals["auto"], finals[False]))
        packed = "split" if split else "whole"
        row = [label, packed, count, times["auto"], times[False], "yes" if used_graph else "no", f"{diff:.1e}"]
        out.append((row, {"model": label, "packed": packed, "matrices": count, "muon_ms": times["auto"],
                          "muon_eager_ms": times[False], "graph": used_graph, "max_abs_diff_graph_vs_eager": diff}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default="gpt2,llama,gpt", help="comma-separated: gpt2, llama, gpt")
    args = parser.parse_args()
    device = pick_device(args.device)
    models = _models()
    keys = args.models.split(",")
    unknown = [k for k in keys if k not in models]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(models)}")
    rows, records = [], []
    for label, build in (models[k] for k in keys):
        for row, record in _measure(label, build().to(device), device, args.repeats):
            rows.append(row)
            records.append(record)
        if device.type == "cuda":  # after _measure returned: its model, copies and optimizers are gone
            torch.cuda.empty_cache()
    header = ["model", "packed QKV", "matrices", "muon ms (auto)", "muon ms (eager)", "graph", "graph - eager"]
    print(text_table(header, rows))
    if args.out:
        write_json(args.out, "bench_views.json", {"kind": "views", **run_metadata(device, None, vars(args)), "rows": records})


if __name__ == "__main__":
    main()
