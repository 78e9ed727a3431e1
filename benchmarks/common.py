"""Shared plumbing of the benchmark scripts: run metadata, timing, JSON output, tables.

Plain helpers; the scripts (``bench_ops.py``, ``bench_train.py``) and ``report.py`` import them.
Timing on CUDA uses CUDA events around each repeat (the median is reported); on CPU,
``time.perf_counter``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1


def git_commit(given: str | None = None) -> str:
    """``given`` if set, else ``git rev-parse HEAD`` of the repository (``unknown`` without git)."""
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT, capture_output=True, text=True, timeout=10,
            )
            suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
            return out.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_metadata(device: torch.device, commit: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "schema_version": SCHEMA_VERSION,
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(commit),
        "hostname": platform.node(),
        "settings": settings,
    }
    try:
        import lightning

        meta["lightning_version"] = lightning.__version__
    except ImportError:  # pragma: no cover
        meta["lightning_version"] = None
    return meta


def first_reach(points: Sequence[Sequence[float]], target: float, below: bool = True) -> float | None:
    """First x at which a logged series ``[(x, y), ...]`` reaches ``target`` (``y <= target``, or
    ``>=`` with ``below=False``), linear between logged points; None if it never does."""
    prev = None
    for x, y in points:
        if (y <= target) if below else (y >= target):
            if prev is None or prev[1] == y:
                return float(x)
            return prev[0] + (prev[1] - target) / (prev[1] - y) * (x - prev[0])
        prev = (x, y)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int
) -> dict[str, Any]:
    """Median/min/mean milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    CUDA: a pair of events around each call, one synchronisation at the end (calls queue
    back to back as in training). CPU: ``perf_counter`` around each call.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "repeats": repeats,
        "warmup": warmup,
    }


def error_record(exc: BaseException) -> dict[str, Any]:
    """What a failed measurement leaves in the JSON (the rest of the run goes on)."""
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(limit=6),
    }


def write_json(out_dir: str | os.PathLike, filename: str, data: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``-`` for missing, 3 significant digits otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table (cells formatted with :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    """An aligned plain-text table for stdout."""
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def quiet_lightning() -> None:
    """Keep Lightning's banners, the policy table and known-harmless warnings out of the
    benchmarks' output."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (creates its loggers)

    names = [n for n in logging.root.manager.loggerDict if n.startswith(("lightning", "lightning_optlab"))]
    for name in names + ["lightning", "lightning.pytorch", "lightning.fabric", "lightning_optlab"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*LeafSpec.*", ".*SpectralMonitor: the SVDs of the previous snapshot.*",
                    ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)
