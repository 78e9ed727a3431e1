"""ManifoldRetraction: put constrained parameters back on their manifold after every optimizer step.

Where the constraints come from (one source of truth): the ``constraint`` and
``constraint_options`` of each param group of the trainer's optimizer(s), as
:func:`lightning_optlab.policy.build_param_groups` writes them (with ``param_names`` and ``roles``
for names and log keys). Models that do not use a policy pass their own mapping
``{"name glob": "sphere" | "stiefel" | {"constraint": ..., **options}}``; both sources may be
combined as long as they agree on every parameter they share.

When it runs: right after each *real* optimizer step, through a step post-hook registered on
each optimizer (``torch.optim.Optimizer.register_step_post_hook``) at fit start and removed at
fit end. So it is tied to ``optimizer.step()`` itself, not to batches:

* gradient accumulation: Lightning calls ``step()`` once per accumulation window -> one retraction;
* manual optimization: every ``opt.step()`` the user makes is followed by its retraction;
* AMP (fp16 + GradScaler): when the scaler finds inf/NaN gradients it skips ``optimizer.step()``,
  so the post-hook does not run either -- the weights did not move, nothing to retract;
* checkpoint resume: checkpoints are written after the step's retraction, so restored weights are
  on the manifold; the fit-start retraction is skipped when resuming from a checkpoint that this
  callback was part of (its state says it already ran), so a resumed run neither skips nor
  doubles a retraction and reproduces the uninterrupted run bit for bit. Strategies that restore
  after setup (``ModelParallelStrategy``) load a checkpoint after ``on_fit_start``; under them the
  fit-start retraction runs in ``on_train_start`` (after the sanity check).
* a step at lr 0 in every group moves no weight, so nothing is retracted: resuming a sharded
  checkpoint, ``torch.distributed.checkpoint`` initializes the optimizer's state with such a step
  (zero gradients, lr 0), and retracting there would shift the weights by rounding.
* DDP: every rank holds identical weights and applies the same deterministic retraction (plain
  matmuls / norms, no randomness), so ranks stay identical without any communication.
  ``ModelParallelStrategy`` (FSDP2): each Stiefel matrix is retracted whole on one owner rank
  (the step count agreed over the ranks), a sphere on each rank's rows where they hold whole
  rows, otherwise gathered whole on every rank; each rank keeps its shards. FSDP1 and DeepSpeed are refused: their flat buffers hold no matrix.

Logging (rank zero, at the trainer's ``log_every_n_steps`` cadence, through ``LightningModule.log``
in ``on_train_batch_end``): ``manifold/<constraint>_distance_before/<role>`` (how far the step
left the manifold: max over that role's parameters), ``manifold/<constraint>_distance_after/<role>``,
``manifold/stiefel_steps`` (Newton-Schulz iterations run: the largest count of any shape bucket),
``manifold/stiefel_steps/<m>x<n>`` (the count each shape bucket ran) and ``manifold/time_ms``
(the retraction's own wall time; CUDA is synchronised for it only on these logging steps).

Step count (``schedule="predict"``, the default). A weight one optimizer step off the manifold
is close to it, and the iteration converges there at third order, so one or two iterations
usually suffice -- but how many depends on how far the step went. The first Gram matrix of
each shape bucket (computed anyway) gives every matrix's distance and two spectral moments;
ONE host sync per retraction reads them for all buckets together; each bucket then runs the
smallest count whose proven bound reaches ``tol`` (see
:func:`~lightning_optlab.manifolds.stiefel.polar_newton_schulz_buckets`; ``steps`` is the
maximum; a bucket too far off for the bound iterates with a check per iteration instead).
The work runs in place on the parameters through one
:class:`~lightning_optlab.manifolds.StiefelRetractor` per fit (buffers built once): the first
iteration is computed before the sync (speculatively: it is almost always the whole work, and
is kept only where the bound proves it reaches ``tol``, undone where a bucket needs the check
fallback, continued where more are needed), so the logged count is the count applied -- at
least 1, also for a bucket that was already within ``tol`` -- and on CUDA everything before the
sync is one replayed CUDA graph (``cuda_graph="auto"``). Cost per step: one pass to split each
weight into bf16 H + L, two bf16 Gram products and one bf16 update product per matrix (plus
k x k products), one graph launch and one host sync; one Muon step off the manifold usually
needs one iteration per bucket (its cost: ``docs/benchmarks.md``, bench_ops' retraction rows). With
``precision="auto"`` the matmuls of float32 weights on CUDA are bf16 with float32 accumulation,
the Gram matrices that set the accuracy are formed to float32 accuracy (split bf16), so the
float32 guarantee holds; ``tol="auto"`` is 5e-4 for float32/64 weights and 1e-2 for bf16/fp16
weights (whose own rounding leaves them ~3e-3 off). ``schedule="fixed"`` runs exactly ``steps``
iterations with no sync at all; ``"check"`` syncs once per iteration. Distances are
:func:`~lightning_optlab.manifolds.stiefel_distance` and
:func:`~lightning_optlab.manifolds.sphere_distance`.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..manifolds.plan import (
    RetractionPlan,
    Target,
    check_constraint_mapping,
    find_targets,
    merge_max,
    plan_retractions,
    resolve_options,
)
from ..optim.cuda_graph import check_cuda_graph_setting
from ..policy.roles import describe_parameters


class ManifoldRetraction(Callback):
    """Retract constrained parameters onto their manifold right after every optimizer step.

    Args:
        constraints: optional mapping ``{name glob: constraint}`` for models without a policy;
            a constraint is ``"sphere"``, ``"stiefel"`` or a dict ``{"constraint": "sphere",
            "radius": 2.0}``. The first glob that matches a parameter wins. Without it, the
            constraints of the optimizers' param groups are used (the policy's).
        on_fit_start: retract once at fit start so training starts on the manifold (skipped when
            resuming from a checkpoint of a run that already did).
        steps: Newton-Schulz iterations per Stiefel retraction: the maximum for the ``predict``
            and ``check`` schedules, the exact count for ``fixed``.
        tol: target Stiefel distance after each retraction; ``"auto"`` (default) = 5e-4 for
            float32/64 weights, 1e-2 for bf16/fp16 weights; ``None`` = ``schedule="fixed"``.
        schedule: ``"predict"`` (default; one host sync per retraction, count chosen from the
            measured distance), ``"check"`` (one sync per iteration) or ``"fixed"`` (no sync,
            exactly ``steps``). See "Step count" in the module docstring.
        precision: ``"auto"`` (bf16 matmuls with float32 accumulation for float32 weights on
            CUDA, full precision otherwise), ``"fp32"`` or ``"mixed"``.
        fit_start_steps, fit_start_tol: the fit-start retraction iterates up to
            ``fit_start_steps`` times until the distance is ``<= fit_start_tol``; matrices that do
            not get there (ill-conditioned or rank-deficient initialisations) are projected
            exactly by SVD instead.
        log: log the violation before/after and the retraction time at the logging cadence.
        cuda_graph: ``"auto"`` (default): the ``predict`` retraction of CUDA weights replays a
            captured CUDA graph (rebuilt when the parameters' storage changes, eager where a
            capture fails); ``False``: always eager; ``True``: raise where a graph cannot be used.

    Per-parameter options (policy ``constraint_options`` or mapping dicts): sphere ``radius``
    (1.0), ``dim`` (rows: -1 for vectors/matrices, all but the first dim for conv kernels),
    ``eps``; stiefel ``steps``, ``tol``.
    """

    def __init__(
        self,
        constraints: Mapping[str, str | Mapping[str, Any]] | None = None,
        on_fit_start: bool = True,
        steps: int = 5,
        tol: float | str | None = "auto",
        schedule: str = "predict",
        precision: str = "auto",
        fit_start_steps: int = 30,
        fit_start_tol: float = 1e-5,
        log: bool = True,
        cuda_graph: bool | str = "auto",
    ) -> None:
        self.constraints = check_constraint_mapping(constraints)
        self.retract_on_fit_start = bool(on_fit_start)
        self.defaults = resolve_options(
            "stiefel", {"steps": steps, "tol": tol, "schedule": schedule, "precision": precision},
            "ManifoldRetraction()", {},
        )
        self.fit_start = resolve_options(
            "stiefel", {"steps": fit_start_steps, "tol": fit_start_tol}, "fit_start options", {}
        )
        self.log = bool(log)
        check_cuda_graph_setting(cuda_graph, "ManifoldRetraction: ")
        self.cuda_graph = cuda_graph
        self.num_retractions = 0  # post-hook retractions in the current fit (diagnostic)
        #: iterations each Stiefel shape bucket ran in the latest retraction: {"768x2304": 1, ...}
        self.last_stiefel_steps: dict[str, int] = {}
        self.retracted_at_fit_start = False  # whether this fit started with a retraction
        self.targets: list[Target] = []
        self._plans: dict[int, RetractionPlan] = {}
        self._handles: list[Any] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._fit_start_done_in_checkpoint = False
        self._fit_start_waits = False
        self._trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(constraints=self.constraints)

    def state_dict(self) -> dict[str, Any]:
        return {"fit_start_retracted": self.retract_on_fit_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fit_start_done_in_checkpoint = bool(state_dict.get("fit_start_retracted", False))

    def _should_log(self, trainer: Trainer, plan: RetractionPlan) -> bool:
        # a sharded plan measures through collectives: every rank measures, rank zero logs
        if not self.log or not (trainer.is_global_zero or plan.sharded) or trainer.log_every_n_steps == 0:
            return False
        try:  # Lightning's own decision, so our values reach the logger on the steps it writes
            return bool(trainer._logger_connector.should_update_logs)
        except Exception:  # pragma: no cover - private API moved
            return (trainer.global_step + 1) % trainer.log_every_n_steps == 0

    def _after_step(self, owner: int, optimizer: torch.optim.Optimizer) -> None:
        plan = self._plans.get(owner)
        if not plan or all(float(g["lr"]) == 0.0 for g in optimizer.param_groups):
            return
        trainer = self._trainer
        measure = trainer is not None and self._should_log(trainer, plan)
        cuda = any(p.is_cuda for p in plan.params)
        if measure and cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = plan.retract(measure)
        self.last_stiefel_steps = dict(plan.last_stiefel_steps)
        self.num_retractions += 1
        if not measure:
            return
        if cuda:
            torch.cuda.synchronize()
        elapsed = torch.tensor((time.perf_counter() - start) * 1e3)
        metrics.update(plan.distances_after())
        for key, value in metrics.items():
            merge_max(self._pending, key, value)
        # several steps in one batch (manual optimization): their times add up
        self._pending["manifold/time_ms"] = self._pending.get("manifold/time_ms", 0.0) + elapsed

    # ---------------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._trainer = trainer
        self.num_retractions = 0
        self.retracted_at_fit_start = False
        self._pending = {}
        self._fit_start_waits = False
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in ("FSDP", "DeepSpeed")):
            # FSDP2 (ModelParallelStrategy) keeps each parameter a DTensor of its own shape, which
            # the plan gathers; FSDP1 and ZeRO flatten parameters into buffers no rule can read
            raise RuntimeError(
                f"ManifoldRetraction does not support {strategy}: it flattens parameters into one "
                "buffer, so no matrix keeps its shape. Use ModelParallelStrategy with fully_shard "
                "(FSDP2) in configure_model, or DDP."
            )
        try:
            infos = describe_parameters(pl_module)
        except ValueError:
            infos = []
        self.targets = find_targets(
            pl_module, trainer.optimizers, self.constraints, self.defaults,
            roles={id(i.param): i.role for i in infos},
            inferred_views={id(i.param): i.view.unsplit() for i in infos},
        )
        if not self.targets:
            rank_zero_warn(
                "ManifoldRetraction: no parameter has a constraint (no optimizer param group has "
                "'constraint' and no `constraints` mapping was given); it does nothing."
            )
            return
        for oi, opt in enumerate(trainer.optimizers):
            plan = plan_retractions([t for t in self.targets if t.owner == oi], self.cuda_graph)
            if not plan:
                continue
            if not hasattr(opt, "register_step_post_hook"):
                raise TypeError(
                    f"ManifoldRetraction: optimizer {oi} ({type(opt).__name__}) is not a "
                    "torch.optim.Optimizer with register_step_post_hook"
                )
            self._plans[oi] = plan
            self._handles.append(opt.register_step_post_hook(lambda o, a, k, oi=oi: self._after_step(oi, o)))

        # a strategy that restores after setup loads a checkpoint's weights and this callback's
        # state (did the checkpoint's run retract at its start?) after this hook: wait for them
        self._fit_start_waits = bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))
        if not self._fit_start_waits:
            self._retract_at_fit_start()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit_start_waits:
            self._fit_start_waits = False
            self._retract_at_fit_start()

    def _retract_at_fit_start(self) -> None:
        if self.targets and self.retract_on_fit_start and not self._fit_start_done_in_checkpoint:
            plan = plan_retractions(self.targets, self.cuda_graph)
            before = plan.retract_to(self.fit_start["steps"], self.fit_start["tol"])
            after = plan.distances_after()
            summary = ", ".join(f"{k.split('/', 1)[1]}={v.item():.3g}" for k, v in sorted({**before, **after}.items()))
            fallback = (
                f"; exact SVD projection for {len(plan.fallback_names)} matrices the iteration did "
                f"not bring within {self.fit_start['tol']:g}: {', '.join(plan.fallback_names[:8])}"
                if plan.fallback_names else ""
            )
            self.retracted_at_fit_start = True
            rank_zero_info(
                f"ManifoldRetraction: retracted {len(self.targets)} parameter(s) onto their manifolds "
                f"at fit start ({summary}){fallback}"
            )
        self._fit_start_done_in_checkpoint = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self._pending and not trainer.is_global_zero:
            self._pending = {}  # measured with the other ranks; rank zero logs
        if self._pending:
            pending, self._pending = self._pending, {}
            pl_module.log_dict(pending, on_step=True, on_epoch=False, rank_zero_only=True)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for plan in self._plans.values():
            plan.release()  # their buffers and CUDA graphs belong to this fit
        self._plans = {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
