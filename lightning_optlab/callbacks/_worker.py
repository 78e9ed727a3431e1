"""Off the training thread: snapshots of tensors taken at a hook (pinned host copies on CUDA,
so later in-place updates do not race the worker), one worker thread per callback that computes
on them, and :class:`BackgroundAnalysis`, the base of every callback that works this way (results
logged from the training thread, under the step they were taken at).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks.callback import Callback

from ._tracking import any_sharded


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


def side_stream_context(tensors: dict[Any, torch.Tensor]):
    """In a worker thread: a CUDA side stream for computing on device snapshots (else a no-op)."""
    if any(t.is_cuda for t in tensors.values()):
        device = next(t.device for t in tensors.values() if t.is_cuda)
        return torch.cuda.stream(torch.cuda.Stream(device=device))
    return contextlib.nullcontext()


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

    def _snapshot_now(self, trainer: Any, step: int, tracked: Any) -> bool:
        """Whether this rank takes part in the snapshot of ``step``: rank zero decides
        (:meth:`_worker_free`). When a ``tracked`` parameter is sharded (FSDP2) every rank takes
        part in the snapshot's gathers, so the others follow rank zero's decision (one
        broadcast); otherwise they never snapshot."""
        sharded = any_sharded(tracked)
        if not (trainer.is_global_zero or sharded):
            return False
        take = self._worker_free(trainer, step) if trainer.is_global_zero else False
        if sharded:
            take = bool(trainer.strategy.broadcast(take, src=0))
        return take

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
