"""Turn the benchmark JSON files into ``docs/benchmarks.md`` (and README's benchmark section).

Reads every ``*.json`` under ``--results`` (default ``benchmarks/results/``, searched recursively)
written by ``bench_ops.py`` (``kind: ops``), ``bench_train.py`` (``kind: train``),
``bench_views.py`` (``kind: views``), ``bench_monitors.py`` (``kind: monitors``) and
``bench_orthogonalize.py`` (``kind: orthogonalize``), keeps the
newest of each kind (tiny CPU smoke results only with ``--include-tiny``), and writes the Markdown
report to ``--out`` (default ``docs/benchmarks.md``). The report is generated, never edited by hand.

It prints a short Markdown summary; with ``--readme`` (default ``README.md``) it also replaces the
text between the markers ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` in that
file with the summary when both markers are there (nothing else in the file changes).

    PYTHONPATH=. python benchmarks/report.py                      # benchmarks/results -> docs + README
    PYTHONPATH=. python benchmarks/report.py --results $OUT --out /tmp/benchmarks.md --readme none
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, fmt, markdown_table

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def variant(data: dict[str, Any]) -> str:
    """What distinguishes results of one kind: the measured sections (ops), or the policies,
    clipping of the runs (train). The report keeps the newest of each."""
    from benchmarks.bench_ops import SECTIONS
    from benchmarks.bench_train import RULES

    s = data.get("settings", {}) or {}
    if data.get("kind") == "monitors":
        return str(s.get("sizes", ""))
    if data.get("kind") == "ops":
        sections = s.get("sections")
        return "" if sections in (None, "", ",".join(SECTIONS)) else str(sections)
    parts = []
    if s.get("rules") and s.get("rules") != ",".join(RULES):
        parts.append(str(s["rules"]))
    if s.get("no_clip"):
        parts.append("no clipping")
    return ", ".join(parts)


def load_results(results_dir: Path, include_tiny: bool) -> dict[str, dict[str, Any]]:
    """The newest result of each kind (``ops``, ``train``) and variant under ``results_dir``,
    keyed ``kind`` (the full default run) or ``kind: variant``."""
    found: dict[str, list[tuple[str, Path, dict[str, Any]]]] = {}
    for path in sorted(results_dir.rglob("*.json")) if results_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipping {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or data.get("kind") not in ("ops", "train", "views", "monitors", "orthogonalize"):
            continue
        if data.get("mode") == "tiny" and not include_tiny:
            continue
        data["_path"] = str(path)
        key = data["kind"] + (f": {variant(data)}" if variant(data) else "")
        found.setdefault(key, []).append((data.get("date", ""), path, data))
    newest = {kind: max(items, key=lambda t: t[0])[2] for kind, items in found.items()}
    return merge_monitors(newest, [d for key, items in found.items() if key.startswith("monitors") for _, _, d in items])


MONITOR_SIZES = ("tiny", "small", "42m", "150m", "680m", "1.2b")


def merge_monitors(results: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``bench_monitors.py`` runs one size (or one monitor) per call to fit the device's call
    limit: its results become one table, the newest row of each (size, monitor), each with the
    commit and file it came from."""
    if not runs:
        return results
    best: dict[tuple, tuple] = {}
    for data in runs:
        for row in data.get("rows", []):
            key = (row[0], row[2])
            if key not in best or data.get("date", "") > best[key][0]:
                best[key] = (data.get("date", ""), row, data)
    order = {s: i for i, s in enumerate(MONITOR_SIZES)}
    chosen = sorted(best.values(), key=lambda t: (order.get(t[1][0], len(order)), t[1][2]))
    newest = max(chosen, key=lambda t: t[0])[2]
    merged = {k: v for k, v in newest.items() if k not in ("rows", "records")}
    merged["header"] = list(newest.get("header", [])) + ["commit"]
    merged["rows"] = [list(row) + [str(d.get("commit"))[:8]] for _, row, d in chosen]
    merged["commit"] = ", ".join(sorted({str(d.get("commit"))[:8] for _, _, d in chosen}))
    merged["settings"] = {k: v for k, v in newest.get("settings", {}).items() if k in ("every",)}
    merged["settings"]["steps"] = sorted({d.get("settings", {}).get("steps") for _, _, d in chosen})
    merged["_path"] = ", ".join(sorted({str(Path(d["_path"]).name) for _, _, d in chosen}))
    out = {k: v for k, v in results.items() if not k.startswith("monitors")}
    out["monitors"] = merged
    return out


