"""TensorBoardLayout: the run's charts arranged in TensorBoard's Custom Scalars tab.

TensorBoard's Scalars tab lists ~100 tags alphabetically (``epoch`` first). This callback writes
a layout once, after the first validation (or at the end of training), with a section for each part of the package the trainer
uses: the loss and accuracy; one section per spectral figure with the weights' and the
gradients' charts side by side, every component a line; the step-time shares; the manifold
distances; the learning rate of each rule. It also switches off the ``hp_metric`` placeholder
(-1) that TensorBoardLogger logs by default. ``optlab`` adds it to every TensorBoard run.
"""

from __future__ import annotations

import re
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

SPECTRAL_FIGURES = {
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "condition_number": "condition number",
    r"top\d+_concentration": "top-k concentration",
    "spectral_norm": "spectral norm",
}


def _chart(*regexes: str) -> list:
    return ["Multiline", list(regexes)]


def optlab_layout(callbacks: list[Any], logged: list[str]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for a trainer with ``callbacks`` whose model has logged the
    tags ``logged``: ``{section: {title: ["Multiline", [tag regex, ...]]}}``, a chart only
    for what is logged (the monitors' tags by the callbacks present, which log later)."""
    from .gradient_analysis import ComponentGradientAnalysis
    from .ns_analysis import NewtonSchulzAnalysis
    from .retraction import ManifoldRetraction
    from .spectral import SpectralMonitor
    from .step_time import StepTimeMonitor

    def present(kind: type) -> list[Any]:
        return [c for c in callbacks if isinstance(c, kind)]

    layout: dict[str, dict[str, list]] = {
        "1 training": {
            "loss": _chart(r"^train/loss$", r"^val/loss$", r"^test/loss$"),
            "accuracy": _chart(r"^(train|val|test)/acc"),
            "bits per byte": _chart(r"^(train|val|test)/bpb$"),
            "throughput": _chart(r"^throughput/"),
        }
    }
    kinds = sorted({k for c in present(SpectralMonitor) for k in c.kinds}, reverse=True)
    for i, (key, title) in enumerate(SPECTRAL_FIGURES.items()):
        layout[f"2.{i + 1} spectra: {title}"] = {
            f"{kind} ({title}, per component)": _chart(rf"^spectral/{kind}/component/[^/]+/{key}$")
            for kind in kinds  # weights then gradients: side by side
        }
    if present(StepTimeMonitor):
        layout["3 step time"] = {
            "share of the step": _chart(r"^step_time/.*_share$"),
            "milliseconds per step": _chart(r"^step_time/.*_ms$"),
        }
    if present(ManifoldRetraction):
        layout["4 manifold"] = {
            "distance after the retraction": _chart(r"^manifold/.*_distance_after/"),
            "distance before the retraction": _chart(r"^manifold/.*_distance_before/"),
            "retraction time and Stiefel iterations": _chart(r"^manifold/time_ms$", r"^manifold/stiefel_steps"),
        }
    layout["5 learning rate"] = {"lr per rule": _chart(r"^lr-")}
    if present(NewtonSchulzAnalysis):
        layout["6 Newton-Schulz"] = {"per step count": _chart(r"^ns_analysis/steps_")}
    if present(ComponentGradientAnalysis):
        layout["7 gradient analysis"] = {"per component": _chart(r"^gradient_analysis/")}
    layout["1 training"] = {
        title: chart for title, chart in layout["1 training"].items()
        if any(re.search(rx, tag) for rx in chart[1] for tag in logged)
    }
    return {section: charts for section, charts in layout.items() if charts}


class TensorBoardLayout(Callback):
    """Write :func:`optlab_layout` to every TensorBoardLogger and drop the ``hp_metric`` placeholder.

    Args:
        hp_metric: keep TensorBoardLogger's ``hp_metric`` (-1 until the user logs one).

    Example::

        Trainer(callbacks=[SpectralMonitor(), StepTimeMonitor(), TensorBoardLayout()])
    """

    def __init__(self, hp_metric: bool = False) -> None:
        self.hp_metric = hp_metric
        self.layout: dict[str, dict[str, list]] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # before the Trainer logs the hyperparameters, which is when the placeholder is written
        for logger in self._loggers(trainer):
            if hasattr(logger, "_default_hp_metric") and not self.hp_metric:
                logger._default_hp_metric = False

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: Any) -> None:
        loggers = self._loggers(trainer)
        if not loggers or self.layout is not None:
            return
        logged = [*trainer.callback_metrics, *trainer.logged_metrics]
        self.layout = optlab_layout(trainer.callbacks, logged)
        for logger in loggers:
            logger.experiment.add_custom_scalars(self.layout)

    @staticmethod
    def _loggers(trainer: Any) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
