"""NewtonSchulzAnalysis: what Muon's orthogonalization does to the gradients, per step count."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..spectral.ns import DEFAULT_NS_STEPS, ns_figures_of_spectrum, ns_map_of_spectrum, ns_transformation
from ._spectra import EXACT_MAX_K, analysis_engine
from ._logging import log_scalars, mean
from ._tracking import (
    by_shape,
    check_components,
    check_every_n_steps,
    gradient_matrices,
    sanitize_tag,
    tracked_parameters,
    VALID_SOURCES,
)
from ._worker import BackgroundAnalysis, side_stream_context, Snapshot

FIGURES = ("cosine", "angle_deg", "information_loss", "orthogonality_error")


class NewtonSchulzAnalysis(BackgroundAnalysis):
    r"""Angle, information loss and orthogonality of ``NS(G)`` for several Newton-Schulz step counts.

    Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (accumulated, unscaled
    gradients), the matrices of ``components`` are measured and the figures are logged from the
    training thread at a later hook under the step they belong to. If the previous analysis is
    still running when the next is due, that one is skipped (``wait_if_busy=True`` waits
    instead). Only global rank zero measures.

    How (``method``): by default from each gradient's singular values, which the quintic
    iteration maps one by one (``x -> a x + b x^3 + c x^5`` after normalization, in exact
    arithmetic; :func:`~lightning_optlab.spectral.ns.ns_map_of_spectrum`): one spectrum per
    matrix serves every step count, taken as :class:`SpectralMonitor` takes it (``"auto"``: exact
    for small matrices, the Lanczos estimate on CUDA above ``exact_max_k``; ``"svd"``,
    ``"gram"``, ``"gram_host"``, ``"lanczos"`` force one). Why: iterating every gradient ten
    times costs twice Muon's own step at every snapshot. ``"iterate"`` runs the iteration itself
    (:func:`~lightning_optlab.spectral.ns_transformation`, in Muon's dtype: bf16 on CUDA, fp32
    on CPU) on copies in the worker, rounding included.

    Figures (see :mod:`lightning_optlab.spectral.ns`): ``cosine`` and ``angle_deg`` between G and
    NS(G), ``information_loss`` = ``||G/||G|| - NS(G)/||NS(G)|| ||_F``, ``orthogonality_error`` =
    ``||O O^T - I||_F / sqrt(min(m, n))``.

    Tags: ``ns_analysis/steps_{s}/{figure}`` (mean over the analysed matrices) and, with
    ``log_per_matrix``, ``ns_analysis/matrix/{parameter name}/steps_{s}/{figure}``.

    Args:
        every_n_steps: analyse every this many optimizer steps.
        steps: Newton-Schulz step counts to compare.
        components: which components to analyse (``input``, ``hidden``, ``output``); Muon's
            domain is ``hidden``.
        source: ``gradient``, ``momentum`` (the rule's ``momentum_buffer``/``exp_avg`` as the
            previous step left it) or ``auto`` (momentum where the rule keeps one).
        dtype: NS compute dtype of ``method="iterate"`` (default: Muon's, bf16 on CUDA, fp32 on CPU).
        log_per_matrix: also log each matrix's figures.
        wait_if_busy: wait for the previous analysis instead of skipping one.
        method: ``"auto"`` (default), ``"iterate"``, or a :class:`SpectralMonitor` method.
        exact_max_k, estimate: as for :class:`SpectralMonitor`.

    Example::

        trainer = Trainer(callbacks=[NewtonSchulzAnalysis(every_n_steps=200, steps=(1, 3, 5, 10))])
    """

    _optlab_monitor = True

    def __init__(
        self,
        every_n_steps: int = 100,
        steps: Sequence[int] = DEFAULT_NS_STEPS,
        components: Sequence[str] = ("hidden",),
        source: str = "gradient",
        dtype: torch.dtype | None = None,
        log_per_matrix: bool = False,
        wait_if_busy: bool = False,
        method: str = "auto",
        exact_max_k: int = EXACT_MAX_K,
        estimate: dict | None = None,
    ) -> None:
        self.every_n_steps = check_every_n_steps("NewtonSchulzAnalysis", every_n_steps)
        self.steps = tuple(steps)
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise ValueError(f"NewtonSchulzAnalysis(steps={list(steps)!r}): give positive integers, e.g. steps=(1, 2, 3, 5, 10)")
        self.components = check_components("NewtonSchulzAnalysis", components)
        if source not in VALID_SOURCES:
            raise ValueError(f"NewtonSchulzAnalysis(source={source!r}): use one of {list(VALID_SOURCES)}")
        self.source = source
        self.dtype = dtype
        self.log_per_matrix = log_per_matrix
        self._engine = analysis_engine("NewtonSchulzAnalysis", method, exact_max_k, estimate)
        self.method = method
        super().__init__(wait_if_busy)
        #: figures of the latest logged analysis ``{tag: value}`` and its step
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self._warned = False

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._log_ready(trainer)
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        if self._tracked is None:
            self._tracked = tracked_parameters(optimizer, pl_module)
        if not self._snapshot_now(trainer, step, self._tracked):
            return
        mats, _, _ = gradient_matrices(self._tracked, optimizer, self.components, self.source)
        if not trainer.is_global_zero:  # (the other ranks only sent their shards)
            return
        if not mats:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"NewtonSchulzAnalysis: no {self.source} matrices in components {list(self.components)} "
                    "at this step; check components=... (roles come from the policy / describe_parameters)"
                )
            return
        if self.method == "iterate":
            self._submit(trainer, step, self._compute, Snapshot(mats, to_cpu=True))
            return
        tensors = {("gradients", name): m for name, m in mats.items()}
        parts = self._engine.take(tensors, list(tensors))
        self._submit(trainer, step, self._compute_from_spectra, parts)

    def _scalars(self, rows) -> dict[str, float]:
        """Tags of ``rows`` (``(parameter name, step count, {figure: value})``): the means over the
        matrices and, with ``log_per_matrix``, each matrix's."""
        per: dict[str, list[float]] = {}
        scalars: dict[str, float] = {}
        for name, s, figs in rows:
            for key in FIGURES:
                per.setdefault(f"ns_analysis/steps_{s}/{key}", []).append(figs[key])
                if self.log_per_matrix:
                    scalars[f"ns_analysis/matrix/{sanitize_tag(name)}/steps_{s}/{key}"] = figs[key]
        scalars.update({tag: mean(vals) for tag, vals in per.items()})
        return scalars

    def _compute_from_spectra(self, parts: list) -> dict[str, float]:
        """Worker: the figures of every step count from each matrix's singular values."""
        groups, _, _, _ = self._engine.spectra(parts)
        rows = []
        for metas, sv in groups:
            for s, o in ns_map_of_spectrum(sv, self.steps).items():
                columns = {key: v.tolist() for key, v in ns_figures_of_spectrum(sv, o).items()}
                rows += [(name, s, {key: columns[key][j] for key in FIGURES}) for j, (_, name) in enumerate(metas)]
        return self._scalars(rows)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._engine.clear()

    def _compute(self, snap: Snapshot) -> dict[str, float]:
        """Worker, ``method="iterate"``: the NS iteration itself on the copies."""
        tensors = snap.wait()
        rows = []
        with side_stream_context(tensors):
            for names, stack in by_shape(tensors):
                finite = torch.isfinite(stack).flatten(1).all(1).tolist()
                for s, f in ns_transformation(stack, self.steps, dtype=self.dtype).items():
                    columns = {key: f[key].float().cpu().tolist() for key in FIGURES}
                    rows += [(name, s, {key: columns[key][j] for key in FIGURES})
                             for j, name in enumerate(names) if finite[j]]
        return self._scalars(rows)

    def _log_ready(self, trainer: Any, wait: bool = False) -> None:
        for step, scalars in self._worker.flush() if wait else self._worker.collect():
            log_scalars(trainer, scalars, step)
            self.last_metrics, self.last_step = scalars, step
