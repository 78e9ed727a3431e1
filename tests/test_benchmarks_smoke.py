"""Smoke test of the issue-8 benchmark scripts in their tiny CPU mode: they run, print their
tables, write JSON with the expected keys, and report.py turns that JSON into Markdown (and
rewrites only the marked README section). Nothing here is about time."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_monitors, bench_ops, bench_orthogonalize, bench_train, report

META_KEYS = {"device", "device_name", "torch_version", "date", "commit", "settings", "kind", "mode", "checks"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ops = bench_ops.main(["--tiny", "--device", "cpu", "--out", str(root / "ops"), "--commit", "abc123"])
    train = bench_train.main(["--tiny", "--device", "cpu", "--out", str(root / "train"), "--max-steps", "6",
                              "--val-every", "3", "--lr", "muon=0.01"])
    monitors = bench_monitors.main(["--sizes", "tiny", "--steps", "12", "--every", "4", "--device", "cpu",
                                    "--out", str(root / "monitors"), "--commit", "abc123"])
    ortho = bench_orthogonalize.main(["--models", "tiny", "--device", "cpu", "--repeats", "2",
                                      "--out", str(root / "ortho"), "--commit", "abc123"])
    return root, ops, train, monitors, ortho


def test_bench_ops_writes_every_section(results, capsys):
    root = results[0]
    data = json.loads((root / "ops" / "ops.json").read_text())
    assert META_KEYS <= set(data)
    assert data["commit"] == "abc123" and data["kind"] == "ops" and data["mode"] == "tiny"
    r = data["results"]
    for section in ("model", "fwd_bwd", "rules", "floors", "stiefel", "svdvals", "spectral_monitor"):
        assert section in r and "error" not in r[section], (section, r.get(section))
    assert r["fwd_bwd"]["median_ms"] > 0
    for label, _rule, _scope, _hp, _peer, _ratio in bench_ops.RULE_CASES:
        rec = r["rules"][label]
        assert "error" not in rec["ours"], rec["ours"]
        assert rec["ours"]["median_ms"] > 0 and rec["peer_result"]["median_ms"] > 0
        assert rec["ratio"] == pytest.approx(rec["ours"]["median_ms"] / rec["peer_result"]["median_ms"])
    # sinkgd is stateless; AdamW keeps two fp32 moments (8 B/param) plus a step scalar per tensor.
    assert r["rules"]["sinkgd"]["ours"]["state_bytes_per_param"] == 0
    assert r["rules"]["adamw (all)"]["peer_result"]["state_bytes_per_param"] >= 8
    # The floor counts 5 x (4 m^2 n + 2 m^3) FLOPs per hidden matrix (m <= n).
    expected = sum(5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in r["floors"]["hidden_shapes"])
    assert r["floors"]["ns_flops"] == pytest.approx(expected)
    # the memory-traffic floor: bytes per parameter x parameters of the scope / copy bandwidth
    bandwidth = r["floors"]["copy_bandwidth_gb_s"] * 1e9
    assert bandwidth > 0
    adamw = r["rules"]["adamw (all)"]
    assert adamw["traffic_bytes_per_param"] == 28  # p r/w, g r, m r/w, v r/w in fp32
    numel = r["model"]["parameters"]
    assert adamw["traffic_floor_ms"] == pytest.approx(28 * numel / bandwidth * 1e3, rel=1e-9)
    assert adamw["traffic_floor_ratio"] == pytest.approx(adamw["ours"]["median_ms"] / adamw["traffic_floor_ms"])
    st = r["stiefel"]
    assert st["distance_before_max"] > 1e-3  # the muon step moved the weights off the manifold
    assert st["fixed_5"]["batched"]["distance_after_max"] < 1e-4  # and the retraction put them back
    mon = r["spectral_monitor"]
    assert {"with", "without", "overhead_pct_projected_default"} <= set(mon)
    assert {c["id"] for c in data["checks"]} >= {"muon_ms", "muon_speedup", "sinkgd_state", "stiefel_pct", "monitor_pct"}


def test_bench_ops_prints_tables(results, capsys):
    ops = results[1]
    bench_ops.print_tables(ops)
    out = capsys.readouterr().out
    assert "muon step" in out and "torch.optim.Muon" in out and "PASS" in out  # sinkgd's 0 B/param


def test_bench_train_runs_every_policy(results, capsys):
    root = results[0]
    data = json.loads((root / "train" / "train.json").read_text())
    assert META_KEYS <= set(data) and data["kind"] == "train"
    labels = [r["label"] for r in data["runs"]]
    assert labels == list(bench_train.RULES)
    for run in data["runs"]:
        assert "error" not in run, run.get("error")
        assert run["steps"] == 6 and [p["step"] for p in run["points"]] == [3, 6]
        assert run["tokens"] == 6 * run["tokens_per_step"]
        assert all(p["val_loss"] == p["val_loss"] for p in run["points"])  # not NaN
        assert run["tokens_per_s"] > 0
    by = {r["label"]: r for r in data["runs"]}
    assert by["muon"]["lr_override"] == 0.01
    assert any(r["optimizer"] == "muon" and r["lr"] == 0.01 for r in by["muon"]["policy"])
    assert by["adamw"]["tokens_to_adamw_final"] is not None  # AdamW reaches its own final loss
    assert data["checks"][0]["id"] == "muon_tokens_per_s"


def test_tokens_to_reach_interpolates():
    pts = [{"tokens": 100, "val_loss": 3.0}, {"tokens": 200, "val_loss": 2.0}, {"tokens": 300, "val_loss": 1.5}]
    assert bench_train.tokens_to_reach(pts, 2.5) == pytest.approx(150)
    assert bench_train.tokens_to_reach(pts, 3.5) == 100
    assert bench_train.tokens_to_reach(pts, 1.0) is None


def test_report_renders_and_updates_marked_readme(results, tmp_path, capsys):
    root = results[0]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmarks:start -->\nold\n<!-- benchmarks:end -->\noutro\n")
    md = tmp_path / "benchmarks.md"
    report.main(["--results", str(root), "--out", str(md), "--readme", str(readme), "--include-tiny"])
    text = md.read_text()
    assert text.startswith("<!-- GENERATED by benchmarks/report.py")
    assert "## Operations" in text and "## Training" in text and "torch.optim.Muon" in text
    assert "## Monitors against model size" in text and "NewtonSchulzAnalysis" in text
    assert "## Orthogonalization against model size" in text and "polar_express" in text
    assert "abc123" in text
    new = readme.read_text()
    assert new.startswith("intro\n<!-- benchmarks:start -->\n") and new.endswith("<!-- benchmarks:end -->\noutro\n")
    assert "old" not in new and "Muon policy / AdamW policy" in new
    # Without --include-tiny, smoke results are not reported as benchmark results.
    report.main(["--results", str(root), "--out", str(md), "--readme", "none"])
    assert "No results yet" in md.read_text()


def test_bench_monitors_measures_every_monitor_against_a_monitor_free_fit(results):
    monitors = results[3]
    assert monitors["kind"] == "monitors" and monitors["mode"] == "tiny"
    fits = monitors["records"][0]["fits"]
    assert set(fits) == {"none", "SpectralMonitor", "NewtonSchulzAnalysis", "ComponentGradientAnalysis"}
    for name, fit in fits.items():
        assert "error" not in fit, (name, fit)
        if name != "none":
            # snapshots at steps 4 and 8 (step 0 is in the warm-up); the cost is a number of ms
            assert fit["snapshot_steps"] == [4, 8] and fit["cost_per_snapshot_ms"] == fit["cost_per_snapshot_ms"]
    assert [row[2] for row in monitors["rows"]] == ["SpectralMonitor", "NewtonSchulzAnalysis", "ComponentGradientAnalysis"]


def test_bench_orthogonalize_times_every_variant_and_measures_polar_errors(results):
    ortho = results[4]
    rec = ortho["records"][0]
    assert ortho["kind"] == "orthogonalize" and "error" not in rec
    for label in bench_orthogonalize.VARIANTS:
        assert isinstance(rec[f"{label}_ms"], float), (label, rec[f"{label}_ms"])
    assert isinstance(rec["torch_muon_ms"], float)
    errors = rec["polar_error"]
    # the Gram form is the same iteration; the schedule lands closer to the polar factor
    assert errors["gram"] == pytest.approx(errors["plain"], rel=1e-3)
    assert errors["polar_express"] < errors["plain"]
