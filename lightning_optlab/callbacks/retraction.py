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
  doubles a retraction and reproduces the uninterrupted run bit for bit.
* DDP: every rank holds identical weights and applies the same deterministic retraction (plain
  matmuls / norms, no randomness), so ranks stay identical without any communication. Sharded
  strategies (FSDP, DeepSpeed) are refused: a shard of a matrix is not a matrix.

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

import difflib
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..manifolds import (
    as_matrix,
    compute_dtype,
    polar_newton_schulz,
    StiefelRetractor,
    sphere_distance,
    sphere_retract,
    stiefel_distance,
    stiefel_retract_exact,
)
from ..manifolds.sphere import SPHERE_EPS
from ..optim.cuda_graph import check_cuda_graph_setting
from ..optim.matrix import DEFAULT_VIEW, MatrixView, group_views
from ..policy.roles import describe_parameters

CONSTRAINTS = ("sphere", "stiefel")
# Options each constraint accepts (in a policy rule's ``constraint_options`` or a mapping entry).
CONSTRAINT_OPTIONS = {
    "sphere": ("radius", "dim", "eps"),
    "stiefel": ("steps", "tol", "schedule", "precision"),
}
SCHEDULES = ("predict", "check", "fixed")
PRECISIONS = ("auto", "fp32", "mixed")
# tol="auto": the target distance of the step-count prediction, by weight dtype. Half-precision
# weights are rounded to 8 (bf16) / 11 (fp16) bits after the retraction, which alone leaves them
# ~3e-3 off the manifold, so their target is loose (and their Gram matrices may be bf16).
AUTO_TOL = {torch.float32: 5e-4, torch.float64: 5e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def auto_tol(dtype: torch.dtype) -> float:
    return AUTO_TOL.get(dtype, 5e-4)


@dataclass
class _Target:
    param: torch.Tensor
    name: str
    role: str
    constraint: str
    options: dict[str, Any]
    source: str
    owner: int | None = None  # index of the optimizer that updates it (None: no optimizer does)
    view: MatrixView = DEFAULT_VIEW


@dataclass
class _Job:
    """Parameters retracted together: one sphere parameter, or same-shaped Stiefel matrices."""

    constraint: str
    targets: list[_Target] = field(default_factory=list)
    steps: int = 5  # Stiefel options of the bucket (tol resolved from "auto")
    tol: float | None = None
    schedule: str = "fixed"
    precision: str = "auto"


def _close(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.4)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _check_constraint(name: Any, where: str) -> str:
    if name not in CONSTRAINTS:
        raise ValueError(
            f"ManifoldRetraction: {where}: unknown constraint {name!r}{_close(str(name), list(CONSTRAINTS))}; "
            f"use one of {', '.join(CONSTRAINTS)}"
        )
    return name


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
        self.constraints = self._check_mapping(constraints)
        self.retract_on_fit_start = bool(on_fit_start)
        self.defaults = self._resolve_options(
            "stiefel", {"steps": steps, "tol": tol, "schedule": schedule, "precision": precision},
            "ManifoldRetraction()", {},
        )
        self.fit_start = self._resolve_options(
            "stiefel", {"steps": fit_start_steps, "tol": fit_start_tol}, "fit_start options", {}
        )
        self.log = bool(log)
        check_cuda_graph_setting(cuda_graph, "ManifoldRetraction: ")
        self.cuda_graph = cuda_graph
        self.num_retractions = 0  # post-hook retractions in the current fit (diagnostic)
        #: iterations each Stiefel shape bucket ran in the latest retraction: {"768x2304": 1, ...}
        self.last_stiefel_steps: dict[str, int] = {}
        self.retracted_at_fit_start = False  # whether this fit started with a retraction
        self.targets: list[_Target] = []
        self._plans: dict[int, list[_Job]] = {}
        self._handles: list[Any] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._fit_start_done_in_checkpoint = False
        self._fallback_names: list[str] = []
        self._trainer: Trainer | None = None
        self._retractors: dict[tuple, StiefelRetractor] = {}

    # ----------------------------------------------------------------------- configuration
    @staticmethod
    def _check_mapping(constraints: Any) -> dict[str, tuple[str, dict[str, Any]]] | None:
        if constraints is None:
            return None
        if not isinstance(constraints, Mapping):
            raise ValueError(
                "ManifoldRetraction: constraints must be a mapping {name glob: 'sphere' | 'stiefel'}, "
                f"got {type(constraints).__name__}"
            )
        out = {}
        for glob, spec in constraints.items():
            where = f"glob {glob!r}"
            if isinstance(spec, str):
                out[str(glob)] = (_check_constraint(spec, where), {})
            elif isinstance(spec, Mapping) and "constraint" in spec:
                kind = _check_constraint(spec["constraint"], where)
                options = {k: v for k, v in spec.items() if k != "constraint"}
                unknown = [k for k in options if k not in CONSTRAINT_OPTIONS[kind]]
                if unknown:
                    raise ValueError(
                        f"ManifoldRetraction: {where}: unknown {kind} option(s) {unknown}; {kind} "
                        f"accepts {', '.join(CONSTRAINT_OPTIONS[kind])}"
                    )
                out[str(glob)] = (kind, options)
            else:
                raise ValueError(
                    f"ManifoldRetraction: {where}: expected 'sphere', 'stiefel' or a dict like "
                    f"{{'constraint': 'sphere', 'radius': 1.0}}, got {spec!r}"
                )
        return out

    def _resolve_options(
        self, kind: str, given: Mapping[str, Any], where: str, defaults: Mapping[str, Any]
    ) -> dict[str, Any]:
        unknown = [k for k in given if k not in CONSTRAINT_OPTIONS[kind]]
        if unknown:
            raise ValueError(
                f"ManifoldRetraction: {where}: unknown {kind} option(s) {unknown}"
                f"{_close(str(unknown[0]), list(CONSTRAINT_OPTIONS[kind]))}; {kind} accepts "
                f"{', '.join(CONSTRAINT_OPTIONS[kind])}"
            )
        opts = {**defaults, **{k: v for k, v in given.items()}}
        if kind == "stiefel":
            steps, tol = opts.get("steps"), opts.get("tol")
            opts.setdefault("schedule", "check" if tol is not None else "fixed")
            opts.setdefault("precision", "auto")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise ValueError(f"ManifoldRetraction: {where}: stiefel steps must be an int >= 0, got {steps!r}")
            if tol is not None and tol != "auto" and not (isinstance(tol, (int, float)) and tol > 0):
                raise ValueError(
                    f"ManifoldRetraction: {where}: stiefel tol must be > 0, 'auto' or None, got {tol!r}"
                )
            if opts["schedule"] not in SCHEDULES:
                raise ValueError(
                    f"ManifoldRetraction: {where}: stiefel schedule must be one of {', '.join(SCHEDULES)}, "
                    f"got {opts['schedule']!r}{_close(str(opts['schedule']), list(SCHEDULES))}"
                )
            if opts["precision"] not in PRECISIONS:
                raise ValueError(
                    f"ManifoldRetraction: {where}: stiefel precision must be one of {', '.join(PRECISIONS)}, "
                    f"got {opts['precision']!r}{_close(str(opts['precision']), list(PRECISIONS))}"
                )
            if tol is None and opts["schedule"] != "fixed":
                opts["schedule"] = "fixed"  # no target: exactly `steps` iterations
        else:
            radius = opts.setdefault("radius", 1.0)
            opts.setdefault("eps", SPHERE_EPS)
            opts.setdefault("dim", None)
            if not isinstance(radius, (int, float)) or isinstance(radius, bool) or not radius > 0:
                raise ValueError(f"ManifoldRetraction: {where}: sphere radius must be > 0, got {radius!r}")
        return opts

    @property
    def state_key(self) -> str:
        return self._generate_state_key(constraints=self.constraints)

    def state_dict(self) -> dict[str, Any]:
        return {"fit_start_retracted": self.retract_on_fit_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fit_start_done_in_checkpoint = bool(state_dict.get("fit_start_retracted", False))

    # ---------------------------------------------------------------------- discovery
    def _collect(self, trainer: Trainer, pl_module: LightningModule) -> list[_Target]:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        try:
            infos = {id(i.param): i for i in describe_parameters(pl_module)}
        except ValueError:
            infos = {}
        roles = {k: i.role for k, i in infos.items()}
        inferred_views = {k: i.view.unsplit() for k, i in infos.items()}
        owners: dict[int, int] = {}
        for oi, opt in enumerate(trainer.optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    owners.setdefault(id(p), oi)

        found: dict[int, _Target] = {}
        for oi, opt in enumerate(trainer.optimizers):
            for gi, group in enumerate(opt.param_groups):
                kind = group.get("constraint")
                if not kind:
                    continue
                label = group.get("name") or f"param group {gi}"
                source = f"optimizer {oi} param group {label!r}"
                _check_constraint(kind, source)
                opts = self._resolve_options(
                    kind, group.get("constraint_options") or {}, source,
                    self.defaults if kind == "stiefel" else {},
                )
                pnames, proles = group.get("param_names"), group.get("roles")
                views = group_views(group, group["params"], inferred_views)
                for j, p in enumerate(group["params"]):
                    name = pnames[j] if pnames else names.get(id(p), f"{label}[{j}]")
                    role = proles[j] if proles else roles.get(id(p), "all")
                    found.setdefault(id(p), _Target(p, name, role, kind, opts, source, oi, views[j]))

        if self.constraints is not None:
            named = list(pl_module.named_parameters())
            claimed: set[int] = set()
            for glob, (kind, given) in self.constraints.items():
                hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, glob)]
                if not hits:
                    all_names = [n for n, _ in named]
                    close = difflib.get_close_matches(glob, all_names, n=5, cutoff=0.3)
                    hint = f"close names: {', '.join(close)}" if close else (
                        f"parameter names look like: {', '.join(all_names[:6])}"
                    )
                    raise ValueError(
                        f"ManifoldRetraction: glob {glob!r} matches no parameter of "
                        f"{type(pl_module).__name__}; {hint}. Globs match the full names of "
                        "named_parameters() (e.g. 'encoder.*.weight')."
                    )
                source = f"glob {glob!r}"
                opts = self._resolve_options(kind, given, source, self.defaults if kind == "stiefel" else {})
                for n, p in hits:
                    if id(p) in claimed:
                        continue  # the first glob that matches a parameter wins
                    claimed.add(id(p))
                    target = _Target(p, n, roles.get(id(p), "all"), kind, opts, source, owners.get(id(p)),
                                     inferred_views.get(id(p), DEFAULT_VIEW))
                    other = found.get(id(p))
                    if other is not None and (other.constraint, other.options) != (kind, opts):
                        raise ValueError(
                            f"ManifoldRetraction: parameter {n!r} gets constraint {other.constraint!r} "
                            f"{other.options} from {other.source} but {kind!r} {opts} from {source}; "
                            "declare it in one place"
                        )
                    found.setdefault(id(p), target)

        targets = []
        for t in found.values():
            self._check_shape(t)
            targets.extend(self._stiefel_matrices(t) if t.constraint == "stiefel" else [t])
        return targets

    @staticmethod
    def _stiefel_matrices(t: _Target) -> list[_Target]:
        """A Stiefel target per matrix of its view, each holding a 2-D view of the parameter that
        the retraction writes through (one per block of a split packed projection)."""
        p, view = t.param, t.view
        if view.blocks == 1 and (view.layout == "out_in" or (view.layout == "in_out" and p.ndim == 2)):
            # (out, in*k) is how the retraction reads a parameter; and polar(W^T) = polar(W)^T,
            # so an HF Conv1D weight is retracted as stored, in place
            return [t]
        m = view.to_matrix(p)
        if m.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
            raise ValueError(
                f"ManifoldRetraction: {t.source} puts constraint 'stiefel' on {t.name!r} of shape "
                f"{list(p.shape)}, whose matrix view ({view.code}) is not a view of its storage "
                "(a ConvTranspose kernel): it cannot be retracted in place. Narrow the rule's match."
            )
        mats = [m] if view.blocks == 1 else list(m.unbind(0))
        names = [t.name] if view.blocks == 1 else [f"{t.name}[{k}]" for k in range(view.blocks)]
        # each target now holds its (out, in) matrix itself, so the default view reads it
        return [_Target(x, n, t.role, t.constraint, t.options, t.source, t.owner) for x, n in zip(mats, names)]

    @staticmethod
    def _check_shape(t: _Target) -> None:
        shape = list(t.param.shape)
        if t.constraint == "stiefel":
            if t.param.ndim < 2 or not t.view.is_matrix:
                raise ValueError(
                    f"ManifoldRetraction: {t.source} puts constraint 'stiefel' on {t.name!r} of shape "
                    f"{shape}: a vector cannot have orthonormal columns. Use 'sphere' for vectors, or "
                    "narrow the rule/glob to matrices (policy match: {ndim: '>=2'})."
                )
        else:
            if t.param.ndim < 1:
                raise ValueError(
                    f"ManifoldRetraction: {t.source} puts constraint 'sphere' on {t.name!r}, a scalar "
                    "(shape []): it has no vector to normalise; narrow the rule/glob."
                )
            dim = t.options.get("dim")
            if dim is None:
                dim = t.view.row_dims(t.param.ndim)
            dims = dim if isinstance(dim, (tuple, list)) else (dim,)
            for d in dims:
                if not isinstance(d, int) or not -t.param.ndim <= d < t.param.ndim:
                    raise ValueError(
                        f"ManifoldRetraction: {t.source}: sphere dim {dim!r} does not fit {t.name!r} "
                        f"of shape {shape}"
                    )
            t.options = {**t.options, "dim": tuple(dims) if len(dims) > 1 else dims[0]}
        if not t.param.is_floating_point():
            raise ValueError(f"ManifoldRetraction: {t.name!r} has dtype {t.param.dtype}, not floating point")

    @staticmethod
    def _plan(targets: list[_Target]) -> list[_Job]:
        jobs: list[_Job] = []
        batches: dict[tuple, _Job] = {}
        for t in targets:
            if t.constraint == "sphere":
                jobs.append(_Job("sphere", [t]))
                continue
            m = as_matrix(t.param, t.name)
            o = t.options
            tol = auto_tol(t.param.dtype) if o["tol"] == "auto" else o["tol"]
            key = (tuple(m.shape), t.param.device, compute_dtype(t.param.dtype), o["steps"], tol,
                   o["schedule"], o["precision"])
            if key not in batches:
                batches[key] = _Job("stiefel", steps=o["steps"], tol=tol, schedule=o["schedule"],
                                    precision=o["precision"])
                jobs.append(batches[key])
            batches[key].targets.append(t)
        return jobs

    # ---------------------------------------------------------------------- retraction
    @staticmethod
    def _merge(metrics: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        value = value.detach().float().reshape(())
        metrics[key] = value if key not in metrics else torch.maximum(metrics[key], value.to(metrics[key].device))

    @torch.no_grad()
    def _retract(self, plan: list[_Job], measure: bool, steps: int | None = None, tol: float | None = None) -> dict[str, torch.Tensor]:
        """Retract every job's parameters in place; with ``measure``, return before-distances."""
        metrics: dict[str, torch.Tensor] = {}
        predicted: list[_Job] = []
        for job in plan:
            if job.constraint == "sphere":
                (t,) = job.targets
                o = t.options
                if measure:
                    self._merge(metrics, f"manifold/sphere_distance_before/{t.role}",
                                sphere_distance(t.param, o["radius"], o["dim"]))
                t.param.copy_(sphere_retract(t.param, o["radius"], o["dim"], o["eps"]))
                continue
            if steps is None and job.schedule == "predict":
                predicted.append(job)  # all predict buckets together: one host sync
                continue
            dtype = compute_dtype(job.targets[0].param.dtype)
            stack = torch.stack([as_matrix(t.param).to(dtype) for t in job.targets])
            if steps is None:
                result = polar_newton_schulz(stack, steps=job.steps, tol=job.tol, schedule=job.schedule,
                                             precision=job.precision)
            else:  # fit start: full-precision iteration with a check per iteration
                result = polar_newton_schulz(stack, steps=steps, tol=tol, schedule="check", precision="fp32")
            polar = result.polar
            if steps is not None:  # fit start: exact projection where the iteration fell short
                short = stiefel_distance(polar) > tol
                if bool(short.any()):
                    polar = polar.clone()
                    polar[short] = stiefel_retract_exact(stack[short])
                    self._fallback_names.extend(t.name for t, s in zip(job.targets, short.tolist()) if s)
            self._write_back(job, polar, result, measure, metrics)
        if predicted:
            # all predict buckets of one (steps, tol, precision, device): one StiefelRetractor,
            # built once per fit (its buffers and CUDA graph reused every step), one host sync
            by_options: dict[tuple, list[_Job]] = {}
            for job in predicted:
                key = (job.steps, job.tol, job.precision, job.targets[0].param.device)
                by_options.setdefault(key, []).append(job)
            for (n, tol_, precision, _), jobs in by_options.items():
                cache_key = (n, tol_, precision, tuple(id(t.param) for job in jobs for t in job.targets))
                retractor = self._retractors.get(cache_key)
                if retractor is None:
                    retractor = self._retractors[cache_key] = StiefelRetractor(
                        [[t.param for t in job.targets] for job in jobs], steps=n, tol=tol_,
                        precision=precision, cuda_graph=self.cuda_graph)
                for job, result in zip(jobs, retractor()):  # in place: nothing to copy back
                    self._log_bucket(job, result.steps, result.distance_before, measure, metrics)
        return metrics

    def _write_back(self, job: _Job, polar: torch.Tensor, result, measure: bool, metrics: dict) -> None:
        params = [t.param for t in job.targets]
        torch._foreach_copy_(params, [polar[j].reshape(p.shape) for j, p in enumerate(params)])
        self._log_bucket(job, result.steps, result.distance_before, measure, metrics)

    def _log_bucket(self, job: _Job, steps_run: int, distance_before: torch.Tensor, measure: bool,
                    metrics: dict) -> None:
        shape = "x".join(str(d) for d in as_matrix(job.targets[0].param).shape)
        self.last_stiefel_steps[shape] = steps_run
        if not measure:
            return
        for j, t in enumerate(job.targets):
            self._merge(metrics, f"manifold/stiefel_distance_before/{t.role}", distance_before[j])
        steps = torch.tensor(float(steps_run))
        self._merge(metrics, "manifold/stiefel_steps", steps)
        self._merge(metrics, f"manifold/stiefel_steps/{shape}", steps)

    @staticmethod
    @torch.no_grad()
    def _distances_after(plan: list[_Job]) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        for job in plan:
            for t in job.targets:
                if job.constraint == "sphere":
                    d = sphere_distance(t.param, t.options["radius"], t.options["dim"])
                else:
                    d = stiefel_distance(as_matrix(t.param))
                ManifoldRetraction._merge(metrics, f"manifold/{job.constraint}_distance_after/{t.role}", d)
        return metrics

    def _should_log(self, trainer: Trainer) -> bool:
        if not self.log or not trainer.is_global_zero or trainer.log_every_n_steps == 0:
            return False
        try:  # Lightning's own decision, so our values reach the logger on the steps it writes
            return bool(trainer._logger_connector.should_update_logs)
        except Exception:  # pragma: no cover - private API moved
            return (trainer.global_step + 1) % trainer.log_every_n_steps == 0

    def _after_step(self, owner: int) -> None:
        plan = self._plans.get(owner)
        if not plan:
            return
        trainer = self._trainer
        measure = trainer is not None and self._should_log(trainer)
        cuda = any(t.param.is_cuda for job in plan for t in job.targets)
        if measure and cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = self._retract(plan, measure)
        self.num_retractions += 1
        if not measure:
            return
        if cuda:
            torch.cuda.synchronize()
        elapsed = torch.tensor((time.perf_counter() - start) * 1e3)
        metrics.update(self._distances_after(plan))
        for key, value in metrics.items():
            self._merge(self._pending, key, value)
        # several steps in one batch (manual optimization): their times add up
        self._pending["manifold/time_ms"] = self._pending.get("manifold/time_ms", 0.0) + elapsed

    # ---------------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._trainer = trainer
        self.num_retractions = 0
        self.retracted_at_fit_start = False
        self._pending = {}
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise RuntimeError(
                f"ManifoldRetraction does not support {strategy}: it needs whole parameters, and a "
                "sharded strategy holds slices of each matrix. Use DDP (or a single device)."
            )
        self.targets = self._collect(trainer, pl_module)
        if not self.targets:
            rank_zero_warn(
                "ManifoldRetraction: no parameter has a constraint (no optimizer param group has "
                "'constraint' and no `constraints` mapping was given); it does nothing."
            )
            return
        for oi, opt in enumerate(trainer.optimizers):
            plan = self._plan([t for t in self.targets if t.owner == oi])
            if not plan:
                continue
            if not hasattr(opt, "register_step_post_hook"):
                raise TypeError(
                    f"ManifoldRetraction: optimizer {oi} ({type(opt).__name__}) is not a "
                    "torch.optim.Optimizer with register_step_post_hook"
                )
            self._plans[oi] = plan
            self._handles.append(opt.register_step_post_hook(lambda o, a, k, oi=oi: self._after_step(oi)))

        if self.retract_on_fit_start and not self._fit_start_done_in_checkpoint:
            self._fallback_names = []
            plan = self._plan(self.targets)
            before = self._retract(plan, measure=True, steps=self.fit_start["steps"], tol=self.fit_start["tol"])
            after = self._distances_after(plan)
            summary = ", ".join(f"{k.split('/', 1)[1]}={v.item():.3g}" for k, v in sorted({**before, **after}.items()))
            fallback = (
                f"; exact SVD projection for {len(self._fallback_names)} matrices the iteration did "
                f"not bring within {self.fit_start['tol']:g}: {', '.join(self._fallback_names[:8])}"
                if self._fallback_names else ""
            )
            self.retracted_at_fit_start = True
            rank_zero_info(
                f"ManifoldRetraction: retracted {len(self.targets)} parameter(s) onto their manifolds "
                f"at fit start ({summary}){fallback}"
            )
        self._fit_start_done_in_checkpoint = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            pl_module.log_dict(pending, on_step=True, on_epoch=False, rank_zero_only=True)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._plans = {}
        self._retractors = {}  # their buffers and CUDA graphs belong to this fit

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
