"""ComponentGradientAnalysis: per component, how much orthogonalization would change the update."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..spectral.ns import ns_benefit, ns_benefit_of_spectrum
from ._spectra import EXACT_MAX_K, analysis_engine
from ._logging import log_dir, log_scalars, log_text, mean
from ._tracking import (
    by_shape,
    check_components,
    check_every_n_steps,
    COMPONENTS,
    gradient_matrices,
    tracked_parameters,
)
from ._worker import BackgroundAnalysis, side_stream_context, Snapshot

FIGURES = ("effective_rank", "relative_effective_rank", "ns_effective_rank", "benefit_ratio", "information_loss")


class ComponentGradientAnalysis(BackgroundAnalysis):
    r"""Gradient effective rank and Newton-Schulz benefit per component, and a recommendation table.

    Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (accumulated, unscaled
    gradients), the gradient matrices of each component (``input`` = role embedding, ``hidden``,
    ``output``; roles from the policy's param groups, or
    :func:`~lightning_optlab.policy.describe_parameters`) are measured: per matrix, with
    ``ns_steps`` NS steps, the effective rank of G and of NS(G), their ratio (the *NS benefit
    ratio*), effective rank relative to ``min(m, n)``, and the information loss. By default these
    come from each gradient's singular values (NS maps them one by one, see
    :class:`NewtonSchulzAnalysis`; spectra taken as :class:`SpectralMonitor` takes them:
    ``method="auto"``, exact for small matrices, the Lanczos estimate on CUDA above
    ``exact_max_k``); ``method="iterate"`` runs :func:`lightning_optlab.spectral.ns_benefit` (the
    iteration and two SVDs per matrix) on copies in the worker. Component figures are the
    mean over its matrices; they are logged at a later hook under their step, and accumulated over
    the run. Only global rank zero measures; an analysis due while the previous one still runs is
    skipped.

    At the end of fit, a recommendation table (one row per component: the run-mean figures,
    the rules the component was trained with, the rule the evidence favours and why) is written
    to ``{log_dir}/{filename}`` as Markdown and logged as TensorBoard text
    ``gradient_analysis/recommendations``. The rule of thumb, stated in the table: a component
    whose NS benefit ratio is at least ``benefit_threshold`` has gradients dominated by a few
    directions that orthogonalization spreads out, which favours an orthogonalized update (muon);
    below it, orthogonalization mostly discards the gradient's shape (see the information loss),
    which favours an element-wise adaptive rule (adamw).

    Tags: ``gradient_analysis/{component}/{effective_rank, relative_effective_rank,
    ns_effective_rank, benefit_ratio, information_loss}``; text ``gradient_analysis/recommendations``.

    Args:
        every_n_steps: analyse every this many optimizer steps.
        ns_steps: Newton-Schulz steps for NS(G) (Muon's default is 5).
        components: components to analyse.
        benefit_threshold: NS benefit ratio from which an orthogonalized rule is recommended.
        filename: name of the Markdown file written to the log dir (``None``: no file).
        dtype: NS compute dtype of ``method="iterate"`` (default: Muon's, bf16 on CUDA, fp32 on CPU).
        wait_if_busy: wait for the previous analysis instead of skipping one.
        method: ``"auto"`` (default), ``"iterate"``, or a :class:`SpectralMonitor` method.
        exact_max_k, estimate: as for :class:`SpectralMonitor`.

    Example::

        trainer = Trainer(callbacks=[ComponentGradientAnalysis(every_n_steps=100)])
        # after fit: <log_dir>/gradient_recommendations.md
    """

    _optlab_monitor = True

    def __init__(
        self,
        every_n_steps: int = 100,
        ns_steps: int = 5,
        components: Sequence[str] = COMPONENTS,
        benefit_threshold: float = 1.5,
        filename: str | None = "gradient_recommendations.md",
        dtype: torch.dtype | None = None,
        wait_if_busy: bool = False,
        method: str = "auto",
        exact_max_k: int = EXACT_MAX_K,
        estimate: dict | None = None,
    ) -> None:
        self.every_n_steps = check_every_n_steps("ComponentGradientAnalysis", every_n_steps)
        if not isinstance(ns_steps, int) or ns_steps < 1:
            raise ValueError(f"ComponentGradientAnalysis(ns_steps={ns_steps!r}): give a positive integer, e.g. ns_steps=5")
        if benefit_threshold <= 0:
            raise ValueError(f"ComponentGradientAnalysis(benefit_threshold={benefit_threshold}): must be > 0, e.g. 1.5")
        self.ns_steps = ns_steps
        self.components = check_components("ComponentGradientAnalysis", components)
        self.benefit_threshold = float(benefit_threshold)
        self.filename = filename
        self.dtype = dtype
        self._engine = analysis_engine("ComponentGradientAnalysis", method, exact_max_k, estimate)
        self.method = method
        super().__init__(wait_if_busy)
        #: run totals per component: ``{component: {figure: [sum, count]}}``
        self.totals: dict[str, dict[str, list[float]]] = {}
        self.rules: dict[str, set[str]] = {}
        self.matrices: dict[str, int] = {}
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        #: the table written at fit end (Markdown)
        self.report: str | None = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._log_ready(trainer)
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        if self._tracked is None:
            self._tracked = tracked_parameters(optimizer, pl_module)
            for tp in self._tracked:
                if tp.component in self.components:
                    self.rules.setdefault(tp.component, set()).add(tp.algorithm or type(optimizer).__name__)
                    self.matrices[tp.component] = self.matrices.get(tp.component, 0) + 1
        if not self._snapshot_now(trainer, step, self._tracked):
            return
        mats, who, _ = gradient_matrices(self._tracked, optimizer, self.components, "gradient")
        if not mats or not trainer.is_global_zero:  # (the other ranks only sent their shards)
            return
        component_of = {name: tp.component for name, tp in who.items()}
        if self.method == "iterate":
            self._submit(trainer, step, self._compute, Snapshot(mats, to_cpu=True), component_of)
            return
        tensors = {("gradients", name): m for name, m in mats.items()}
        self._submit(trainer, step, self._compute_from_spectra, self._engine.take(tensors, list(tensors)), component_of)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.is_global_zero or not self.totals:
            return
        self.report = self.recommendation_table()
        log_text(trainer, "gradient_analysis/recommendations", self.report, trainer.global_step)
        directory = log_dir(trainer)
        if self.filename and directory:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, self.filename)
            with open(path, "w") as f:
                f.write(self.report + "\n")
            rank_zero_info(f"ComponentGradientAnalysis: recommendations written to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "rules": {k: sorted(v) for k, v in self.rules.items()}, "matrices": self.matrices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = {c: {k: list(v) for k, v in d.items()} for c, d in state_dict.get("totals", {}).items()}
        self.rules = {k: set(v) for k, v in state_dict.get("rules", {}).items()}
        self.matrices = dict(state_dict.get("matrices", {}))

    # --- worker side -------------------------------------------------------------------------

    def _compute_from_spectra(self, parts: list, component_of: dict[str, str]) -> dict[str, dict[str, float]]:
        """Worker: the figures of each matrix from its singular values, means per component."""
        groups, _, _, _ = self._engine.spectra(parts)
        rows: dict[str, dict[str, list[float]]] = {}
        for metas, sv in groups:
            figs = ns_benefit_of_spectrum(sv, self.ns_steps)
            values = {k: figs[k].tolist() for k in FIGURES}
            for i, (_, name) in enumerate(metas):
                row = rows.setdefault(component_of[name], {})
                for k in FIGURES:
                    row.setdefault(k, []).append(values[k][i])
        return {c: {k: mean(v) for k, v in figs.items()} for c, figs in rows.items()}

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._engine.clear()

    def _compute(self, snap: Snapshot, component_of: dict[str, str]) -> dict[str, dict[str, float]]:
        """Worker, ``method="iterate"``: the iteration and SVDs on the copies."""
        tensors = snap.wait()
        rows: dict[str, dict[str, list[float]]] = {}
        with side_stream_context(tensors):
            for names, stack in by_shape(tensors):
                finite = torch.isfinite(stack).flatten(1).all(1).tolist()
                figs = ns_benefit(stack, steps=self.ns_steps, dtype=self.dtype)
                values = {k: figs[k].float().cpu().tolist() for k in FIGURES}
                for i, name in enumerate(names):
                    if not finite[i]:
                        continue
                    row = rows.setdefault(component_of[name], {})
                    for k in FIGURES:
                        row.setdefault(k, []).append(values[k][i])
        return {c: {k: mean(v) for k, v in figs.items()} for c, figs in rows.items()}

    # --- training-thread side ----------------------------------------------------------------

    def _log_ready(self, trainer: Any, wait: bool = False) -> None:
        for step, per_component in self._worker.flush() if wait else self._worker.collect():
            scalars = {}
            for comp, figs in per_component.items():
                tot = self.totals.setdefault(comp, {})
                for k, v in figs.items():
                    scalars[f"gradient_analysis/{comp}/{k}"] = v
                    acc = tot.setdefault(k, [0.0, 0])
                    acc[0] += v
                    acc[1] += 1
            log_scalars(trainer, scalars, step)
            self.last_metrics, self.last_step = scalars, step

    def run_means(self) -> dict[str, dict[str, float]]:
        """Mean of each figure over the analysed steps, per component."""
        return {c: {k: s / n for k, (s, n) in figs.items() if n} for c, figs in self.totals.items()}

    def recommend(self, figures: dict[str, float]) -> tuple[str, str]:
        """(rule, reason) for one component's run-mean figures."""
        ratio, loss = figures["benefit_ratio"], figures["information_loss"]
        rel = figures["relative_effective_rank"]
        if ratio >= self.benefit_threshold:
            return "muon", (
                f"NS raises the update's effective rank {ratio:.2f}x (>= {self.benefit_threshold:g}): the gradient "
                f"uses {rel:.0%} of its possible rank and orthogonalization spreads it"
            )
        return "adamw", (
            f"NS changes the update's spread little ({ratio:.2f}x < {self.benefit_threshold:g}) while moving it "
            f"by {loss:.2f} (information loss): an element-wise adaptive rule keeps the gradient's shape"
        )

    def recommendation_table(self) -> str:
        means = self.run_means()
        lines = [
            "| component | matrices | grad eff. rank | relative eff. rank | NS(G) eff. rank | NS benefit ratio "
            "| information loss | trained with | recommendation | why |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for comp in COMPONENTS:
            if comp not in means:
                continue
            f = means[comp]
            rule, why = self.recommend(f)
            lines.append(
                f"| {comp} | {self.matrices.get(comp, '?')} | {f['effective_rank']:.2f} | "
                f"{f['relative_effective_rank']:.3f} | {f['ns_effective_rank']:.2f} | {f['benefit_ratio']:.2f} | "
                f"{f['information_loss']:.3f} | {', '.join(sorted(self.rules.get(comp, ()))) or '?'} | "
                f"**{rule}** | {why} |"
            )
        n = max((acc[1] for figs in self.totals.values() for acc in figs.values()), default=0)
        lines.append("")
        lines.append(
            f"Means over {n} analysed step(s), NS with {self.ns_steps} steps. Rule of thumb: NS benefit ratio "
            f">= {self.benefit_threshold:g} favours an orthogonalized update (muon), below it an element-wise "
            "adaptive one (adamw). Evidence from gradient spectra only; constraints (sphere, stiefel) are not judged here."
        )
        return "\n".join(lines)
