"""The evidence page (issue 9): regenerated from the stored run summaries on CPU, one row per claim.

The stored summaries (benchmarks/results/evidence/*.json) are the GPU and CPU runs' results; the
page and the README block must be exactly what the script makes of them (never edited by hand).
The statistics helpers are checked against numpy, the run selection on synthetic summaries, and
one tiny real run goes through ``evidence.py run`` to its summary and the report.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks import evidence
from benchmarks.common import first_reach
from benchmarks import evidence_report as report

ROOT = Path(__file__).resolve().parents[1]


def stored_runs():
    runs = evidence.load_summaries(evidence.STORE)
    if not runs:
        pytest.fail(f"no stored evidence summaries under {evidence.STORE}")
    return runs


def test_page_regenerates_from_the_stored_summaries(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    path = report.write_report(stored_runs(), docs=tmp_path / "docs", readme=readme,
                               repeats=evidence.load_repeats(evidence.STORE), ops=evidence.load_ops())
    text = path.read_text()
    rows = {m.group(1): line for line in text.splitlines() if (m := re.match(r"^\| (\w+) \| ", line))}
    for key in report.CLAIM_KEYS:
        assert key in rows, f"claim row {key} missing from the page"
        assert "Not run yet" not in rows[key], f"claim {key} lacks stored runs: {rows[key][-200:]}"
        cells = rows[key].split(" | ")
        assert len(cells) == 6 and all(c.strip() for c in cells), rows[key]
    figures = re.findall(r"\]\(figures/([\w.]+\.png)\)", text)
    assert figures, "the page links no figure"
    for name in figures:
        assert (tmp_path / "docs" / "figures" / name).stat().st_size > 1000
        assert (ROOT / "docs" / "figures" / name).exists(), f"docs/figures/{name} is linked but not committed"
    # the committed page and README block are the script's output, not hand edits
    assert (ROOT / "docs" / "results.md").read_text() == text, "docs/results.md differs: rerun evidence.py report"
    assert readme.read_text() == (ROOT / "README.md").read_text(), "README results block differs: rerun the report"
    # the block's protocol line counts the stored 3000-step summaries (read here from the files)
    import json
    n = sum(json.loads(f.read_text()).get("suite") == "gpt3k" for f in evidence.STORE.glob("*.json"))
    assert f"3000-step protocol, run across sessions: {n} of about " in readme.read_text()


def test_stored_summaries_follow_the_tuning_rule():
    """Every stored arm of the first protocol has its full seed-0 sweep and extra seeds at the best
    multiplier; in the 3000-step suite (run across sessions) every extra seed sits at its family's
    best (variant, multiplier) of a complete sweep, and no seed-0 run lies outside the sweep plan."""
    runs = stored_runs()
    for key, arm in evidence.ARMS.items():
        mine = [r for r in runs.values() if r["arm"] == key]
        extra = [r for r in mine if r["seed"] != 0]
        if arm.suite.startswith("gpt3k"):
            assert all(r["multiplier"] in evidence.sweep_multipliers(arm, runs=runs) for r in mine if r["seed"] == 0), key
            if extra:
                best = evidence.family_best(arm, runs)
                assert best is not None and best[0] is arm, key
                assert all(r["multiplier"] == best[1] for r in extra), key
            if arm.fixed_from:  # its other rules ran at the best multiplier the stored runs give now
                assert all(r["fixed_multiplier"] == evidence.fixed_multiplier(arm, runs) for r in mine), key
            continue
        best = evidence.best_multiplier(arm, runs)
        assert best is not None, f"{key}: incomplete sweep"
        assert extra, f"{key}: no seed beyond 0"
        assert all(r["multiplier"] == best for r in extra), key


def test_roughness_matches_numpy():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 600, 10)
    values = 3.0 * np.exp(-steps / 200) + 0.05 * rng.standard_normal(len(steps))
    points = [[int(s), float(v)] for s, v in zip(steps, values)]
    kept = values[steps >= 0.25 * steps[-1]]
    moving = np.convolve(kept, np.ones(5) / 5, mode="valid")
    expected = np.std(kept[2:-2] - moving)
    assert report.roughness(points, window=5) == pytest.approx(expected, rel=1e-9)


def test_steps_to_interpolates_between_logged_points():
    pts = [[0, 4.0], [50, 3.0], [100, 2.0], [150, 1.5]]
    assert first_reach(pts, 2.5) == pytest.approx(75.0)
    assert first_reach(pts, 4.5) == 0.0
    assert first_reach(pts, 1.0) is None
    assert first_reach([[0, 0.5], [10, 0.9]], 0.8, below=False) == pytest.approx(7.5)


def _summary(arm, m, seed, loss, error=None):
    run = {"schema": evidence.SUMMARY_SCHEMA, "run": evidence.run_id(arm, m, seed), "arm": arm.key,
           "suite": arm.suite, "multiplier": m, "seed": seed, "scalars": {"val/loss": [[10, loss]]}}
    if error:
        run["error"] = error
    return run


def test_best_multiplier_skips_failed_runs_and_the_plan_orders_sweep_then_seeds():
    arm = evidence.ARMS["S1"]  # sweep centred at x100, plus the notes' lr once
    sweep = evidence.sweep_multipliers(arm)
    assert sweep[:3] == pytest.approx([100 / 3, 100, 300]) and sweep[3] == 1.0
    runs = {}
    plan = evidence.plan_runs([arm], runs, seeds=(0, 1))
    assert [(m, s) for _, m, s in plan] == [(m, 0) for m in sweep]  # no seed 1 before the sweep is done
    for m, loss, err in zip(sweep[:3], (2.0, 1.5, math.nan), (None, None, "FloatingPointError: non-finite")):
        r = _summary(arm, m, 0, 0.1 if err else loss, err)  # a failed run scores +inf whatever it logged
        runs[r["run"]] = r
    assert evidence.best_multiplier(arm, runs) == 100.0
    plan = evidence.plan_runs([arm], runs, seeds=(0, 1))
    assert [(m, s) for _, m, s in plan] == [(1.0, 0), (100.0, 1)]


def test_a_tiny_run_becomes_a_summary_and_a_partial_report(tmp_path):
    out = tmp_path / "ev"
    assert evidence.main(["run", "--suite", "mnist", "--arms", "ns_muon3", "--sweep", "1", "--seeds", "0",
                          "--max-steps", "3", "--tiny", "--out", str(out), "--store", "", "--device", "cpu"]) == 0
    summary = evidence.load_summaries(out / "summaries")["ns_muon3-x1-s0"]
    assert summary["steps"] == 3 and not summary.get("error")
    assert summary["lrs"] == {"matrices": 0.02, "rest": 1e-3}  # the config's lrs times 1
    assert 0.0 <= summary["test"]["test/acc"] <= 1.0
    assert math.isfinite(summary["scalars"]["val/loss"][-1][1])
    assert summary["optimizer_state"]["by_rule"]["matrices"]["algorithm"] == "muon"
    path = report.write_report({summary["run"]: summary}, docs=tmp_path / "docs")
    text = path.read_text()
    for key in report.CLAIM_KEYS:
        assert f"| {key} |" in text
    assert "Not run yet" in text


def test_workers_share_one_plan_and_record_that_they_shared_the_device(tmp_path):
    out = tmp_path / "ev"
    assert evidence.main(["run", "--suite", "mnist", "--arms", "ns_muon3", "--sweep", "1,2", "--seeds", "0",
                          "--max-steps", "2", "--tiny", "--out", str(out), "--store", "", "--device", "cpu",
                          "--workers", "2", "--concurrent", "5"]) == 0
    runs = evidence.load_summaries(out / "summaries")
    assert {"ns_muon3-x1-s0", "ns_muon3-x2-s0"} <= set(runs)  # and the sweep's extension past an edge
    assert all(r["concurrent_runs"] == 2 and r["steps"] == 2 and not r.get("error") for r in runs.values())
    started = [re.findall(r"\[evidence\] (ns_muon3-x[\d.]+-s0) \(", (out / "workers" / f"w{i}.log").read_text())
               for i in range(2)]
    assert sorted(sum(started, [])) == sorted(runs)  # each run claimed by exactly one worker


def test_only_runs_the_named_runs_of_the_plan_and_refuses_one_it_does_not_need(tmp_path):
    out = tmp_path / "ev"
    common = ["run", "--suite", "mnist", "--arms", "ns_muon3", "--sweep", "1,2", "--seeds", "0", "--max-steps", "2",
              "--tiny", "--out", str(out), "--store", "", "--device", "cpu"]
    assert evidence.main([*common, "--only", "ns_muon3-x2-s0"]) == 0
    assert set(evidence.load_summaries(out / "summaries")) == {"ns_muon3-x2-s0"}  # not x1, nor an extension
    for wrong in ("ns_muon3-x2-s0", "ns_muon3-x8-s0"):  # stored now; past the edge, not known to be needed
        with pytest.raises(SystemExit, match=f"--only: {wrong} not among the runs the plan needs now"):
            evidence.main([*common, "--only", wrong, "--workers", "2"])


def _stop_training_at_step(monkeypatch, step, stop):
    """Patch Lightning's training-epoch loop so that ``stop()`` happens as step ``step`` begins."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    advance = _TrainingEpochLoop.advance

    def stopping(self, *a, **k):
        if self.trainer.global_step == step:
            stop()
        return advance(self, *a, **k)

    monkeypatch.setattr(_TrainingEpochLoop, "advance", stopping)


