"""LineProgressBar: progress as whole lines, for output that is not a terminal.

tqdm redraws its bar with carriage returns; in a CI log, a file or a notebook's captured output
each redraw becomes a line, thousands per run. This bar prints one line every ``every_n_steps``
(about ten per epoch by default) and one after each validation. ``optlab`` uses it when stdout
is not a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


def _format(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "v_num":
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return "  ".join(parts)


class LineProgressBar(ProgressBar):
    """One line per ``every_n_steps`` training batches: epoch, batch, step rate, metrics.

    Args:
        every_n_steps: batches between lines; ``None`` = a tenth of an epoch (at least 1).

    Example::

        Trainer(callbacks=[LineProgressBar(every_n_steps=50)])
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"LineProgressBar: every_n_steps must be an int >= 1 or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._t0 = 0.0
        self._last_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, file=sys.stdout, flush=True)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = self.total_train_batches
        every = self.every_n_steps or max(1, math.ceil(total / 10) if math.isfinite(total) else 50)
        last = math.isfinite(total) and batch_idx + 1 == total
        if (batch_idx + 1) % every and not last:
            return
        now = time.perf_counter()
        rate = (trainer.global_step - self._last_step) / max(now - self._t0, 1e-9)
        self._t0, self._last_step = now, trainer.global_step
        of = f"/{int(total)}" if math.isfinite(total) else ""
        self._write(
            f"epoch {trainer.current_epoch}  batch {batch_idx + 1}{of}  step {trainer.global_step}  "
            f"{rate:.3g} steps/s  {_format(self._train_metrics(trainer, pl_module))}".rstrip()
        )

    def _train_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        # validation figures get their own line when they change
        return {k: v for k, v in self.get_metrics(trainer, pl_module).items() if not k.startswith("val")}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        val = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("val") and getattr(v, "numel", lambda: 1)() == 1}
        if val:
            self._write(f"validation after step {trainer.global_step}  {_format(val)}")
