"""Logging helpers of the measurement callbacks: scalars to every logger; histograms, images
and text to the loggers whose experiment takes them (TensorBoard), a snapshot's scalars and
histograms as one merged event; the means the component summaries use.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

def log_scalars(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Write scalars to every logger of ``trainer`` (call from the training thread, rank zero)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _experiments_with(trainer: Any, method: str) -> list[Any]:
    out = []
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and callable(getattr(exp, method, None)):
            out.append(exp)
    return out


def histogram_stats(values: Any, bins: int = 64) -> dict[str, Any]:
    """What ``add_histogram_raw`` takes, computed from ``values`` (numpy-able): cheap to log later.

    Worker threads build these so the training thread only writes them: TensorBoard's
    ``add_histogram`` bins 'tensorflow'-style and builds the summary on the caller's thread
    (several times the raw write, and a snapshot of a GPT logs ~100 of them)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    counts, edges = np.histogram(v, bins=bins)
    return {"min": float(v.min()), "max": float(v.max()), "num": int(v.size), "sum": float(v.sum()),
            "sum_squares": float(np.dot(v, v)), "bucket_limits": edges.tolist(),
            "bucket_counts": [0.0] + counts.astype(np.float64).tolist()}


def tensorboard_summary(scalars: dict[str, float], histograms: dict[str, dict[str, Any]]) -> Any:
    """ONE TensorBoard ``Summary`` holding every scalar and (:func:`histogram_stats`) histogram,
    built in a worker thread; None without the ``tensorboard`` package.

    Why: ``TensorBoardLogger.log_metrics`` writes one event per scalar and torch's SummaryWriter
    flushes to disk from the calling thread whenever 10 events are queued, so a GPT snapshot's
    ~600 scalars and ~100 histograms would hold a training step for dozens of flushes. One
    merged event costs the training thread one enqueue."""
    try:
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
    except ImportError:  # pragma: no cover - tensorboard ships with lightning's TensorBoardLogger
        return None
    values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
    for tag, h in histograms.items():
        proto = HistogramProto(min=h["min"], max=h["max"], num=h["num"], sum=h["sum"],
                               sum_squares=h["sum_squares"], bucket_limit=h["bucket_limits"],
                               bucket=h["bucket_counts"])
        values.append(Summary.Value(tag=tag, histo=proto))
    return Summary(value=values)


def log_merged(trainer: Any, scalars: dict[str, float], histograms: dict[str, dict[str, Any]],
               summary: Any, step: int) -> bool:
    """Log ``scalars`` and ``histograms`` (:func:`histogram_stats`) at ``step``: as the one
    pre-built ``summary`` event to each TensorBoard logger (its SummaryWriter's file writer),
    through ``log_metrics`` / ``add_histogram_raw`` to any other logger. Returns whether every
    histogram found a logger."""
    histograms_logged = not histograms
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        get_writer = getattr(exp, "_get_file_writer", None)
        # (Lightning's DummyExperiment, under fast_dev_run, answers every attribute with a no-op)
        writer = get_writer() if summary is not None and callable(get_writer) else None
        if callable(getattr(writer, "add_summary", None)):
            writer.add_summary(summary, global_step=step)
            histograms_logged = True
            continue
        if scalars:
            logger.log_metrics(scalars, step=step)
        if histograms and callable(getattr(exp, "add_histogram_raw", None)):
            for tag, h in histograms.items():
                exp.add_histogram_raw(tag, global_step=step, **h)
            histograms_logged = True
    return histograms_logged


def log_image(trainer: Any, tag: str, image_hwc: Any, step: int) -> bool:
    exps = _experiments_with(trainer, "add_image")
    for exp in exps:
        exp.add_image(tag, image_hwc, global_step=step, dataformats="HWC")
    return bool(exps)


def log_text(trainer: Any, tag: str, text: str, step: int) -> bool:
    exps = _experiments_with(trainer, "add_text")
    for exp in exps:
        exp.add_text(tag, text, global_step=step)
    return bool(exps)


def log_dir(trainer: Any) -> str | None:
    for logger in trainer.loggers:
        d = getattr(logger, "log_dir", None)
        if d:
            return d
    return getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None)


def mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def geometric_mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan")
    if any(math.isinf(v) for v in vals):
        return float("inf")
    if any(v <= 0 for v in vals):
        return 0.0
    return math.exp(sum(math.log(v) for v in vals) / len(vals))