def _result(passed: Any) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def _shown_path(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else path


def _meta_lines(data: dict[str, Any]) -> list[str]:
    s = data.get("settings", {})
    return [
        f"- device: **{data.get('device_name')}** ({data.get('device')}); mode: {data.get('mode')}",
        f"- date: {data.get('date')}; commit: `{data.get('commit')}`",
        f"- torch {data.get('torch_version')} (CUDA {data.get('cuda_version')}), lightning "
        f"{data.get('lightning_version')}, Python {data.get('python_version')}",
        f"- settings: `{json.dumps({k: v for k, v in s.items() if v is not None}, sort_keys=True)}`",
        f"- source: `{_shown_path(data['_path'])}`",
    ]


def _checks_table(checks: list[dict[str, Any]]) -> str:
    rows = [[c["what"], c["value"], f"{c['op']} {c['target']:g} {c['unit']}".strip(), _result(c["passed"])]
            for c in checks]
    return markdown_table(["target", "measured", "target", "result"], rows)


def ops_section(data: dict[str, Any]) -> list[str]:
    from benchmarks.bench_ops import summary_rows

    r = data.get("results", {})
    extra = f": {variant(data)}" if variant(data) else ""
    out = [f"## Operations (`benchmarks/bench_ops.py`){extra}", ""] + _meta_lines(data) + [""]
    model = r.get("model", {})
    if "error" in model:
        return out + [f"The model could not be built: `{model['error']}`", ""]
    fb = r.get("fwd_bwd", {})
    out += [f"GPT `{model.get('size')}`: {fmt(model.get('parameters'))} parameters, "
            f"{model.get('hidden_matrices')} hidden matrices ({fmt(model.get('hidden_parameters'))} values); "
            f"batch {model.get('batch')}, autocast {fb.get('autocast', '-')}. Median of "
            f"{data.get('settings', {}).get('repeats')} repeats after {data.get('settings', {}).get('warmup')} "
            "warm-up calls (CUDA events on GPU). Ratio = ours / peer on the same tensors.", ""]
    rows = summary_rows(r)
    out += [markdown_table(["figure", "ours (ms)", "peer", "peer (ms) / value", "ratio", "floor (ms)"], rows), ""]
    out += ["### Targets", "", _checks_table(data.get("checks", [])), ""]
    floors = r.get("floors", {})
    rules_with_floor = [(label, rec) for label, rec in r.get("rules", {}).items() if rec.get("traffic_floor_ms")]
    if rules_with_floor and floors.get("copy_bandwidth_gb_s"):
        out += ["### Memory-traffic floors", "",
                f"Floor = bytes a rule must read and write per parameter x parameters / the measured copy "
                f"bandwidth ({fmt(floors['copy_bandwidth_gb_s'])} GB/s, read + write). Muon's floor in the "
                "table above is its Newton-Schulz FLOPs; its traffic is listed for reference.", "",
                markdown_table(["rule", "bytes / param", "floor (ms)", "ours (ms)", "ours / floor"],
                               [[label, rec.get("traffic_bytes_per_param"), rec.get("traffic_floor_ms"),
                                 (rec.get("ours") or {}).get("median_ms"), rec.get("traffic_floor_ratio")]
                                for label, rec in rules_with_floor]), ""]
    if "ns_flops" in floors:
        out += ["### Newton-Schulz floor", "",
                f"{floors['ns_steps']} quintic iterations on the hidden matrices: "
                f"{floors['ns_flops'] / 1e9:,.0f} GFLOP. Floor at the dense bf16 peak "
                f"({floors['peak_tflops']:g} TFLOP/s): {fmt(floors['ns_floor_ms_at_peak'])} ms; at the achieved "
                f"rate the issue quotes ({floors['achieved_tflops']:g} TFLOP/s): "
                f"{fmt(floors['ns_floor_ms_at_achieved'])} ms. {floors.get('convention', '')}", ""]
    rules = r.get("rules", {})
    if rules:
        rows = []
        for label, rec in rules.items():
            for who, res in (("ours", rec.get("ours") or {}), (f"peer ({rec.get('peer')})", rec.get("peer_result") or {})):
                rows.append([label, who, res.get("state_bytes_per_param"), res.get("persistent_delta_bytes_per_param"),
                             res.get("peak_delta_bytes_per_param"), res.get("error", "")])
        out += ["### Optimizer-state memory", "",
                "Bytes per parameter: state tensors (`optimizer_state_bytes`), and on CUDA the allocator's "
                "delta after the first step (persistent) and at its peak (includes transient work buffers).", "",
                markdown_table(["rule", "optimizer", "state B/param", "persistent B/param", "peak B/param", "error"], rows), ""]
    st = r.get("stiefel", {})
    if st and "error" not in st:
        out += ["### Stiefel retraction", "",
                f"Start: {st.get('start')}; distance before: max {fmt(st.get('distance_before_max'))}, mean "
                f"{fmt(st.get('distance_before_mean'))}. `stiefel_retract` parameters found: "
                f"`{st.get('api_parameters')}`.", ""]
        rows = []
        for mode in ("fixed_5", "adaptive", "adaptive_check"):
            m = st.get(mode)
            if not isinstance(m, dict):
                continue
            for how in ("batched", "one_by_one"):
                x = m.get(how, {})
                rows.append([mode, f"`{json.dumps(m.get('kwargs'))}`", how, x.get("median_ms", x.get("error")),
                             x.get("pct_of_fwd_bwd"), x.get("distance_after_max"),
                             ", ".join(f"{k}: {v}" for k, v in (m.get("iterations_per_shape") or {}).items()
                                       if k not in ("error", "traceback"))])
        ip = st.get("in_place") or {}
        if ip.get("median_ms") is not None or ip.get("error"):
            rows.append(["in place (what ManifoldRetraction runs)", f"`{json.dumps(ip.get('kwargs'))}`",
                         f"stiefel_retract_, wall incl. sync {fmt(ip.get('wall_ms_per_call_incl_reset'))} ms with the reset",
                         ip.get("median_ms", ip.get("error")), ip.get("pct_of_fwd_bwd"), ip.get("distance_after_max"),
                         f"per bucket: {ip.get('steps_per_bucket')}"])
        if isinstance(st.get("adaptive"), str):
            out += [f"Adaptive mode: {st['adaptive']}.", ""]
        out += [markdown_table(["mode", "kwargs", "how", "ms", "% fwd+bwd", "distance after (max)",
                                "iterations per shape"], rows), ""]
    mon = r.get("spectral_monitor", {})
    if mon.get("with") and mon.get("without"):
        w, wo = mon["with"], mon["without"]
        out += ["### SpectralMonitor", "",
                f"{mon.get('steps')} training steps ({mon.get('policy')}, {mon.get('data')}), with and without "
                f"`SpectralMonitor(every_n_steps={mon.get('every_n_steps')})`; per-step wall time synchronised.", "",
                markdown_table(["", "median step (ms)", "max step (ms)", "timed total (ms)", "skipped snapshots"], [
                    ["without", wo.get("median_step_ms"), wo.get("max_step_ms"), wo.get("total_ms"), None],
                    ["with", w.get("median_step_ms"), w.get("max_step_ms"), w.get("total_ms"), w.get("skipped_snapshots")],
                ]), "",
                f"Steady-state extra time (timed steps plus the end-of-fit wait for the last snapshot, "
                f"{fmt(mon.get('end_of_fit_extra_ms'))} ms): {fmt(mon.get('steady_extra_ms'))} ms, "
                f"{fmt(mon.get('overhead_pct_measured'))}% at every {mon.get('every_n_steps')} steps; "
                f"{mon.get('snapshots_taken')} snapshot(s) in the timed steps -> {fmt(mon.get('cost_per_snapshot_ms'))} ms "
                f"each (all extra time charged to them), i.e. {fmt(mon.get('overhead_pct_projected_default'))}% of "
                f"training at the default cadence (every {mon.get('default_every_n_steps')} steps). The snapshot step "
                f"itself costs {fmt(mon.get('snapshot_step_extra_ms'))} ms over a plain step; the slowest monitored step "
                f"is {fmt(mon.get('max_step_ms_ratio'))}x the plain median. One-time setup in the untimed first steps "
                f"(first snapshot, pinned host buffers, worker thread): {fmt(mon.get('one_time_setup_ms'))} ms; whole-fit "
                f"wall-time difference {fmt(mon.get('fit_wall_extra_s'))} s. Fits: "
                f"{mon.get('without_total_ms_all')} ms without, {mon.get('with_total_ms_all')} ms with (timed steps; "
                "the faster of each counts).", ""]
    errors = [(k, v["error"]) for k, v in r.items() if isinstance(v, dict) and "error" in v]
    errors += [(k, v["skipped"]) for k, v in r.items() if isinstance(v, dict) and "skipped" in v]
    if errors:
        out += ["### Failed or skipped", ""] + [f"- {k}: `{e}`" for k, e in errors] + [""]
    return out


def train_section(data: dict[str, Any]) -> list[str]:
    from benchmarks.bench_train import TABLE_HEADER, table_rows

    s = data.get("settings", {})
    runs = data.get("runs", [])
    extra = f": {variant(data)}" if variant(data) else ""
    out = [f"## Training (`benchmarks/bench_train.py`){extra}", ""] + _meta_lines(data) + [""]
    comp = data.get("comparison", {})
    out += [f"GPT `{s.get('size')}` on the default corpus, {s.get('max_steps')} steps of {s.get('batch_size')} "
            "sequences per run, validation every "
            f"{s.get('val_every')} steps on {s.get('val_batches')} batches. Tokens/s: end to end through Lightning "
            f"from step {s.get('throughput_skip')} on, validation excluded. AdamW's final validation loss: "
            f"{fmt(comp.get('adamw_final_val_loss'))}.", "",
            markdown_table(TABLE_HEADER, table_rows(runs)), ""]
    if data.get("checks"):
        out += [_checks_table(data["checks"]), ""]
    pts = [r for r in runs if r.get("points")]
    if pts:
        out += ["### Validation loss against tokens (and training wall time, s)", ""]
        steps = sorted({p["step"] for r in pts for p in r["points"]})
        rows = []
        for step in steps:
            row: list[Any] = [step]
            tokens = None
            for r in pts:
                p = next((p for p in r["points"] if p["step"] == step), None)
                tokens = tokens or (p and p["tokens"])
                row.append(f"{p['val_loss']:.4f} ({p['train_wall_s']:.1f})" if p else "-")
            rows.append([row[0], tokens] + row[1:])
        out += [markdown_table(["step", "tokens"] + [r["label"] for r in pts], rows), ""]
    out += ["### Policies", ""]
    for r in runs:
        lr = f"; lr override {r['lr_override']:g}" if r.get("lr_override") is not None else ""
        out.append(f"- `{r.get('label')}`: {r.get('policy_source', '-')}{lr}")
        if "error" in r:
            out.append(f"  - failed: `{r['error']}`")
    return out + [""]


def views_section(data: dict[str, Any]) -> list[str]:
    """``bench_views.py``: the Muon step on third-party models, read through their matrix views."""
    out = ["## Muon on third-party models (`benchmarks/bench_views.py`)", ""] + _meta_lines(data) + [""]
    header = ["model", "packed QKV", "matrices", "muon ms (graph where eligible)", "muon ms (eager)",
              "graph used", "max |graph - eager| after 4 steps"]
    rows = [[r["model"], r["packed"], r["matrices"], r["muon_ms"], r["muon_eager_ms"],
             "yes" if r["graph"] else "no", f"{r['max_abs_diff_graph_vs_eager']:.1e}"] for r in data.get("rows", [])]
    return out + [markdown_table(header, rows), ""]


def _table_section(title: str, data: dict[str, Any], intro: str) -> list[str]:
    """A section for the scripts that write their own ``header`` and ``rows`` into the JSON."""
    return (["## " + title, ""] + _meta_lines(data) + ["", intro, "",
            markdown_table(data.get("header", []), data.get("rows", [])), ""])


def monitors_section(data: dict[str, Any]) -> list[str]:
    """``bench_monitors.py``: each measurement callback's cost against model size (issue 17)."""
    return _table_section(
        "Monitors against model size (`benchmarks/bench_monitors.py`)", data,
        f"Project GPT, Muon on hidden matrices, bf16-mixed, each monitor at its defaults; target: "
        f"<= {data.get('target_pct')}% of training time and no skipped snapshot. Cost per snapshot = what "
        "the steps with a snapshot or a busy worker took beyond the fit's quiet median.")


def orthogonalize_section(data: dict[str, Any]) -> list[str]:
    """``bench_orthogonalize.py``: the muon step's Newton-Schulz variants against model size (issue 18)."""
    return _table_section(
        "Orthogonalization against model size (`benchmarks/bench_orthogonalize.py`)", data,
        f"Real gradients of one bf16 forward+backward, hidden matrices; floor = FLOPs of five plain quintic "
        f"steps at the measured bf16 matmul rate ({fmt(data.get('matmul_tflops'))} TFLOP/s); polar error = "
        "relative Frobenius distance from the exact polar factor (float64 SVD) of sampled gradients.")


def summary(results: dict[str, dict[str, Any]]) -> str:
    """Short Markdown for README's "Benchmark results" section."""
    if not results:
        return ("No GPU benchmark results yet: run `benchmarks/bench_ops.py` and `benchmarks/bench_train.py` "
                "(see [docs/benchmarks.md](docs/benchmarks.md)).")
    lines = []
    for key in sorted(results, key=lambda k: (not k.startswith("ops"), k)):
        data = results[key]
        kind = data["kind"]
        if kind in ("views", "monitors", "orthogonalize"):
            continue  # docs/benchmarks.md only
        extra = f" ({variant(data)})" if variant(data) else ""
        lines.append(f"**{'Operations' if kind == 'ops' else 'Training'}{extra}** on {data.get('device_name')} "
                     f"({data.get('date', '')[:10]}, commit `{str(data.get('commit'))[:10]}`, torch "
                     f"{data.get('torch_version')}):")
        lines.append("")
        rows = [[c["what"], c["value"], f"{c['op']} {c['target']:g} {c['unit']}".strip(), _result(c["passed"])]
                for c in data.get("checks", [])]
        if kind == "ops":
            fb = data.get("results", {}).get("fwd_bwd", {}).get("median_ms")
            rows.insert(0, ["forward+backward (ms)", fb, "-", "-"])
        if kind == "train":
            for r in data.get("runs", []):
                rows.append([f"{r.get('label')}: final val loss / tokens to AdamW's final", 
                             f"{fmt(r.get('final_val_loss'))} / {fmt(r.get('tokens_to_adamw_final'))}", "-", "-"])
        lines += [markdown_table(["figure", "measured", "target", "result"], rows), ""]
    lines.append("Full tables, settings and peers: [docs/benchmarks.md](docs/benchmarks.md) "
                 "(generated by `benchmarks/report.py`).")
    return "\n".join(lines)


def render(results: dict[str, dict[str, Any]], results_dir: Path) -> str:
    try:
        shown = results_dir.resolve().relative_to(ROOT)
    except ValueError:
        shown = results_dir
    out = [f"<!-- GENERATED by benchmarks/report.py from {shown}/ -- do not edit by hand; rerun the report. -->",
           "", "# Benchmarks", "",
           "Generated by `benchmarks/report.py` from the JSON results of `benchmarks/bench_ops.py` and "
           f"`benchmarks/bench_train.py` in `{shown}/`; regenerate it, never edit it by hand. Targets are "
           "those of issue 8 for the H100 setup (42M byte-level GPT, batch 16 x 1024, bf16 autocast); "
           "results from other devices are shown with the same targets for reference.", ""]
    if not results:
        out += ["No results yet. On a GPU machine:", "", "```bash",
                "PYTHONPATH=. python benchmarks/bench_ops.py --out benchmarks/results/ops",
                "PYTHONPATH=. python benchmarks/bench_train.py --out benchmarks/results/train --budget-seconds 300",
                "PYTHONPATH=. python benchmarks/report.py", "```", ""]
    for key in sorted(results, key=lambda k: (not k.startswith("ops"), k)):
        data = results[key]
        section = {"ops": ops_section, "train": train_section, "views": views_section,
                   "monitors": monitors_section, "orthogonalize": orthogonalize_section}[data["kind"]]
        out += section(data)
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, text: str) -> bool:
    """Replace the text between the benchmark markers; False when the markers are not there."""
    if not readme.is_file():
        return False
    content = readme.read_text()
    i, j = content.find(START), content.find(END)
    if i < 0 or j < 0 or j < i:
        return False
    new = content[: i + len(START)] + "\n" + text.strip() + "\n" + content[j:]
    if new != content:
        readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="directory of result JSON files")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report to write")
    p.add_argument("--readme", default=str(ROOT / "README.md"),
                   help="README whose benchmark markers get the summary ('none' to leave it alone)")
    p.add_argument("--include-tiny", action="store_true", help="also use tiny CPU smoke results")
    args = p.parse_args(argv)
    results_dir = Path(args.results)
    results = load_results(results_dir, args.include_tiny)
    report = render(results, results_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    text = summary(results)
    print(text)
    print(f"\nwrote {out}")
    if args.readme != "none":
        if update_readme(Path(args.readme), text):
            print(f"updated the benchmark section of {args.readme}")
        else:
            print(f"{args.readme}: no {START} ... {END} markers; paste the summary above by hand")
    return report


if __name__ == "__main__":
    main()
