"""MuonBackwardOverlap: orthogonalize Muon's updates during backward instead of after it.

Lightning glue over :class:`lightning_optlab.optim.muon_overlap.MuonOverlap` (the math, the hooks
and the exactness argument are documented there). The callback decides *whether* the overlap is
exact for this run and *when* to arm it:

* at fit start it finds the trainer's :class:`~lightning_optlab.optim.ModularOptimizer` and checks
  what would change a gradient after its hook fired: gradient clipping (``gradient_clip_val``),
  several processes (DDP all-reduces gradients after backward), a ``GradScaler`` (fp16 AMP: the
  gradients are still scaled), manual optimization (the callback cannot know which backward a step
  follows), a sharded strategy or a split of Muon's NS work across ranks. If any applies it does
  not attach and says why (one warning, rank zero); training runs the plain Muon step;
* before each backward it arms the hooks only when an optimizer step follows that backward. Under
  gradient accumulation that is the last micro-batch of each window: its hooks see the summed
  gradient, the earlier micro-batches' hooks stay idle (their gradients are partial sums);
* the step checks that each gradient is still the one the hook saw (a clipping in
  ``configure_gradient_clipping`` or another callback that edits gradients is caught there: plain
  step, one warning naming the cause).

Example::

    trainer = L.Trainer(precision="bf16-mixed", gradient_clip_val=None,
                        callbacks=[MuonBackwardOverlap()])
    trainer.fit(model)   # a model whose optimizer has 'muon' groups (e.g. OptLabMixin + policy)
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..optim.muon_overlap import MuonOverlap, overlap_unsupported_reason


def overlap_fallback_reason(trainer: Trainer, pl_module: LightningModule) -> str | None:
    """Why the overlap would not be exact in this run (None: it is)."""
    if not pl_module.automatic_optimization:
        return "manual optimization: the callback cannot tell which backward a step follows"
    clip = trainer.gradient_clip_val
    if clip is not None and clip != 0:
        return (
            f"gradient clipping (gradient_clip_val={clip}) rescales the gradients after backward, "
            "which changes Muon's momentum input; set gradient_clip_val=None to overlap"
        )
    if trainer.world_size > 1:
        return (
            f"{trainer.world_size} processes ({type(trainer.strategy).__name__}): gradients are "
            "all-reduced after the hook fires"
        )
    strategy = type(trainer.strategy).__name__
    if any(s in strategy for s in ("FSDP", "DeepSpeed", "ModelParallel")):
        return f"{strategy} shards parameters; Newton-Schulz needs whole matrices"
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return (
            "a GradScaler (fp16 AMP): gradients are still scaled when the hook fires and are "
            "unscaled in place before the step (by a kernel the step's check cannot see); use "
            "bf16-mixed to overlap"
        )
    if len(trainer.optimizers) != 1:
        return f"{len(trainer.optimizers)} optimizers; the overlap drives one ModularOptimizer"
    return overlap_unsupported_reason(trainer.optimizers[0])


class MuonBackwardOverlap(Callback):
    """Orthogonalize each Muon matrix on a side stream as soon as backward has its gradient.

    Opt-in; exact with respect to the plain step (the same ops; on CPU the same bits) or not
    attached at all, with the reason logged (see the module docstring for the cases).

    Measured (H100, 42M GPT, batch 16 x 1024, bf16-mixed, no clipping, 2026-11-24): it does NOT
    pay yet. Muon-policy tokens/s fell from 529k (plain step, one CUDA graph) to 279k with the
    overlap: each matrix's Newton-Schulz runs alone, ~30 kernel launches from the autograd thread
    per matrix, competing with backward's kernels, where the plain step batches them by shape in
    one graph. Use it to study the overlap, not for speed; batching the hook work per shape (or a
    graph per layer) is the next step.

    Example::

        trainer = Trainer(callbacks=[MuonBackwardOverlap()], gradient_clip_val=None)

    Attributes: ``overlap`` (the attached :class:`MuonOverlap`, or None; closed at fit end),
    ``reason`` (why not attached, or None), ``armed_backwards`` (backward passes that pre-computed
    directions), ``overlapped_steps`` / ``plain_steps`` (muon group steps of the last fit that used
    them / that fell back, kept after fit end).
    """

    def __init__(self) -> None:
        self.overlap: MuonOverlap | None = None
        self.reason: str | None = None
        self.armed_backwards = 0
        self.overlapped_steps = 0
        self.plain_steps = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()
        self.armed_backwards = self.overlapped_steps = self.plain_steps = 0
        self.reason = overlap_fallback_reason(trainer, pl_module)
        if self.reason is not None:
            rank_zero_warn(f"MuonBackwardOverlap: not attached: {self.reason}. Muon steps run after backward as usual.")
            return
        self.overlap = MuonOverlap(trainer.optimizers[0])
        groups = [g for g in trainer.optimizers[0].param_groups if g.get("algorithm") == "muon"]
        accumulation = (
            f"; accumulate_grad_batches={trainer.accumulate_grad_batches}: armed on the last "
            "micro-batch of each window only"
            if trainer.accumulate_grad_batches > 1 else ""
        )
        rank_zero_info(
            f"MuonBackwardOverlap: attached to {len(groups)} muon group(s), "
            f"{sum(len(g['params']) for g in groups)} matrices: orthogonalized during backward{accumulation}"
        )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss) -> None:
        if self.overlap is None:
            return
        try:  # Lightning's own decision whether this backward is followed by a step
            accumulate = trainer.fit_loop._should_accumulate()
        except AttributeError:  # pragma: no cover - private API moved: arming anyway is still exact
            accumulate = False
        if not accumulate:
            self.overlap.arm()
            self.armed_backwards += 1

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.overlap is not None:
            self.overlap.disarm()

    def _close(self) -> None:
        if self.overlap is not None:
            self.overlapped_steps, self.plain_steps = self.overlap.overlapped_steps, self.overlap.plain_steps
            self.overlap.close()
            self.overlap = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()
