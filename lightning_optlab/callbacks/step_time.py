"""StepTimeMonitor: where the time of a training step goes."""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from lightning.pytorch.callbacks.callback import Callback

from ._logging import log_scalars
from ._tracking import check_every_n_steps

# Callback hooks that run inside a training step; the ones a monitor overrides get timed.
_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
PARTS = ("forward_backward", "optimizer", "retraction", "monitors", "callbacks", "other")


class _Clock:
    """Timestamps: CUDA events on a CUDA device (read lazily), ``perf_counter`` otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ready(self, token: Any) -> bool:
        return True if not self.cuda else token.query()

    def wait(self, token: Any) -> None:
        if self.cuda:
            token.synchronize()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000.0


def _default_batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = _default_batch_size(item)
            if n is not None:
                return n
    return None


def _default_tokens(batch: Any, pl_module: Any) -> int | None:
    per_batch = getattr(pl_module, "tokens_per_batch", None)
    if per_batch is not None:
        return int(per_batch(batch) if callable(per_batch) else per_batch)
    x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(x, torch.Tensor) and x.ndim >= 2 and not x.is_floating_point() and not x.is_complex():
        return int(x.numel())  # (batch, sequence) of token ids
    return None


class _StepRecord:
    def __init__(self, step: int, start: Any):
        self.step = step
        self.start = start
        self.end = start
        self.fb: list[list[Any]] = []  # [start, end] per micro-batch
        self.opt_end = None
        self.post_end = None
        self.timed: list[tuple[Any, Any, str, str]] = []  # (start, end, phase, bucket)
        self.samples = 0
        self.tokens: int | None = 0


class StepTimeMonitor(Callback):
    r"""Time each optimizer step by part: forward+backward, optimizer, retraction, monitors, callbacks.

    The step window runs from this callback's ``on_train_batch_start`` of the first micro-batch
    to the end of the last ``on_train_batch_end`` work of the optimizer step (data loading between
    steps is outside). Its parts:

    * ``forward_backward``: each micro-batch from ``on_train_batch_start`` to ``on_after_backward``
      (``training_step``, ``zero_grad``, backward; summed over accumulated micro-batches).
    * ``optimizer``: from the last ``on_after_backward`` to the end of the optimizer's own step
      (AMP unscaling, gradient clipping and the update rules).
    * ``retraction``: the optimizer's step post-hooks, which is where ``ManifoldRetraction``
      works. Measured between a post-hook this callback puts first in the optimizer's post-hook
      list and a global post-hook (torch runs global post-hooks after an optimizer's own). The
      contract for other code: work registered with ``optimizer.register_step_post_hook`` is
      counted here. Putting the hook first uses torch's ``_optimizer_step_post_hooks`` ordered
      dict; without it, post-hooks registered earlier would count as ``optimizer``.
    * ``monitors``: the step-window hooks of every callback with ``_optlab_monitor = True``
      (``SpectralMonitor``, ``NewtonSchulzAnalysis``, ``ComponentGradientAnalysis``) and of the
      classes in ``monitors``. Work a monitor moves to a background thread is, by design, not
      counted (on a CPU-only machine it competes with training for cores).
    * ``callbacks``: the step-window hooks of all other callbacks (``ModularLRScaling``,
      ``ManifoldRetraction``'s logging, ``LearningRateMonitor``...).
      Time of timed hooks is subtracted from the part it falls in; hooks of other callbacks
      that run after this one's ``on_train_batch_end`` extend the window. Put this callback first
      in ``callbacks``: batch-start hooks that run before its own are outside the window.
    * ``other``: the rest of the window (Lightning's loop and logging, this callback).

    Timestamps are CUDA events on a CUDA device and ``time.perf_counter`` elsewhere. Nothing
    synchronizes on the hot path: a step's events are read when they have completed
    (``Event.query()``), normally a step later; at fit end the last ones are waited for.
    On CUDA a part is the GPU time between its events, so a part the GPU finishes faster than
    the host enqueues it shows the host's time.

    Logged every ``log_every_n_steps`` optimizer steps, as means over the steps since the last
    log:

    * ``step_time/{forward_backward,optimizer,retraction,monitors,callbacks,other,total}_ms``
    * ``step_time/{optimizer,retraction,monitors,callbacks}_share``: that part divided by
      forward_backward
    * ``throughput/samples_per_sec`` and, where the batch says, ``throughput/tokens_per_sec``:
      samples (tokens) per second of step-window time (excludes data loading).

    Args:
        log_every_n_steps: log interval in optimizer steps (default: the trainer's
            ``log_every_n_steps``).
        batch_size_fn: ``batch -> number of samples``; default: size of the first tensor's dim 0.
        tokens_fn: ``batch -> number of tokens``; default: ``pl_module.tokens_per_batch``
            (an int or a function of the batch) if set, else ``x.numel()`` when the batch is
            ``(x, ...)`` with ``x`` an integer tensor of at least 2 dims (token ids), else none.
        monitors: extra callback classes (or class names) to count as monitors, e.g.
            ``["LearningRateMonitor"]``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_optlab.callbacks import SpectralMonitor, StepTimeMonitor

        trainer = Trainer(callbacks=[StepTimeMonitor(), SpectralMonitor(every_n_steps=100)])
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        tokens_fn: Callable[[Any], int] | None = None,
        monitors: Sequence[type | str] = (),
    ) -> None:
        if log_every_n_steps is not None:
            check_every_n_steps("StepTimeMonitor", log_every_n_steps, "log_every_n_steps")
        self.log_every_n_steps = log_every_n_steps
        self.batch_size_fn = batch_size_fn
        self.tokens_fn = tokens_fn
        self.monitor_types = tuple(monitors)
        #: per-step part times in ms (the most recent 10,000 measured steps)
        self.records: deque[dict[str, float]] = deque(maxlen=10_000)
        self._clock: _Clock | None = None
        self._rec: _StepRecord | None = None
        self._pending: deque[_StepRecord] = deque()
        self._window: list[dict[str, float]] = []
        self._phase = "idle"
        self._stepping = False
        self._rec_done = False
        self._wrapped: list[tuple[Any, str]] = []
        self._handles: list[Any] = []
        self._optimizer = None
        self._dropped = 0

    # --- set-up ------------------------------------------------------------------------------

    def _is_monitor(self, cb: Any) -> bool:
        if cb is self:
            return False
        if getattr(cb, "_optlab_monitor", False):
            return True
        return any(
            (isinstance(t, str) and type(cb).__name__ == t) or (isinstance(t, type) and isinstance(cb, t))
            for t in self.monitor_types
        )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._clock = _Clock(pl_module.device)
        if self.log_every_n_steps is None:
            self.log_every_n_steps = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        for cb in trainer.callbacks:
            if cb is self:
                continue
            bucket = "monitors" if self._is_monitor(cb) else "callbacks"
            for hook in _STEP_HOOKS:
                if getattr(type(cb), hook, None) is getattr(Callback, hook) or hook in cb.__dict__:
                    continue
                setattr(cb, hook, self._timed(getattr(cb, hook), bucket, hook))
                self._wrapped.append((cb, hook))
        if trainer.optimizers:
            opt = trainer.optimizers[0]
            self._optimizer = opt
            handle = opt.register_step_post_hook(self._on_optimizer_step_end)
            hooks = getattr(opt, "_optimizer_step_post_hooks", None)
            if hasattr(hooks, "move_to_end"):
                hooks.move_to_end(handle.id, last=False)
            self._handles.append(handle)
            self._handles.append(register_optimizer_step_post_hook(self._on_post_hooks_end))

    def _unhook(self) -> None:
        for cb, hook in self._wrapped:
            cb.__dict__.pop(hook, None)
        self._wrapped.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._optimizer = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._unhook()

    def _timed(self, fn: Callable, bucket: str, hook: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            rec, clock = self._rec, self._clock
            if (
                rec is None
                or clock is None
                or self._phase == "idle"
                # a batch-start hook before this callback's belongs to a step not yet begun: untimed
                or (self._rec_done and (self._phase != "tail" or hook == "on_train_batch_start"))
            ):
                return fn(*args, **kwargs)
            phase = self._phase
            start = clock.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                end = clock.mark()
                rec.timed.append((start, end, phase, bucket))
                if phase == "tail":
                    rec.end = end

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    # --- marks ---------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._clock is None:
            return
        if self._rec is not None and self._rec_done:
            # The previous step's tail hooks have all run: its record is complete.
            self._pending.append(self._rec)
            self._rec = None
            if len(self._pending) > 64:  # events not completing: drop rather than block
                self._pending.popleft()
                self._dropped += 1
        self._harvest(trainer)
        now = self._clock.mark()
        if self._rec is None:
            self._rec = _StepRecord(trainer.global_step, now)
            self._rec_done = False
        rec = self._rec
        rec.fb.append([now, None])
        n = self.batch_size_fn(batch) if self.batch_size_fn else _default_batch_size(batch)
        rec.samples += int(n or 0)
        t = self.tokens_fn(batch) if self.tokens_fn else _default_tokens(batch, pl_module)
        rec.tokens = None if (t is None or rec.tokens is None) else rec.tokens + int(t)
        self._phase = "forward_backward"

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._rec is not None and self._rec.fb and self._rec.fb[-1][1] is None:
            self._rec.fb[-1][1] = self._clock.mark()
            self._phase = "optimizer"

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepping = True  # this micro-batch ends an optimizer step (even if AMP skips it)

    def _on_optimizer_step_end(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._rec is not None and self._phase == "optimizer":
            self._rec.opt_end = self._clock.mark()
            self._phase = "retraction"

    def _on_post_hooks_end(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is self._optimizer and self._rec is not None and self._phase == "retraction":
            self._rec.post_end = self._clock.mark()
            self._phase = "tail"

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rec = self._rec
        if rec is None:
            return
        rec.end = self._clock.mark()
        if self._stepping:
            # Monitors' batch-end hooks after this one still extend rec.end (phase "tail").
            self._phase = "tail"
            self._rec_done = True
            self._stepping = False
        else:
            self._phase = "between"  # accumulating: the next micro-batch follows

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._clock is not None:
            if self._rec is not None and self._rec_done:
                self._pending.append(self._rec)
            self._rec = None
            for rec in self._pending:
                self._clock.wait(rec.end)
            self._phase = "idle"
            self._harvest(trainer, final=True)
        self._unhook()

    # --- read-out ------------------------------------------------------------------------------

    def _harvest(self, trainer: Any, final: bool = False) -> None:
        clock = self._clock
        while self._pending:
            rec = self._pending[0]
            if not clock.ready(rec.end):
                break  # read next time; never wait on the hot path
            self._pending.popleft()
            self._window.append(self._parts(rec))
        if not self._window:
            return
        last_step = int(self._window[-1]["step"])
        if final or (last_step + 1) % self.log_every_n_steps == 0:
            log_scalars(trainer, self._summary(self._window), last_step)
            self._window = []

    def _parts(self, rec: _StepRecord) -> dict[str, float]:
        ms = self._clock.ms
        inside = {}  # time of timed callback hooks per phase, to subtract from that phase's part
        buckets = {"monitors": 0.0, "callbacks": 0.0}
        for a, b, phase, bucket in rec.timed:
            d = ms(a, b)
            inside[phase] = inside.get(phase, 0.0) + d
            buckets[bucket] += d
        fb = sum(ms(a, b) for a, b in rec.fb if b is not None) - inside.get("forward_backward", 0.0)
        last_fb_end = next((b for a, b in reversed(rec.fb) if b is not None), rec.start)
        opt_stop = rec.opt_end or rec.post_end or rec.end
        optimizer = ms(last_fb_end, opt_stop) - inside.get("optimizer", 0.0)
        retraction = 0.0
        if rec.opt_end is not None and rec.post_end is not None:
            retraction = ms(rec.opt_end, rec.post_end) - inside.get("retraction", 0.0)
        total = ms(rec.start, rec.end)
        out = {
            "step": float(rec.step),
            "forward_backward_ms": fb,
            "optimizer_ms": optimizer,
            "retraction_ms": retraction,
            "monitors_ms": buckets["monitors"],
            "callbacks_ms": buckets["callbacks"],
            "total_ms": total,
            "samples": float(rec.samples),
            "tokens": float(rec.tokens) if rec.tokens is not None else float("nan"),
        }
        out["other_ms"] = total - fb - optimizer - retraction - buckets["monitors"] - buckets["callbacks"]
        self.records.append(out)
        return out

    @staticmethod
    def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
        out = {}
        for part in PARTS + ("total",):
            out[f"step_time/{part}_ms"] = statistics.fmean(r[f"{part}_ms"] for r in rows)
        fb = out["step_time/forward_backward_ms"]
        for part in ("optimizer", "retraction", "monitors", "callbacks"):
            out[f"step_time/{part}_share"] = out[f"step_time/{part}_ms"] / fb if fb > 0 else float("nan")
        seconds = sum(r["total_ms"] for r in rows) / 1000.0
        if seconds > 0:
            out["throughput/samples_per_sec"] = sum(r["samples"] for r in rows) / seconds
            tokens = [r["tokens"] for r in rows]
            if all(t == t for t in tokens):  # no NaN: every step knew its tokens
                out["throughput/tokens_per_sec"] = sum(tokens) / seconds
        return out