TINY_RUN = ["run", "--suite", "mnist", "--arms", "ns_muon3", "--sweep", "1", "--seeds", "0",
            "--max-steps", "4", "--tiny", "--store", "", "--device", "cpu"]


def test_a_run_stopped_by_sigterm_writes_no_summary_and_runs_again_later(tmp_path, monkeypatch):
    """`timeout` and the device's limit stop a call with SIGTERM; what the run logged until then is
    not a result of the sweep (it used to be stored as a failed run, scoring +inf)."""
    import os
    import signal

    out = tmp_path / "ev"
    before = signal.getsignal(signal.SIGTERM)
    _stop_training_at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        evidence.main([*TINY_RUN, "--out", str(out)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the worker's handler is undone
    assert evidence.load_summaries(out / "summaries") == {}
    monkeypatch.undo()
    shutil.rmtree(out / "claims")  # a later call starts with its own claims
    assert evidence.main([*TINY_RUN, "--out", str(out)]) == 0
    assert evidence.load_summaries(out / "summaries")["ns_muon3-x1-s0"]["steps"] == 4


def test_a_call_stopped_by_timeout_stops_its_workers_and_says_what_they_were_running(tmp_path):
    """The device's case: `timeout` signals the whole process group of `run --workers 2`; no run
    leaves a summary, and the parent prints each worker's last lines before it exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ev"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evidence.py"), "run", "--suite", "mnist", "--arms", "ns_muon3",
           "--sweep", "1,2", "--seeds", "0", "--max-steps", "100000", "--tiny", "--out", str(out), "--store", "",
           "--device", "cpu", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        logs = [out / "workers" / f"w{i}.log" for i in range(2)]
        deadline = time.time() + 240
        while not all(log.exists() and "elapsed) ..." in log.read_text() for log in logs):
            assert time.time() < deadline and proc.poll() is None, "the workers did not start their runs"
            time.sleep(1)
        time.sleep(3)  # inside their fits
        os.killpg(proc.pid, signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143
    assert len(re.findall(r"ns_muon3-x[12]-s0 was stopped by SIGTERM; no summary written", text)) == 2, text
    assert not (out / "summaries").exists() or not list((out / "summaries").glob("*.json"))


def test_a_run_whose_data_loader_workers_were_killed_is_not_a_result(tmp_path, monkeypatch, capsys):
    def killed():
        raise RuntimeError("DataLoader worker (pid 4971) is killed by signal: Terminated. ")

    out = tmp_path / "ev"
    _stop_training_at_step(monkeypatch, 1, killed)
    assert evidence.main([*TINY_RUN, "--out", str(out)]) == 143
    assert evidence.load_summaries(out / "summaries") == {}
    assert "ns_muon3-x1-s0 was stopped at step 1" in capsys.readouterr().out


def test_a_run_whose_pace_ends_it_past_the_time_limit_stops_early_and_a_later_call_runs_it(
        tmp_path, monkeypatch, capsys):
    """A run the call cannot finish gives the device back at a tenth of its steps, not near its end."""
    out = tmp_path / "ev"
    run = [*TINY_RUN, "--max-steps", "40", "--out", str(out), "--time-limit", "600"]  # the last --max-steps wins
    monkeypatch.setattr(evidence, "DEADLINE_MARGIN", 1e6)  # any pace then ends past 600 s
    assert evidence.main(run) == 0
    log = capsys.readouterr().out
    assert "ns_muon3-x1-s0 stopped at step 4 of 40" in log and "runs left for a later call" in log
    assert evidence.load_summaries(out / "summaries") == {}
    monkeypatch.undo()
    shutil.rmtree(out / "claims")
    assert evidence.main(run) == 0  # at its real pace it ends well inside 600 s
    assert evidence.load_summaries(out / "summaries")["ns_muon3-x1-s0"]["steps"] == 40


def test_the_deadline_reads_the_pace_after_the_start_up_not_from_the_first_step(monkeypatch):
    """A 3000-step run whose first 150 steps take 60 s (start-up) and then 0.16 s each ends at
    60 + 2850 * 0.16 = 516 s: inside a 575 s limit, though its average pace at step 300 (0.28 s)
    would project 877 s."""
    from types import SimpleNamespace

    clock = {"t": 0.0}
    monkeypatch.setattr(evidence.time, "time", lambda: clock["t"])
    stop = evidence._deadline_stop(deadline=575.0)
    trainer = SimpleNamespace(global_step=0, max_steps=3000)
    stop.on_train_start(trainer, None)
    for step in range(1, 601):
        clock["t"] = 0.4 * step if step <= 150 else 60 + 0.16 * (step - 150)
        trainer.global_step = step
        stop.on_train_batch_end(trainer, None, None, None, step)  # never raises: 516 s < 575 s
    with pytest.raises(evidence.DeadlinePassed, match="stopped at step 601 of 3000"):
        clock["t"] += 100  # a stall: the pace since step 150 now ends it past the limit
        trainer.global_step = 601
        stop.on_train_batch_end(trainer, None, None, None, 601)
    assert evidence.projected_end(84.0, 300, 3000, (60.0, 150)) == pytest.approx(84 + 1.05 * 0.16 * 2700)


def test_collect_leaves_out_summaries_of_runs_stopped_from_outside(tmp_path, capsys):
    import json

    arm = evidence.ARMS["3k_S2"]
    store, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    stopped = _summary(arm, 50, 0, 2.66, "RuntimeError: DataLoader worker (pid 6126) is killed by signal: Terminated. ")
    diverged = _summary(arm, 200, 0, 0.1, "FloatingPointError: non-finite loss")
    for r in (stopped, diverged):
        (src / f"{r['run']}.json").write_text(json.dumps(r))
    assert evidence.main(["collect", str(src), "--store", str(store)]) == 0
    assert sorted(p.name for p in store.glob("*.json")) == ["3k_S2-x200-s0.json"]  # a divergence is a result
    assert "1 runs stopped from outside, not results, left out: 3k_S2-x50-s0" in capsys.readouterr().out


def test_a_time_limited_call_starts_only_the_runs_its_arms_stored_runs_say_will_end_in_time():
    runs = {}
    for arm_key, m, seed, fit_s, k in (("3k_muon", 0.5, 0, 455.0, 7), ("3k_muon", 0.5, 1, 420.0, 7),
                                       ("3k_muon", 1.0, 0, 130.0, 2), ("3k_stiefel", 0.5, 0, 480.0, 7),
                                       ("gpt_muon", 1.0, 0, 100.0, 1), ("S1", 1.0, 0, 150.0, 1),
                                       ("S1", 3.0, 0, 160.0, 1)):
        arm = evidence.ARMS[arm_key]
        r = {**_summary(arm, m, seed, 0.7), "fit_s": fit_s, "concurrent_runs": k, "config": arm.config}
        runs[r["run"]] = r
    failed = {**_summary(evidence.ARMS["3k_muon"], 2.0, 0, 0.1, "CUDA error"), "fit_s": 9.0, "concurrent_runs": 7}
    runs[failed["run"]] = failed  # a failed run's time is not a run's
    muon, stiefel, s1 = (evidence.ARMS[k] for k in ("3k_muon", "3k_stiefel", "3k_S1"))
    muon_share = float(np.median([455 / 7, 420 / 7, 130 / 2]))
    assert evidence.expected_run_s(muon, runs, 7) == pytest.approx(7 * muon_share)
    # an arm never run in its suite: the suite's median, times its config's cost relative to the other suite
    suite_share = float(np.median([455 / 7, 420 / 7, 130 / 2, 480 / 7]))
    ratio = float(np.median([150.0, 160.0])) / float(np.median([100.0, 150.0, 160.0]))
    assert evidence.expected_run_s(s1, runs, 6) == pytest.approx(6 * suite_share * ratio)
    assert evidence.expected_run_s(evidence.ARMS["ns_muon3"], runs, 1) is None  # no stored run of its suite
    todo = [(stiefel, 0.5, 1), (muon, 1.0, 1)]
    ready = evidence.startable(todo, runs, elapsed=20, time_limit=20 + 7 * muon_share + 1, concurrent=7, longest=0)
    assert ready == [(muon, 1.0, 1)]  # Stiefel's runs are longer than what is left
    assert evidence.startable(todo, runs, elapsed=20, time_limit=None, concurrent=7, longest=0) == todo
    untimed = evidence.startable(todo, runs, elapsed=100, time_limit=200, concurrent=7, longest=90, timed=False)
    assert untimed == []  # 100 + 1.2 * 90 > 200


def test_unknown_arm_is_refused_with_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="not an arm of suite 'gpt'.*gpt_muon"):
        evidence.main(["run", "--suite", "gpt", "--arms", "ns_muon3", "--out", str(tmp_path)])


def _add(runs, arm, m, seed, loss):
    r = _summary(arm, m, seed, loss)
    runs[r["run"]] = r


def test_the_x2_sweep_extends_past_an_edge_until_the_best_is_interior_or_the_limit():
    arm = evidence.ARMS["3k_muon"]
    runs = {}
    assert evidence.sweep_multipliers(arm, runs=runs) == [0.5, 1.0, 2.0]
    for m, loss in ((0.5, 0.63), (1.0, 0.637), (2.0, 0.665)):
        _add(runs, arm, m, 0, loss)
    assert evidence.best_multiplier(arm, runs) is None  # the best is at the low edge: x0.25 first
    assert [m for _, m, _ in evidence.plan_runs([arm], runs, seeds=(0, 1, 2))] == [0.25]
    _add(runs, arm, 0.25, 0, 0.6375)
    assert evidence.best_multiplier(arm, runs) == 0.5 and not evidence.at_edge(arm, runs)
    assert [(m, s) for _, m, s in evidence.plan_runs([arm], runs, seeds=(0, 1, 2))] == [(0.5, 1), (0.5, 2)]
    mono = {}  # always better at a lower lr: three extra points, then the limit is the answer
    for m in (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0):
        _add(mono, arm, m, 0, m)
    assert evidence.sweep_multipliers(arm, runs=mono) == [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]
    assert evidence.best_multiplier(arm, mono) == 0.0625 and evidence.at_edge(arm, mono)


def test_a_family_is_tuned_together_and_only_its_best_variant_gets_seeds():
    variants = [evidence.ARMS[k] for k in ("3k_adamw_b95", "3k_adamw_b999", "3k_adamw_b95_w300")]
    runs = {}
    for arm, best_loss in zip(variants, (0.70, 0.69, 0.71)):
        for m, extra in ((0.5, 0.02), (1.0, 0.0), (2.0, 0.05)):
            _add(runs, arm, m, 0, best_loss + extra)
    assert evidence.family_best(variants[0], runs) == (variants[1], 1.0)
    plan = evidence.plan_runs(variants, runs, seeds=(0, 1, 2))
    assert [(a.key, m, s) for a, m, s in plan] == [("3k_adamw_b999", 1.0, 1), ("3k_adamw_b999", 1.0, 2)]
    # a variant's config: its betas on every AdamW rule and its warm-up
    spec = evidence.effective_config(variants[2], 2.0, 1, Path("/tmp"), device="cpu")
    rules = spec["model"]["init_args"]["policy"]["rules"]
    assert all(r["betas"] == [0.9, 0.95] for r in rules) and rules[0]["lr"] == pytest.approx(2 * 6e-4)
    assert spec["model"]["init_args"]["scheduler"]["warmup_steps"] == 300
    assert spec["data"]["init_args"]["seed"] == 1 and spec["data"]["init_args"]["split"] == "directory"
    assert spec["trainer"]["max_steps"] == 3000 and spec["trainer"]["limit_val_batches"] == 1.0


def test_page_comparisons_are_holm_corrected_over_the_page():
    report.COMPARISONS.collect()
    a, b = report.Stat([1.0, 1.1, 0.9]), report.Stat([1.5, 1.6, 1.4])
    c, d = report.Stat([1.0, 1.1, 0.9]), report.Stat([1.25, 1.35, 1.15])
    e, f = report.Stat([1.0, 1.1, 0.9]), report.Stat([1.01, 1.12, 0.88])
    first = [report.differs(a, b, "strong"), report.differs(c, d, "weak"), report.differs(e, f, "none")]
    report.COMPARISONS.adjust()
    second = [report.differs(a, b, "strong"), report.differs(c, d, "weak"), report.differs(e, f, "none")]
    from benchmarks import stats
    raw = [stats.welch(x.values, y.values).p for x, y in ((a, b), (c, d), (e, f))]
    # Holm over three: the smallest p times 3, the next times 2 (0.037 x 2 > 0.05), the last times 1
    assert raw[0] * 3 < 0.05 and raw[1] < 0.05 < 2 * raw[1] and raw[2] > 0.5
    assert first == [True, True, False] and second == [True, False, False]
    # each comparison's detectable effect (80% power), uncorrected and at Holm's strictest step (0.05 / 3)
    table = report.comparisons_table().splitlines()
    assert "α/3 (Holm's strictest step)" in table[0]
    weak = next(line for line in table if line.startswith("| weak |")).split(" | ")
    sd = 0.1  # both sides: the same spread
    se, df = math.sqrt(2 * sd ** 2 / 3), 4.0  # Welch's df with equal variances and sizes: 2 (n - 1)
    assert float(weak[5].rstrip(" |")) == pytest.approx((stats.t_ppf(1 - 0.05 / 6, df) + stats.t_ppf(0.8, df)) * se,
                                                       rel=2e-3)
    assert float(weak[4]) == pytest.approx((stats.t_ppf(0.975, df) + stats.t_ppf(0.8, df)) * se, rel=2e-3)
    assert float(weak[4]) < float(weak[5].rstrip(" |"))
    with pytest.raises(AssertionError, match="same comparisons"):
        report.differs(a, b, "another")


def test_plan_lists_what_a_suite_still_needs(tmp_path, capsys):
    import json

    arm = evidence.ARMS["3k_muon"]
    for m, loss in ((0.5, 0.70), (1.0, 0.65), (2.0, 0.66)):
        (tmp_path / f"{evidence.run_id(arm, m, 0)}.json").write_text(json.dumps(_summary(arm, m, 0, loss)))
    assert evidence.main(["plan", "--suite", "gpt3k", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 runs stored" in out and "3k_muon-x1-s1" in out and "3k_muon-x1-s2" in out
    assert "3k_muon-x0.5-s0" not in out and "3k_adamw_b95-x1-s0" in out


def test_timings_of_runs_that_shared_a_gpu_are_not_compared():
    """Rows 3b and 4d compare throughput and step times; runs that shared the GPU (the 3000-step
    suite runs several at once) give neither, and the rows say so instead of comparing them."""
    import copy

    shared = {k: {**copy.deepcopy(r), "concurrent_runs": 4} for k, r in stored_runs().items()}
    report.COMPARISONS.collect()
    alone = report.claim_constraints(stored_runs(), lambda name, *a, **k: name)[1]
    report.COMPARISONS.collect()
    together = report.claim_constraints(shared, lambda name, *a, **k: name)[1]
    assert "tokens/s" in alone.ours and "throughput" in alone.verdict
    assert "tokens/s" not in together.ours and together.verdict.startswith("**Cost not measured here**")
    report.COMPARISONS.collect()
    rows = report.claim_sinkgd(shared, lambda name, *a, **k: name)
    assert rows[3].verdict.startswith("**Not measured here**")


def test_the_adamw_control_is_the_tuned_muon_arm_but_for_the_hidden_optimizer(tmp_path):
    """The control sweeps only its hidden rule's lr; its other rules run exactly as the Muon arm's
    rules at that arm's best multiplier, and it waits for that sweep before it is planned."""
    import yaml

    ctl, muon = evidence.ARMS["3k_adamw_control_hidden"], evidence.ARMS["3k_muon"]
    runs = {}
    assert evidence.plan_runs([ctl], runs, seeds=(0, 1, 2)) == []  # Muon's best is not known yet
    for m, loss in ((0.25, 0.6375), (0.5, 0.63), (1.0, 0.637), (2.0, 0.665)):
        _add(runs, muon, m, 0, loss)
    assert evidence.fixed_multiplier(ctl, runs) == 0.5
    plan = evidence.plan_runs([ctl], runs, seeds=(0, 1, 2))
    assert [(m, s) for _, m, s in plan] == [(0.125, 0), (0.25, 0), (0.5, 0)]
    spec = evidence.effective_config(ctl, 0.125, 0, tmp_path, device="cpu", fixed=0.5)
    rules = {r["name"]: r for r in spec["model"]["init_args"]["policy"]["rules"]}
    # the Muon arm's own file, read independently: every rule but the hidden one, lrs halved
    muon_rules = {r["name"]: r for r in yaml.safe_load((ROOT / muon.config).read_text())["model"]["init_args"]["policy"]["rules"]}
    assert set(rules) == set(muon_rules)
    for name in ("embedding", "rest"):
        assert {k: v for k, v in rules[name].items() if k != "lr"} == {k: v for k, v in muon_rules[name].items() if k != "lr"}
        assert rules[name]["lr"] == pytest.approx(0.5 * muon_rules[name]["lr"])
    assert rules["hidden"]["optimizer"] == "adamw" and rules["hidden"]["lr"] == pytest.approx(0.125 * 3e-3)
    assert rules["hidden"]["match"] == muon_rules["hidden"]["match"]
    with pytest.raises(SystemExit, match="run that arm's seed-0 sweep first"):
        evidence.effective_config(ctl, 0.125, 0, tmp_path, device="cpu")
    bad = evidence.Arm("bad", ctl.config, "gpt3k", "bad", swept_rules=("matrices",), fixed_from="3k_muon")
    with pytest.raises(SystemExit, match=r"swept_rules \['matrices'\] are not rules of .*'embedding', 'hidden', 'rest'"):
        evidence.effective_config(bad, 1.0, 0, tmp_path, device="cpu", fixed=0.5)


def test_collect_keeps_a_repeated_run_beside_the_stored_one_and_the_page_lists_it(tmp_path):
    import json

    arm = evidence.ARMS["3k_muon"]
    store, src = tmp_path / "store", tmp_path / "src"
    store.mkdir()
    src.mkdir()
    first, again = _summary(arm, 0.5, 0, 0.63), _summary(arm, 0.5, 0, 0.64)
    (store / "3k_muon-x0.5-s0.json").write_text(json.dumps(first))
    (src / "3k_muon-x0.5-s0.json").write_text(json.dumps(again))
    for _ in range(2):  # collecting the same directory twice keeps one copy of the repeat
        assert evidence.main(["collect", str(src), "--store", str(store)]) == 0
    assert json.loads((store / "3k_muon-x0.5-s0.json").read_text()) == first  # never overwritten
    assert [p.name for p in (store / "repeats").iterdir()] == ["3k_muon-x0.5-s0.r1.json"]
    repeats = evidence.load_repeats(store)
    assert [r["scalars"]["val/loss"][-1][1] for r in repeats["3k_muon-x0.5-s0"]] == [0.64]
    text = report.protocol_section({first["run"]: first}, repeats=repeats)
    assert "3k_muon-x0.5-s0 0.6300, again 0.6400" in text


def test_the_150m_suite_is_the_protocol_at_another_size_and_its_headline_is_a_page_test(tmp_path):
    small = evidence.effective_config(evidence.ARMS["3k_muon"], 0.5, 1, tmp_path, device="cuda")
    big = evidence.effective_config(evidence.ARMS["150m_muon"], 0.5, 1, tmp_path, device="cuda")
    assert big["model"]["init_args"].pop("size") == "150m" and small["model"]["init_args"].pop("size") == "42m"
    for key in ("trainer", "data", "model", "seed_everything"):
        if key == "trainer":  # the loggers name their arm
            small[key].pop("logger"), big[key].pop("logger")
        assert big[key] == small[key], key
    adamw = evidence.effective_config(evidence.ARMS["150m_adamw"], 1.0, 0, tmp_path, device="cuda")
    assert all(r["betas"] == [0.9, 0.95] for r in adamw["model"]["init_args"]["policy"]["rules"])
    runs = {}
    for key, losses, seeds in (("150m_adamw", (0.66, 0.65, 0.70), (0.651, 0.655)),
                               ("150m_muon", (0.60, 0.62, 0.64), (0.601, 0.598))):
        arm = evidence.ARMS[key]
        for m, loss in zip((0.5, 1.0, 2.0), losses):
            _add(runs, arm, m, 0, loss)
        if key == "150m_muon":  # the best at the low edge: the sweep extends once
            _add(runs, arm, 0.25, 0, 0.61)
        best = evidence.best_multiplier(arm, runs)
        for seed, loss in zip((1, 2), seeds):
            _add(runs, arm, best, seed, loss)
    report.COMPARISONS.collect()
    text = report.scale_headline(runs)
    label, w = report.COMPARISONS.tests[-1]
    assert label == "3000 steps, 150M: val loss, Muon vs AdamW"
    muon, adamw = [0.60, 0.601, 0.598], [0.65, 0.651, 0.655]
    from benchmarks import stats
    assert w.diff == pytest.approx(stats.welch(muon, adamw).diff) and w.diff == pytest.approx(np.mean(muon) - np.mean(adamw))
    assert "Muon x0.5 ends at 0.5997" in text and "AdamW x1 ends at 0.652" in text


def test_the_150m_headline_before_the_suite_is_complete_compares_seed_0_bests_and_tests_nothing():
    runs = {}
    adamw, muon = evidence.ARMS["150m_adamw"], evidence.ARMS["150m_muon"]
    for m, loss in ((0.25, 0.70), (0.5, 0.68), (1.0, 0.69), (2.0, 1.1)):
        _add(runs, adamw, m, 0, loss)
    for m, loss in ((0.5, 0.60), (1.0, 0.62), (2.0, 0.66)):  # best at the low edge: x0.25 still to run
        _add(runs, muon, m, 0, loss)
    runs["150m_muon-x0.5-s0"]["scalars"]["val/loss"] = [[1000, 0.80], [2000, 0.64], [2999, 0.60]]
    report.COMPARISONS.collect()
    text = report.scale_headline(runs)
    assert not report.COMPARISONS.tests  # no Welch test on one seed
    assert "x0.5 at 0.6000, is 11.8% below AdamW's, x0.5 at 0.6800" in text
    assert "reaches that loss at step 1750" in text  # 0.68 is 3/4 of the way from 0.80 (step 1000) to 0.64 (2000)
    assert "Muon, no constraint sweep goes on past its edge" in text and "2 more seeds of AdamW" in text


def _like(template, arm, m, seed, loss, speed=1.0):
    """A stored summary of ``arm``'s suite with another arm, multiplier, seed, final val loss and
    throughput (``speed`` times the template's)."""
    r = {**template, "run": evidence.run_id(arm, m, seed), "arm": arm.key, "suite": arm.suite,
         "multiplier": m, "seed": seed}
    r.pop("error", None)
    tps = [[s, v * speed] for s, v in template["scalars"]["throughput/tokens_per_sec"]]
    r["scalars"] = {**template["scalars"], "val/loss": [[10, 2.0], [template["steps"] - 1, loss]],
                    "throughput/tokens_per_sec": tps}
    return r


def test_each_constraint_row_switches_to_the_3000_step_runs_when_its_own_two_arms_are_complete():
    """Per row, not per section; timings come from runs that had the GPU alone."""
    stored = stored_runs()
    first, third = stored["gpt_muon-x1-s0"], stored["3k_muon-x0.5-s0"]
    runs = {}
    for i, key in enumerate(report.GPT_CONSTRAINTS):  # the first protocol: every arm complete, 2 seeds
        arm = evidence.ARMS[key]
        for m, loss in zip(evidence.sweep_multipliers(arm), (1.1, 0.9 + i / 100, 1.5)):
            r = _like(first, arm, m, 0, loss)
            runs[r["run"]] = r
        speed = 0.8 if key == "gpt_stiefel" else 1.0  # the first protocol's runs had the GPU alone
        for seed in (0, 1):
            r = _like(first, arm, 1.0, seed, 0.9 + i / 100 + seed / 100, speed)
            runs[r["run"]] = r
    muon, sphere = (0.630, 0.631, 0.629), (0.610, 0.612, 0.611)  # seeds 0, 1, 2 at x1

    def complete(key, losses, best=1.0):
        arm = evidence.ARMS[key]
        for m in (0.25, 0.5, 1.0, 2.0) if best == 0.5 else (0.5, 1.0, 2.0):  # x0.5 is an edge: x0.25 too
            r = _like(third, arm, m, 0, losses[0] if m == best else 0.7)
            runs[r["run"]] = r
        for seed in (1, 2):
            r = _like(third, arm, best, seed, losses[seed])
            runs[r["run"]] = r

    complete("3k_muon", muon)
    complete("3k_sphere", sphere)
    report.COMPARISONS.collect()
    a, b, c = report.claim_constraints(runs, lambda name, *args, **kwargs: name)
    assert "3000 steps" in a.setting and "600 steps" in b.setting and "600 steps" in c.setting
    assert a.ours.startswith(f"val loss {np.mean(sphere):.4g} ± ") and f"{100 * (np.mean(sphere) / np.mean(muon) - 1):+.1f}%" in a.ours
    label, w = report.COMPARISONS.tests[0]
    assert label.startswith("3a") and w.diff == pytest.approx(np.mean(sphere) - np.mean(muon))
    assert "lacks" not in a.verdict and "lacks the protocol" in b.verdict
    assert a.section.startswith("Row 3a already uses the 3000-step runs")
    assert "| Muon + Stiefel on attention/FFN | embedding 0.003" in a.section  # the first protocol's table
    # every row switched: the section shows the 3000-step arms; the 3000-step runs shared the GPU,
    # so the Stiefel cost is read from the first protocol's runs, which had it alone
    complete("3k_stiefel", (0.66, 0.662, 0.661), best=0.5)
    complete("3k_sphere_stiefel", (0.67, 0.672, 0.671), best=0.5)
    report.COMPARISONS.collect()
    a, b, c = report.claim_constraints(runs, lambda name, *args, **kwargs: name)
    assert all("3000 steps" in r.setting for r in (a, b, c))
    assert "20.0% lower (timed on the first protocol's runs, each alone on an NVIDIA H100" in b.ours
    assert "val loss 0.661 ± 0.001" in b.ours and "val loss sphere+Stiefel 0.671 ± 0.001 vs sphere 0.611" in c.ours
    assert a.section.startswith("| arm |") and "| Muon + Stiefel on attention/FFN | embedding 0.0015" in a.section
    assert "| tokens/s (runs sharing the GPU) |" in a.section.splitlines()[0]
    for rid in [k for k in runs if runs[k]["suite"] == "gpt"]:  # without them, the cost is not measured
        del runs[rid]
    report.COMPARISONS.collect()
    assert report.claim_constraints(runs, lambda name, *args, **kwargs: name)[1].verdict.startswith(
        "**Cost not measured here**")


def test_the_sinkgd_steps_row_switches_with_its_two_arms_while_the_ablation_rows_wait():
    runs = {k: r for k, r in stored_runs().items() if r["arm"] != "3k_sinkgd_paper"
            and not (r["arm"] in ("3k_S1", "3k_S2", "3k_S3") and r["seed"] != 0)}  # the ablation without its seeds
    adamw = report.arm_result(runs, "3k_adamw_b95")
    assert adamw.complete and len(adamw.runs) == 3, "the stored 3000-step AdamW family is complete"
    arm, template = evidence.ARMS["3k_sinkgd_paper"], runs["3k_muon-x0.5-s0"]
    for m, loss in ((0.5, 0.75), (1.0, 0.72), (2.0, 0.74)):
        r = _like(template, arm, m, 0, loss)
        runs[r["run"]] = r
    for seed, loss in ((1, 0.721), (2, 0.719)):
        r = _like(template, arm, 1.0, seed, loss)
        runs[r["run"]] = r
    report.COMPARISONS.collect()
    rows = {r.key: r for r in report.claim_sinkgd(runs, lambda name, *args, **kwargs: name)}
    assert "3000 steps" in rows["4e"].setting and "600 steps" in rows["4a"].setting
    target = np.mean([report.val_loss(r) for r in adamw.runs])
    assert rows["4e"].ours == f"SinkGD never reaches AdamW's final val loss {target:.4f} in 3000 steps (ends at 0.72 ± 0.001)"
    assert rows["4a"].section.startswith("Row 4e already uses the 3000-step runs")
    # the 600-step runs still fall 14-15% after their first sixth (S0 21%): slowed, not stalled
    assert rows["4c"].verdict.startswith("**Confirmed**: all three train without failing")


def test_the_sinkgd_section_states_the_3000_step_runs_own_cadence_and_gap_once_every_row_switched():
    runs = dict(stored_runs())
    template = runs["3k_S1-x25-s0"]
    for key in ("3k_S1", "3k_S2", "3k_S3"):  # complete the ablation: x25 interior, seeds 1 and 2
        arm = evidence.ARMS[key]
        if evidence.best_multiplier(arm, runs) is None:
            r = _like(template, arm, 12.5, 0, 2.9)
            runs[r["run"]] = r
        assert evidence.best_multiplier(arm, runs) == 25.0
        for seed in (1, 2):
            r = _like(template, arm, 25.0, seed, 2.58 + seed / 100)
            r["scalars"]["val/loss"] = [[499, 2.70], [2999, 2.58 + seed / 100]]  # as the stored runs: ~4% after step 500
            runs[r["run"]] = r
    report.COMPARISONS.collect()
    rows = {r.key: r for r in report.claim_sinkgd(runs, lambda name, *args, **kwargs: name)}
    def drop(key):  # % the val loss falls from step 499 (the validation at a sixth of 3000) to the end
        return np.mean([100 * (1 - report.val_loss(r) / dict(r["scalars"]["val/loss"])[499])
                        for r in report.arm_result(runs, key).runs])

    s0_drop, most = drop("3k_S0"), max(drop(k) for k in ("3k_S1", "3k_S2", "3k_S3"))
    assert s0_drop > 50 and most < 6
    assert f"they have stalled, not slowed: after the first sixth of the steps their loss falls {most:.0f}% at most, " \
           f"S0's {s0_drop:.0f}%" in rows["4a"].verdict
    assert all("3000 steps" in rows[k].setting for k in ("4a", "4b", "4c", "4d", "4e"))
    section = rows["4a"].section
    assert section.startswith("Roughness:"), "every row switched: no note about rows switching first"
    s0 = np.mean([report.val_loss(r) for r in report.arm_result(runs, "3k_S0").runs])
    tanh = np.mean([np.mean([report.val_loss(r) for r in report.arm_result(runs, k).runs])
                    for k in ("3k_S1", "3k_S2", "3k_S3")])
    assert f"S1–S3 end {tanh - s0:+.2f} nats from S0" in section
    assert "validations every 250 steps" in section and "every 50 steps" not in section
    assert "at one seed, every arm sees the same batches" in section
    behind = 100 * (min(np.mean([report.val_loss(r) for r in report.arm_result(runs, k).runs])
                        for k in ("3k_S1", "3k_S2", "3k_S3")) / s0 - 1)
    finals = [np.mean([report.val_loss(r) for r in report.arm_result(runs, k).runs]) for k in ("3k_S1", "3k_S2", "3k_S3")]
    spread = 100 * (max(finals) - min(finals)) / np.mean(finals)
    # stalled (row 4a), so "stable" is not called a confirmed convergence
    assert rows["4c"].verdict == (f"**Stable, but stalled**: all three train without failing and end within "
                                  f"{spread:.1f}% of each other, on the plateau where they stop learning, "
                                  f"{behind:.0f}%+ above S0's loss (row 4a)")


def test_the_protocol_headline_splits_muons_gap_with_the_control_once_the_control_is_complete():
    runs = {}

    def sweep(key, losses, seeds=()):
        arm = evidence.ARMS[key]
        for m, loss in losses:
            _add(runs, arm, m, 0, loss)
        for seed, loss in seeds:
            _add(runs, arm, evidence.best_multiplier(arm, runs), seed, loss)

    sweep("3k_adamw_b95", ((0.5, 0.72), (1.0, 0.70), (2.0, 0.74)), ((1, 0.705), (2, 0.695)))
    sweep("3k_adamw_b999", ((0.5, 0.73), (1.0, 0.71), (2.0, 0.80)))
    sweep("3k_adamw_b95_w300", ((0.5, 0.73), (1.0, 0.72), (2.0, 0.75)))
    sweep("3k_muon", ((0.25, 0.64), (0.5, 0.63), (1.0, 0.637), (2.0, 0.665)), ((1, 0.632), (2, 0.631)))
    adamw, muon = [0.70, 0.705, 0.695], [0.63, 0.632, 0.631]
    sweep("3k_adamw_control_hidden", ((0.125, 0.69), (0.25, 0.72), (0.5, 1.1)))  # best at the low edge
    report.COMPARISONS.collect()
    text = report.protocol_headline(runs)
    assert "is not complete yet" in text and "x0.125 0.6900, x0.25 0.7200, x0.5 1.1000" in text
    assert f"Muon's mean is {100 * (1 - np.mean(muon) / 0.69):.1f}% below it" in text
    assert f"it is {100 * (1 - 0.69 / np.mean(adamw)):.1f}% below the tuned AdamW's mean" in text
    assert "the sweep goes on past that edge" in text
    control = [0.69, 0.692, 0.689]  # x0.0625 is worse: x0.125 is an interior best
    sweep("3k_adamw_control_hidden", ((0.0625, 0.70),), ((1, control[1]), (2, control[2])))
    report.COMPARISONS.collect()
    text = report.protocol_headline(runs)
    labels = [label for label, _ in report.COMPARISONS.tests]
    assert labels == ["3000 steps: val loss, Muon vs tuned AdamW", "3000 steps: val loss, Muon vs AdamW control",
                      "3000 steps: val loss, AdamW control vs tuned AdamW"]
    diffs = [w.diff for _, w in report.COMPARISONS.tests]
    assert diffs == pytest.approx([np.mean(muon) - np.mean(adamw), np.mean(muon) - np.mean(control),
                                   np.mean(control) - np.mean(adamw)])
    assert "(x0.125 of its hidden lr)" in text and "not complete" not in text
    assert f"Muon vs the control {100 * (np.mean(muon) / np.mean(control) - 1):+.1f}%" in text


def test_the_protocols_run_count_counts_sweeps_extensions_and_the_seeds_still_to_come():
    # 13 arms x a 3-point sweep, then 2 more seeds for each of 11 tuning units (the AdamW family
    # of 3 variants is one unit, the other 10 arms one each)
    assert report.planned_runs("gpt3k", {}) == 13 * 3 + 11 * 2
    assert report.planned_runs("gpt3k_150m", {}) == 2 * 3 + 2 * 2
    arm = evidence.ARMS["3k_muon"]
    runs = {}
    for m, loss in ((0.5, 0.64), (1.0, 0.65), (2.0, 0.70)):  # best at the low edge: x0.25 is needed too
        r = _summary(arm, m, 0, loss)
        runs[r["run"]] = r
    assert report.planned_runs("gpt3k", runs) == 13 * 3 + 11 * 2 + 1


def test_bench_ops_times_the_s2_and_s3_rules_as_their_arms_configure_them():
    """Row 4d reads two bench_ops.py cases; they must be the arms' rules (tau, iterations), on every
    parameter as the configs apply them."""
    import yaml

    from benchmarks import bench_ops

    cases = {label: (rule, scope, hp) for label, rule, scope, hp, _, _ in bench_ops.RULE_CASES}
    for key, label in report.RULE_ALONE.items():
        cfg = yaml.safe_load((evidence.ROOT / evidence.ARMS[f"3k_{key}"].config).read_text())
        rules = cfg["model"]["init_args"]["policy"]["rules"]
        assert {r["optimizer"] for r in rules} == {"sinkhorn_tanh"}, "the arm trains every parameter with it"
        rule, scope, hp = cases[label]
        assert rule == "sinkhorn_tanh" and scope == "all"
        assert {(r["tau"], r["n_iter"]) for r in rules} == {(hp["tau"], hp["n_iter"])}


def _ops(s2_median, s2_min, s3_median):
    return {"device_name": "NVIDIA H200", "date": "2026-12-03T10:00:00+00:00", "commit": "abc1234",
            "results": {"rules": {report.RULE_ALONE["S2"]: {"ours": {"median_ms": s2_median, "min_ms": s2_min,
                                                                      "repeats": 30}},
                                  report.RULE_ALONE["S3"]: {"ours": {"median_ms": s3_median, "min_ms": s3_median * 0.97,
                                                                      "repeats": 30}}}}}


def test_row_4d_reads_the_rules_timed_alone_once_bench_ops_has_them():
    runs = stored_runs()

    def row_4d(ops=None):  # the whole page, so that its decisions are Holm-corrected over the page
        rows, _ = report.build_page(runs, lambda name, *a, **k: name, ops)
        return {r.key: r for r in rows}["4d"]

    without = row_4d()
    # the stored runs: S2/S3 step times from two runs each, not beyond noise after Holm
    assert without.verdict.startswith("**Not confirmed beyond noise**: S2 took ")
    assert "the rules alone are not timed yet" in without.verdict
    clear = row_4d(_ops(6.0, 5.8, 2.5))
    assert clear.ours.startswith("the rule alone on every parameter (bench_ops.py, median of 30 steps; NVIDIA H200, "
                                 "2026-12-03, commit abc1234): S2 6.00 ms, S3 2.50 ms, S2/S3 = 2.40")
    assert clear.verdict.startswith("**Confirmed**: S2's step costs 2.40× S3's")
    close = row_4d(_ops(2.6, 2.45, 2.5))
    assert close.verdict.startswith("**Not confirmed**: S2's step costs 1.04× S3's, within the timer's spread")
    # a bench_ops JSON from before the two cases existed changes nothing
    old = _ops(6.0, 5.8, 2.5)
    del old["results"]["rules"][report.RULE_ALONE["S3"]]
    assert row_4d(old).verdict == without.verdict


def test_row_4b_says_when_every_estimate_is_rougher_though_the_loss_confound_favours_s1_s3():
    """The stored 3000-step ablation: S1-S3 end far above S0 (which should make them look smoother)
    yet every roughness estimate is above S0's; the verdict says so rather than only 'none'."""
    runs = stored_runs()
    rows, _ = report.build_page(runs, lambda name, *a, **k: name)  # Holm-corrected over the page
    row = {r.key: r for r in rows}["4b"]
    assert "3000 steps" in row.setting

    def rough(key):  # numpy: std of the train loss around its centred 5-point mean, past a quarter
        out = []
        for r in report.arm_result(runs, key).runs:
            pts = np.array(r["scalars"]["train/loss"])
            v = pts[pts[:, 0] >= 0.25 * pts[-1, 0], 1]
            out.append(np.std(v[2:-2] - np.convolve(v, np.ones(5) / 5, mode="valid")))
        return np.mean(out)

    s0 = rough("3k_S0")
    rel = {k: 100 * (rough(f"3k_{k}") - s0) / s0 for k in ("S1", "S2", "S3")}
    assert all(v > 0 for v in rel.values())
    assert row.verdict.startswith("**Not distinguishable**: smoother beyond noise: none; rougher: none")
    assert ("every estimate points the other way (" + ", ".join(f"{k} {v:+.0f}%" for k, v in rel.items())
            + " against S0") in row.verdict
    assert "so the measure does not isolate the optimizer" not in row.verdict
