"""SpectralMonitor: singular spectra of weights and gradients, off the training critical path."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..spectral.metrics import spectrum_metrics
from ._logging import (
    geometric_mean,
    histogram_stats,
    log_image,
    log_merged,
    log_scalars,
    mean,
    tensorboard_summary,
)
from ._tracking import check_every_n_steps, first_optimizer, sanitize_tag, tracked_parameters
from ._spectra import EXACT_MAX_K, SpectrumSnapshots
from ._worker import BackgroundAnalysis

KINDS = ("weights", "gradients")


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_spectrum_image(title: str, s: np.ndarray, width_px: int = 320, height_px: int = 240) -> np.ndarray:
    """A log-scale plot of singular values ``s`` (descending) as an ``(H, W, 3)`` uint8 array.

    Uses matplotlib's object API (no pyplot, so it is safe in a worker thread).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 80
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positive = s[s > 0]
    if positive.size:
        ax.semilogy(np.arange(1, positive.size + 1), positive, lw=1.2)
    ax.set_title(title, fontsize=7)
    ax.set_xlabel("index", fontsize=7)
    ax.set_ylabel("singular value", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class SpectralMonitor(BackgroundAnalysis):
    r"""Log singular-spectrum figures of weight and gradient matrices to TensorBoard.

    Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (after gradient
    accumulation and AMP unscaling), the monitor snapshots every tracked matrix -- the weights as
    they are before the step, the gradients about to be applied -- and a background thread
    computes the full singular spectrum of each and its figures: effective rank, stable rank,
    condition number, top-k concentration, spectral norm (:mod:`lightning_optlab.spectral`).
    The results are logged from the training thread at a later hook, under the step they were
    taken at; the step never waits for a decomposition. Conv kernels and stored-transposed
    weights are read through their matrix view; vectors are not tracked.

    How the spectrum is computed (``method``):

    * ``"auto"`` (default): on CUDA, ``"gram_host"`` for matrices whose small side is at most
      ``exact_max_k`` and ``"lanczos"`` for the larger ones; on the CPU, ``"svd"``.
    * ``"lanczos"``: an estimate from matrix products (:mod:`lightning_optlab.spectral.lanczos`):
      the top ``rank`` singular values by subspace iteration, the rest by stochastic Lanczos
      quadrature of the deflated matrix's Gram. The copies, Grams (bf16 products with float32
      accumulation on CUDA) and products run on the training stream at the snapshot step, in
      batches of at most 1 GiB; only a few hundred numbers per matrix go to the host, where the
      worker rebuilds the spectrum. Why: an exact decomposition of hundreds of ``2048 x 2048``
      Grams per snapshot costs seconds; the products cost milliseconds and run on matrix units.
      Errors against float64 SVDs (tested): Frobenius norm exact, spectral norm within 0.5%,
      stable rank within 1%, top-k concentration within 2% (k <= rank; 3% seen
      once on a random-initialised matrix's gapless top), effective rank within 1%
      (5% on exponential decays without a floor and on small-batch gradients whose rank lies
      between ``rank`` and ``k``); the condition number is a lower bound, read it only below ~1e2.
    * ``"gram_host"``: the Gram matrix of the small side (``k x k``,
      ``k = min(m, n)``) formed in float64 on the training stream, batched per shape, copied
      asynchronously to reused pinned host buffers (``k^2`` float64 values per matrix), and
      decomposed by ``eigvalsh`` on the CPU in ``gram_dtype``. Why: an eigendecomposition of the
      Gram is far cheaper than an SVD of the matrix, and decomposing on the GPU competes with
      training. Singular values are exact to about ``5e-8 * sigma_max``; the condition number is
      exact up to ~2e7 and a lower bound beyond (:func:`~lightning_optlab.spectral.singular_values_gram`).
      ``gram_dtype="float32"`` raises that floor to ~1e-3 * sigma_max (condition numbers of
      spectra spanning ~1e4 read ``inf``) for a cheaper CPU decomposition.
    * ``"svd"`` (CPU default): ``torch.linalg.svdvals`` in float32 on copies (CUDA tensors are
      copied whole to pinned host memory): the reference.
    * ``"gram"``: formed and decomposed where the tensors live, in the worker, on a
      lowest-priority CUDA stream (a device copy of the tracked tensors while in flight).

    Sampling: if the worker has not finished a snapshot when the next is due, that one is skipped
    (``spectral/skipped_snapshots``, with a warning) unless ``wait_if_busy``; matrices with a
    missing or non-finite gradient are left out (``spectral/gradients/nonfinite_matrices``).
    At fit end the snapshot in flight is waited for and logged. Only global rank zero measures.
    Cost per model size: ``docs/benchmarks.md`` (bench_ops, ``spectral_monitor``).

    Tags (``{kind}``: ``weights`` or ``gradients``; ``{metric}``: ``effective_rank``,
    ``stable_rank``, ``condition_number``, ``top{k}_concentration``, ``spectral_norm``):

    * ``spectral/{kind}/component/{input|hidden|output}/{metric}``: mean over the component's
      matrices (from each parameter's role); the condition number averaged geometrically.
    * ``spectral/{kind}/group/{param group name}/{metric}``: the same per param group.
    * ``spectral/{kind}/matrix/{parameter name}/{metric}``: per matrix (``log_per_matrix``).
    * histogram ``spectral/{kind}/spectrum/{parameter name}``; image
      ``spectral/{kind}/spectrum_plot/{parameter name}`` every ``image_every_n_steps``.

    Args:
        every_n_steps: measure at every ``trainer.global_step`` divisible by it (0 included).
        weights: measure weights.
        gradients: measure gradients.
        top_k: ``k`` of the top-k concentration.
        topk_power: 1 = share of the singular values, 2 = share of the energy.
        log_per_matrix: also log the scalars of each matrix.
        histograms: log each full spectrum as a histogram.
        image_every_n_steps: spectrum plots every this many steps (a multiple of
            ``every_n_steps``); ``"auto"`` = 10 x ``every_n_steps`` when matplotlib is
            installed; ``None`` (default) = never (one figure per matrix is drawn under the GIL,
            slow enough to skip snapshots on large models).
        include: parameter name globs to track (default: every matrix).
        exclude: parameter name globs to leave out.
        wait_if_busy: wait for the previous snapshot instead of skipping (exact cadence; the
            wait lands on the training step).
        method: ``"auto"`` | ``"lanczos"`` | ``"gram_host"`` | ``"svd"`` | ``"gram"``.
        gram_dtype: ``"float64"`` (default) or ``"float32"`` (``"gram_host"``, ``"gram"``).
        exact_max_k: with ``method="auto"`` on CUDA, the largest small side of a matrix that gets
            an exact spectrum (default 256).
        estimate: options of the ``"lanczos"`` estimate: ``rank`` (top singular values by subspace
            iteration, default 64, at most half of ``k``), ``iterations`` (8), ``probes`` (16),
            ``steps`` (24 Lanczos steps), ``gram`` (``"bfloat16"`` or ``"float32"`` inputs of the
            Gram; default bfloat16 on CUDA, float32 on CPU).
        worker_threads: CPU threads of the worker's decompositions (default 3; ``None``: half of
            the process's). More threads hardly speed LAPACK's ``eigvalsh`` at these sizes and
            slow the training thread.

    Example::

        from lightning.pytorch import Trainer
        from lightning_optlab.callbacks import SpectralMonitor

        trainer = Trainer(callbacks=[SpectralMonitor(every_n_steps=100, top_k=5)])
    """

    _optlab_monitor = True  # StepTimeMonitor counts its hooks as monitoring time

    def __init__(
        self,
        every_n_steps: int = 100,
        weights: bool = True,
        gradients: bool = True,
        top_k: int = 5,
        topk_power: float = 1.0,
        log_per_matrix: bool = True,
        histograms: bool = True,
        image_every_n_steps: int | str | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        wait_if_busy: bool = False,
        method: str = "auto",
        gram_dtype: str = "float64",
        worker_threads: int | None = 3,
        exact_max_k: int = EXACT_MAX_K,
        estimate: dict | None = None,
    ) -> None:
        self._engine = SpectrumSnapshots("SpectralMonitor", method, gram_dtype, exact_max_k, estimate)
        self.method, self.gram_dtype, self.exact_max_k = method, gram_dtype, exact_max_k
        self.estimate = self._engine.estimate
        self.every_n_steps = check_every_n_steps("SpectralMonitor", every_n_steps)
        if not (weights or gradients):
            raise ValueError("SpectralMonitor(weights=False, gradients=False) measures nothing; enable one of them")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SpectralMonitor(top_k={top_k!r}): give a positive integer, e.g. top_k=5")
        if image_every_n_steps == "auto":
            image_every_n_steps = 10 * self.every_n_steps if _matplotlib_available() else None
        elif image_every_n_steps is not None:
            check_every_n_steps("SpectralMonitor", image_every_n_steps, "image_every_n_steps")
            if image_every_n_steps % self.every_n_steps:
                raise ValueError(
                    f"SpectralMonitor(image_every_n_steps={image_every_n_steps}) must be a multiple of "
                    f"every_n_steps={self.every_n_steps} (images are drawn from the measured snapshots), "
                    f"e.g. image_every_n_steps={10 * self.every_n_steps}"
                )
            if not _matplotlib_available():
                raise ImportError(
                    "SpectralMonitor(image_every_n_steps=...) draws spectrum plots with matplotlib, which is "
                    "not installed: `pip install matplotlib`, or pass image_every_n_steps=None"
                )
        self.image_every_n_steps = image_every_n_steps
        self.kinds = tuple(k for k, on in zip(KINDS, (weights, gradients)) if on)
        self.top_k = top_k
        self.topk_power = topk_power
        self.log_per_matrix = log_per_matrix
        self.histograms = histograms
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        super().__init__(wait_if_busy, worker_threads)
        #: figures of the latest logged snapshot: ``{tag: value}``, and its step
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        #: singular values of the latest logged snapshot: ``{(kind, parameter name): tensor}``
        self.last_spectra: dict[tuple[str, str], torch.Tensor] = {}
        #: worker wall seconds per logged snapshot, ``{step: seconds}``: from the moment its copies
        #: were complete to its figures being ready (a snapshot every ``every_n_steps`` steps keeps
        #: up while this stays below that many steps' time)
        self.worker_seconds: dict[int, float] = {}
        self._warned_skip = False
        self._warned_no_tb = False

    @property
    def _metric_names(self) -> tuple[str, ...]:
        return ("effective_rank", "stable_rank", "condition_number", f"top{self.top_k}_concentration", "spectral_norm")

    # --- hooks -------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.image_every_n_steps is not None:
            # import once here rather than on the worker's first image
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._log_ready(trainer)
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        if self._tracked is None:
            self._tracked = tracked_parameters(
                optimizer if hasattr(optimizer, "param_groups") else first_optimizer(trainer),
                pl_module, include=self.include, exclude=self.exclude,
            )
            if not self._tracked:
                rank_zero_warn("SpectralMonitor: no parameter with >= 2 dimensions to track (check include/exclude)")
        if not self._snapshot_now(trainer, step, self._tracked):
            return
        tensors, meta, missing = {}, [], 0
        for tp in self._tracked:
            for kind in self.kinds:
                t = tp.param if kind == "weights" else tp.param.grad
                if t is None:
                    missing += kind == "gradients"
                    continue
                for name, m in tp.matrices(t):  # the parameter's matrix view (a strided view)
                    tensors[(kind, name)] = m
                    meta.append((kind, name, tp.component, tp.group_name))
        if not tensors or not trainer.is_global_zero:  # (the other ranks only sent their shards)
            return
        images = self.image_every_n_steps is not None and step % self.image_every_n_steps == 0
        self._submit(trainer, step, self._compute, self._engine.take(tensors, meta), images, missing)

    def method_for(self, k: int, cuda: bool) -> str:
        """The method of a matrix whose small side is ``k``, on CUDA (``cuda=True``) or the CPU:
        ``"auto"`` is ``"svd"`` on the CPU, and on CUDA ``"gram_host"`` up to ``exact_max_k``,
        ``"lanczos"`` beyond."""
        return self._engine.method_for(k, cuda)

    @property
    def skipped_snapshots(self) -> int:
        return self.skipped

    def _on_skip(self, trainer: Any, step: int) -> None:
        self.skipped += 1
        if not self._warned_skip:
            self._warned_skip = True
            rank_zero_warn(
                "SpectralMonitor: the SVDs of the previous snapshot (with method='gram_host': the "
                f"eigendecompositions of its Gram matrices) were still running at step {step}; "
                "this snapshot is skipped (training does not wait). Raise every_n_steps, narrow "
                "include=..., or pass wait_if_busy=True."
            )
        log_scalars(trainer, {"spectral/skipped_snapshots": float(self.skipped)}, step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._engine.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_snapshots": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped_snapshots", 0))

    # --- worker side -------------------------------------------------------------------------

    def _compute(self, parts: list, images: bool, missing: int) -> dict[str, Any]:
        groups, shapes, total, t0 = self._engine.spectra(parts)
        return self._figures(groups, shapes, total, images, missing, t0)

    def _figures(self, groups: list, shapes: dict, measured: int, images: bool, missing: int,
                 t0: float) -> dict[str, Any]:
        """Scalars, spectra, histograms and images of ``[(meta entries, singular values (B, k))]``."""
        nonfinite = missing + measured - sum(len(metas) for metas, _ in groups)
        scalars: dict[str, float] = {}
        per_scope: dict[str, list[dict[str, float]]] = {}
        out_spectra, hist, imgs = {}, {}, {}
        topk_name = f"top{self.top_k}_concentration"
        for metas, sv in groups:
            figures = spectrum_metrics(sv, self.top_k, self.topk_power)  # each (B,)
            names = [topk_name if k == "topk_concentration" else k for k in figures]
            columns = torch.stack(list(figures.values())).tolist()  # one host conversion per group
            for j, (kind, name, component, group) in enumerate(metas):
                figs = {k: col[j] for k, col in zip(names, columns)}
                s = sv[j]
                tag_name = sanitize_tag(name)
                if self.log_per_matrix:
                    for k, v in figs.items():
                        scalars[f"spectral/{kind}/matrix/{tag_name}/{k}"] = v
                if component is not None:
                    per_scope.setdefault(f"spectral/{kind}/component/{component}", []).append(figs)
                per_scope.setdefault(f"spectral/{kind}/group/{group}", []).append(figs)
                out_spectra[(kind, name)] = s
                if self.histograms:
                    hist[f"spectral/{kind}/spectrum/{tag_name}"] = histogram_stats(s.numpy())
                if images:
                    imgs[f"spectral/{kind}/spectrum_plot/{tag_name}"] = render_spectrum_image(
                        f"{kind}: {name} {shapes[(kind, name)]}", s.numpy()
                    )
        for scope, rows in per_scope.items():
            for k in rows[0]:
                avg = geometric_mean if k == "condition_number" else mean
                scalars[f"{scope}/{k}"] = avg(r[k] for r in rows)
        if "gradients" in self.kinds:
            scalars["spectral/gradients/nonfinite_matrices"] = float(nonfinite)
        # worker seconds after the snapshot's data arrived (what decides whether it keeps up)
        return {"scalars": scalars, "spectra": out_spectra, "histograms": hist, "images": imgs,
                "summary": tensorboard_summary(scalars, hist), "seconds": time.perf_counter() - t0}

    # --- training-thread side ----------------------------------------------------------------

    def _log_ready(self, trainer: Any, wait: bool = False) -> None:
        results = self._worker.flush() if wait else self._worker.collect()
        for step, res in results:
            ok = log_merged(trainer, res["scalars"], res["histograms"], res["summary"], step)
            for tag, img in res["images"].items():
                ok &= log_image(trainer, tag, img, step)
            if not ok and not self._warned_no_tb:
                self._warned_no_tb = True
                rank_zero_warn(
                    "SpectralMonitor: no logger takes histograms/images (they need TensorBoardLogger); "
                    "only scalars are logged. Add a TensorBoardLogger or pass histograms=False, image_every_n_steps=None."
                )
            self.last_metrics = res["scalars"]
            self.last_spectra = res["spectra"]
            self.last_step = step
            self.worker_seconds[step] = res["seconds"]
