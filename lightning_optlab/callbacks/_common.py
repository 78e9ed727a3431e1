"""Shared plumbing of the measurement callbacks.

* :func:`tracked_parameters`: the optimizer's parameters with name, role, component and param
  group, from the ``param_names`` / ``roles`` keys the policy builder puts into each group
  (falling back to :func:`lightning_optlab.policy.describe_parameters` for other optimizers).
* :class:`BackgroundWorker`: one worker thread per callback. The training thread submits a job
  over a snapshot, the worker computes, and the training thread collects finished results in a
  later hook and logs them under the step they belong to (loggers are only touched from the
  training thread).
* :func:`snapshot`: copy tensors at a hook so that later in-place updates do not race the worker
  (pinned host memory with an async copy on CUDA; a plain clone on CPU).
* logging helpers that write scalars to every logger and histograms/images/text to the
  loggers whose experiment can take them (TensorBoard).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import queue
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks.callback import Callback

from ..optim.matrix import DEFAULT_VIEW, MatrixView, group_views
from ..policy.roles import describe_parameters

# The research plan's components; bias and norm parameters belong to none of them.
COMPONENT_OF_ROLE = {"embedding": "input", "hidden": "hidden", "output": "output"}
COMPONENTS = ("input", "hidden", "output")


@dataclass(frozen=True)
class TrackedParam:
    """A parameter as the monitors see it."""

    name: str
    role: str
    component: str | None
    param: torch.Tensor
    group_index: int
    group_name: str
    algorithm: str | None
    view: MatrixView = DEFAULT_VIEW

    def matrices(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``t`` (the parameter, its gradient or a state tensor) as its matrix view: one
        ``(name, matrix)``, or one per block of a split packed projection (``name[k]``)."""
        m = self.view.to_matrix(t)
        if self.view.blocks == 1:
            return [(self.name, m)]
        return [(f"{self.name}[{k}]", m[k]) for k in range(self.view.blocks)]


def sanitize_tag(text: str) -> str:
    """A name usable as one TensorBoard tag component."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_") or "unnamed"


def group_name(group: dict, index: int) -> str:
    return sanitize_tag(group.get("name") or f"pg{index}")


def tracked_parameters(
    optimizer: torch.optim.Optimizer | None,
    model: torch.nn.Module,
    min_ndim: int = 2,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[TrackedParam]:
    """Parameters of ``optimizer`` (or of ``model`` without one) with at least ``min_ndim`` dims
    that are matrices (a (C, 1, 1) scale is not), each with its matrix view.

    Names, roles and views come from the group keys ``param_names`` / ``roles`` / ``matrix_views`` that
    :func:`~lightning_optlab.policy.build_param_groups` sets; groups without them (a plain
    ``torch.optim.AdamW``) get names from ``model.named_parameters()`` and roles from
    :func:`~lightning_optlab.policy.describe_parameters`. ``include`` / ``exclude`` are name globs.
    """
    infos = {id(i.param): i for i in describe_parameters(model)}
    inferred = {k: i.view.unsplit() for k, i in infos.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    entries: list[TrackedParam] = []
    if optimizer is not None:
        groups = optimizer.param_groups
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
    for gi, group in enumerate(groups):
        pnames = group.get("param_names")
        roles = group.get("roles")
        views = group_views(group, group["params"], inferred)
        for k, p in enumerate(group["params"]):
            view = views[k]
            if p.is_complex() or p.ndim < min_ndim or (min_ndim >= 2 and not view.is_matrix):
                continue
            info = infos.get(id(p))
            name = pnames[k] if pnames else (info.name if info else names.get(id(p), f"{gi}.{k}"))
            role = roles[k] if roles else (info.role if info else ("hidden" if p.ndim >= 2 else "bias"))
            if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
                continue
            if exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            entries.append(
                TrackedParam(name, role, COMPONENT_OF_ROLE.get(role), p, gi, group_name(group, gi),
                             group.get("algorithm"), view)
            )
    return entries


def first_optimizer(trainer: Any) -> torch.optim.Optimizer | None:
    opts = getattr(trainer, "optimizers", None) or []
    return opts[0] if opts else None


# --- snapshots and the worker --------------------------------------------------------------


class Snapshot:
    """Copies of tensors taken at a hook, ready for a worker thread.

    On CUDA with ``to_cpu``: async copies into pinned host buffers (reused across snapshots via
    ``buffers``) and an event the worker waits on. Otherwise: clones on the tensors' device and,
    on CUDA, an event marking when the clones are complete. ``owned=True``: the tensors are fresh
    results nothing else will write to (e.g. Gram matrices computed for this snapshot), so tensors
    that stay where they are (CPU ones, or all with ``to_cpu=False``) are kept as they are instead
    of cloned.
    """

    def __init__(self, tensors: dict[Any, torch.Tensor], to_cpu: bool, buffers: dict | None = None,
                 owned: bool = False, copy_stream: Any = None):
        self.tensors: dict[Any, torch.Tensor] = {}
        self.event = None
        cuda = any(t.is_cuda for t in tensors.values())
        # Owned tensors (nothing overwrites them) may be copied to the host on a side stream, so
        # the copy engine works while the training stream goes on; live parameters and gradients
        # must be copied on the training stream, before the optimizer step that follows.
        side = copy_stream if (owned and to_cpu and cuda and copy_stream is not None) else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for key, t in tensors.items():
                t = t.detach()
                if t.is_cuda and to_cpu:
                    buf = None if buffers is None else buffers.get(key)
                    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                        if buffers is not None:
                            buffers[key] = buf
                    buf.copy_(t, non_blocking=True)
                    if side is not None:
                        t.record_stream(side)  # keep its memory until the side copy is done
                    self.tensors[key] = buf
                else:
                    self.tensors[key] = t if owned else t.clone()
            if cuda:
                self.event = torch.cuda.Event()
                self.event.record()

    def wait(self) -> dict[Any, torch.Tensor]:
        """Called in the worker: block (the worker only) until the copies are complete."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensors


class BackgroundWorker:
    """One daemon thread running submitted jobs in order; results collected by the caller.

    ``submit`` refuses (returns False) while a job is queued or running, so snapshot buffers
    are never overwritten under the worker and the training thread never waits. ``collect``
    returns finished ``(tag, result)`` pairs without blocking; ``flush`` waits for all.
    An exception in a job is re-raised in the training thread by the next ``collect``/``flush``.

    ``threads``: CPU threads of the worker's torch ops (``torch.set_num_threads`` is per thread,
    so the training thread keeps its own); default half of the process's intra-op threads. Why:
    with all of them the worker competes with the training process's own threads (loader
    workers, the launch thread) and a snapshot takes longer, not shorter.
    """

    def __init__(self, name: str, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"{name}: threads must be >= 1 or None (half of torch.get_num_threads()), got {threads}")
        self.name = name
        self.threads = threads if threads is not None else max(1, torch.get_num_threads() // 2)
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a job finishes
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread only
        while True:
            item = self._jobs.get()
            if item is None:
                return
            tag, fn, args = item
            try:
                result = (tag, fn(*args), None)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                result = (tag, None, err)
            self._results.put(result)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending > 0

    def submit(self, tag: Any, fn: Callable, *args: Any) -> bool:
        with self._lock:
            if self._pending:
                return False
            self._pending += 1
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((tag, fn, args))
        return True

    def collect(self) -> list[tuple[Any, Any]]:
        out = []
        while True:
            try:
                tag, result, err = self._results.get_nowait()
            except queue.Empty:
                return out
            if err is not None:
                raise RuntimeError(f"{self.name}: the background computation for {tag!r} failed: {err!r}") from err
            out.append((tag, result))

    def flush(self, timeout: float | None = None) -> list[tuple[Any, Any]]:
        """Wait until no job is queued or running (at most ``timeout`` seconds), then
        :meth:`collect`. Woken the moment the last job finishes (no polling delay)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)
        return self.collect()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=10)
        self._thread = None


# --- logging -------------------------------------------------------------------------------


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


def check_every_n_steps(owner: str, value: Any, arg: str = "every_n_steps") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}({arg}={value!r}): give a positive integer number of optimizer steps, e.g. {arg}=50")
    return value


# --- gradient snapshots shared by the gradient analyses ------------------------------------

MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def gradient_matrices(
    tracked: Sequence[TrackedParam],
    optimizer: torch.optim.Optimizer | None,
    components: Sequence[str],
    source: str = "gradient",
) -> tuple[dict[str, torch.Tensor], dict[str, TrackedParam], int]:
    """``{name: matrix}`` of the tracked parameters of ``components`` (gradient or momentum).

    ``source``: ``gradient`` (``p.grad``), ``momentum`` (the rule's buffer ``momentum_buffer`` or
    ``exp_avg`` as the previous step left it; parameters without one are skipped) or ``auto``
    (momentum where the rule keeps one, else the gradient). Returns the matrices, their
    TrackedParam, and how many were skipped (no gradient / no buffer).
    """
    out, who, skipped = {}, {}, 0
    state = getattr(optimizer, "state", {}) if optimizer is not None else {}
    for tp in tracked:
        if tp.component not in components:
            continue
        t = None
        if source in ("momentum", "auto"):
            st = state.get(tp.param, {}) if hasattr(state, "get") else {}
            t = next((st[k] for k in MOMENTUM_KEYS if isinstance(st.get(k), torch.Tensor)), None)
        if t is None and source in ("gradient", "auto"):
            t = tp.param.grad
        if t is None:
            skipped += 1
            continue
        for name, m in tp.matrices(t):
            out[name] = m
            who[name] = tp
    return out, who, skipped


def by_shape(tensors: dict[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """Group same-shaped matrices into stacks: ``[(names, stack (k, m, n))]``."""
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault((tuple(t.shape), t.dtype), []).append(name)
    return [(names, torch.stack([tensors[n] for n in names])) for names in groups.values()]


def side_stream_context(tensors: dict[Any, torch.Tensor]):
    """In a worker thread: a CUDA side stream for computing on device snapshots (else a no-op)."""
    if any(t.is_cuda for t in tensors.values()):
        device = next(t.device for t in tensors.values() if t.is_cuda)
        return torch.cuda.stream(torch.cuda.Stream(device=device))
    return contextlib.nullcontext()


VALID_SOURCES = ("gradient", "momentum", "auto")


def check_components(owner: str, components: Sequence[str]) -> tuple[str, ...]:
    components = (components,) if isinstance(components, str) else tuple(components)
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ValueError(f"{owner}(components={list(components)!r}): components are {list(COMPONENTS)}; pick from those")
    return components


class BackgroundAnalysis(Callback):
    """What every callback that computes off the training thread shares: snapshot at a hook,
    compute in a :class:`BackgroundWorker`, log the results from the training thread at a later
    hook under the step they belong to, flush before the loggers close, and never make a step
    wait on the worker. CUDA tensors are copied to pinned host memory and computed on the CPU,
    because GPU work launched from a worker thread slows the training steps it overlaps several
    times over. A snapshot taken while the previous one is
    still computing is skipped and counted in ``skipped``, unless ``wait_if_busy`` asks for the
    exact cadence."""

    def __init__(self, wait_if_busy: bool = False, worker_threads: int | None = None) -> None:
        self.wait_if_busy = wait_if_busy
        self.skipped = 0
        self._worker = BackgroundWorker(type(self).__name__, worker_threads)
        self._tracked = None

    def _log_ready(self, trainer: Any, wait: bool = False) -> None:
        raise NotImplementedError

    def _on_skip(self, trainer: Any, step: int) -> None:
        self.skipped += 1

    def _worker_free(self, trainer: Any, step: int) -> bool:
        """Whether a snapshot may be taken now (waits for the worker only with ``wait_if_busy``)."""
        if self._worker.busy:
            if not self.wait_if_busy:
                self._on_skip(trainer, step)
                return False
            self._log_ready(trainer, wait=True)
        return True

    def _submit(self, trainer: Any, step: int, fn: Callable, *args: Any) -> None:
        self._worker.submit(step, fn, *args)
        if self.wait_if_busy:
            self._log_ready(trainer, wait=True)

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._log_ready(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # results of the last snapshots are logged before the loggers are finalized
        self._log_ready(trainer, wait=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._worker.close()
        self._tracked = None
