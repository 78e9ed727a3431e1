"""Which parameters to retract onto which manifold, bucketed, and the retraction of a plan.

Plain torch: :class:`~lightning_optlab.callbacks.ManifoldRetraction` is the Lightning glue that
calls :func:`find_targets` at fit start, builds one :class:`RetractionPlan` per optimizer and
runs it in the optimizer's step post-hook.

Constraints come from the ``constraint`` / ``constraint_options`` of each param group (as the
policy writes them, with ``param_names``, ``roles`` and ``matrix_views``) and, for models without
a policy, from a mapping ``{name glob: "sphere" | "stiefel" | {"constraint": ..., **options}}``;
both may be combined where they agree. A Stiefel parameter is retracted through its matrix view
(one matrix per block of a split packed projection); same-shaped matrices with the same options
share one bucket, retracted in one batched call.

Example (plain torch, a policy-built optimizer)::

    targets = find_targets(model, [optimizer], None, {"steps": 5, "tol": "auto", "schedule": "predict"})
    plan = plan_retractions(targets)
    optimizer.step()
    plan.retract(measure=False)   # every constrained parameter back on its manifold
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..optim.matrix import DEFAULT_VIEW, MatrixView, group_views
from ..optim.sharded import (assign_owners, gather_to_owners, is_dtensor, local_part, row_sharded_group,
                             scatter_from_owners)
from .sphere import SPHERE_EPS, compute_dtype, sphere_distance, sphere_retract
from .stiefel import (
    PRECISIONS,
    SCHEDULES,
    as_matrix,
    polar_newton_schulz,
    polar_newton_schulz_buckets,
    release_retractors,
    retractor_for,
    stiefel_distance,
    stiefel_retract_exact,
)

CONSTRAINTS = ("sphere", "stiefel")
# The smallest parameter rank each constraint applies to (conv kernels read as matrices).
CONSTRAINT_MIN_NDIM = {"sphere": 1, "stiefel": 2}
# Options each constraint accepts (in a policy rule's ``constraint_options`` or a mapping entry).
CONSTRAINT_OPTIONS = {
    "sphere": ("radius", "dim", "eps"),
    "stiefel": ("steps", "tol", "schedule", "precision"),
}
# tol="auto": the target distance of the step-count prediction, by weight dtype. Half-precision
# weights are rounded to 8 (bf16) / 11 (fp16) bits after the retraction, which alone leaves them
# ~3e-3 off the manifold, so their target is loose (and their Gram matrices may be bf16).
AUTO_TOL = {torch.float32: 5e-4, torch.float64: 5e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def auto_tol(dtype: torch.dtype) -> float:
    return AUTO_TOL.get(dtype, 5e-4)


@dataclass
class Target:
    """A parameter (or a 2-D view of one) under a constraint."""

    param: torch.Tensor
    name: str
    role: str
    constraint: str
    options: dict[str, Any]
    source: str
    owner: int | None = None  # index of the optimizer that updates it (None: no optimizer does)
    view: MatrixView = DEFAULT_VIEW


@dataclass
class Job:
    """Parameters retracted together: one sphere parameter, or same-shaped Stiefel matrices."""

    constraint: str
    targets: list[Target] = field(default_factory=list)
    steps: int = 5  # Stiefel options of the bucket (tol resolved from "auto")
    tol: float | None = None
    schedule: str = "fixed"
    precision: str = "auto"
    sharded: bool = False  # FSDP2 DTensor parameters: retracted as gathered whole tensors


def _close(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.4)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def check_constraint(name: Any, where: str) -> str:
    if name not in CONSTRAINTS:
        raise ValueError(
            f"ManifoldRetraction: {where}: unknown constraint {name!r}{_close(str(name), CONSTRAINTS)}; "
            f"use one of {', '.join(CONSTRAINTS)}"
        )
    return name


def check_constraint_mapping(constraints: Any) -> dict[str, tuple[str, dict[str, Any]]] | None:
    """``{glob: (constraint, options)}`` from the user's mapping, each entry checked."""
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
            out[str(glob)] = (check_constraint(spec, where), {})
        elif isinstance(spec, Mapping) and "constraint" in spec:
            kind = check_constraint(spec["constraint"], where)
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


def resolve_options(kind: str, given: Mapping[str, Any], where: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A constraint's options with the defaults filled in, each checked (naming ``where``)."""
    unknown = [k for k in given if k not in CONSTRAINT_OPTIONS[kind]]
    if unknown:
        raise ValueError(
            f"ManifoldRetraction: {where}: unknown {kind} option(s) {unknown}"
            f"{_close(str(unknown[0]), CONSTRAINT_OPTIONS[kind])}; {kind} accepts "
            f"{', '.join(CONSTRAINT_OPTIONS[kind])}"
        )
    opts = {**defaults, **given}
    if kind == "stiefel":
        steps, tol = opts.get("steps"), opts.get("tol")
        opts.setdefault("schedule", "check" if tol is not None else "fixed")
        opts.setdefault("precision", "auto")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"ManifoldRetraction: {where}: stiefel steps must be an int >= 0, got {steps!r}")
        if tol is not None and tol != "auto" and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"ManifoldRetraction: {where}: stiefel tol must be > 0, 'auto' or None, got {tol!r}")
        for key, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if opts[key] not in allowed:
                raise ValueError(
                    f"ManifoldRetraction: {where}: stiefel {key} must be one of {', '.join(allowed)}, "
                    f"got {opts[key]!r}{_close(str(opts[key]), allowed)}"
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


def find_targets(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    constraints: Mapping[str, tuple[str, dict[str, Any]]] | None,
    stiefel_defaults: Mapping[str, Any],
    roles: Mapping[int, str] | None = None,
    inferred_views: Mapping[int, MatrixView] | None = None,
) -> list[Target]:
    """Every constrained parameter of ``model``: from the optimizers' param groups, then from the
    checked ``constraints`` mapping (the first glob that matches a parameter wins; a parameter
    that both sources constrain differently is refused). Stiefel parameters come back as one
    target per matrix of their view. ``roles`` / ``inferred_views`` (by ``id(param)``) stand in
    where a group does not carry ``roles`` / ``matrix_views`` (the callback passes the policy's
    inference)."""
    names = {id(p): n for n, p in model.named_parameters()}
    roles = roles or {}
    inferred_views = inferred_views or {}
    owners: dict[int, int] = {}
    for oi, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                owners.setdefault(id(p), oi)

    def defaults(kind: str) -> Mapping[str, Any]:
        return stiefel_defaults if kind == "stiefel" else {}

    found: dict[int, Target] = {}
    for oi, opt in enumerate(optimizers):
        for gi, group in enumerate(opt.param_groups):
            kind = group.get("constraint")
            if not kind:
                continue
            label = group.get("name") or f"param group {gi}"
            source = f"optimizer {oi} param group {label!r}"
            check_constraint(kind, source)
            opts = resolve_options(kind, group.get("constraint_options") or {}, source, defaults(kind))
            pnames, proles = group.get("param_names"), group.get("roles")
            views = group_views(group, group["params"], inferred_views)
            for j, p in enumerate(group["params"]):
                name = pnames[j] if pnames else names.get(id(p), f"{label}[{j}]")
                role = proles[j] if proles else roles.get(id(p), "all")
                found.setdefault(id(p), Target(p, name, role, kind, opts, source, oi, views[j]))

    if constraints is not None:
        named = list(model.named_parameters())
        claimed: set[int] = set()
        for glob, (kind, given) in constraints.items():
            hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, glob)]
            if not hits:
                all_names = [n for n, _ in named]
                close = difflib.get_close_matches(glob, all_names, n=5, cutoff=0.3)
                hint = f"close names: {', '.join(close)}" if close else (
                    f"parameter names look like: {', '.join(all_names[:6])}"
                )
                raise ValueError(
                    f"ManifoldRetraction: glob {glob!r} matches no parameter of {type(model).__name__}; "
                    f"{hint}. Globs match the full names of named_parameters() (e.g. 'encoder.*.weight')."
                )
            source = f"glob {glob!r}"
            opts = resolve_options(kind, given, source, defaults(kind))
            for n, p in hits:
                if id(p) in claimed:
                    continue
                claimed.add(id(p))
                other = found.get(id(p))
                if other is not None and (other.constraint, other.options) != (kind, opts):
                    raise ValueError(
                        f"ManifoldRetraction: parameter {n!r} gets constraint {other.constraint!r} "
                        f"{other.options} from {other.source} but {kind!r} {opts} from {source}; "
                        "declare it in one place"
                    )
                found.setdefault(id(p), Target(p, n, roles.get(id(p), "all"), kind, opts, source,
                                               owners.get(id(p)), inferred_views.get(id(p), DEFAULT_VIEW)))

    targets = []
    for t in found.values():
        check_target(t)
        targets.extend(stiefel_matrices(t) if t.constraint == "stiefel" else [t])
    return targets


def stiefel_matrices(t: Target) -> list[Target]:
    """A Stiefel target per matrix of its view, each holding a 2-D view of the parameter that
    the retraction writes through (one per block of a split packed projection)."""
    p, view = t.param, t.view
    if view.blocks == 1 and (view.layout == "out_in" or (view.layout == "in_out" and p.ndim == 2)):
        # (out, in*k) is how the retraction reads a parameter; and polar(W^T) = polar(W)^T, so
        # an HF Conv1D weight is retracted as stored, in place
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
    return [Target(x, n, t.role, t.constraint, t.options, t.source, t.owner) for x, n in zip(mats, names)]


def check_target(t: Target) -> None:
    """Refuse a constraint the parameter's shape or dtype cannot carry; fix the sphere's dims."""
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
                    f"ManifoldRetraction: {t.source}: sphere dim {dim!r} does not fit {t.name!r} of shape {shape}"
                )
        t.options = {**t.options, "dim": tuple(dims) if len(dims) > 1 else dims[0]}
    if not t.param.is_floating_point():
        raise ValueError(f"ManifoldRetraction: {t.name!r} has dtype {t.param.dtype}, not floating point")


def plan_retractions(targets: Sequence[Target], cuda_graph: bool | str = "auto") -> "RetractionPlan":
    """Bucket ``targets``: one job per sphere parameter, one per (shape, device, dtype, options)
    of Stiefel matrices."""
    jobs: list[Job] = []
    batches: dict[tuple, Job] = {}
    for t in targets:
        # a shard of a row or matrix is not on the sphere or the Stiefel manifold by itself: sharded
        # parameters are gathered whole, retracted on every rank, and each keeps its shard (a
        # sphere whose rows lie within each rank's rows is retracted on the shard alone)
        sharded = is_dtensor(t.param)
        if t.constraint == "sphere":
            jobs.append(Job("sphere", [t], sharded=sharded))
            continue
        m = as_matrix(t.param, t.name)
        o = t.options
        tol = auto_tol(t.param.dtype) if o["tol"] == "auto" else o["tol"]
        key = (tuple(m.shape), t.param.device, compute_dtype(t.param.dtype), o["steps"], tol,
               o["schedule"], o["precision"], sharded)
        if key not in batches:
            batches[key] = Job("stiefel", steps=o["steps"], tol=tol, schedule=o["schedule"], precision=o["precision"],
                               sharded=sharded)
            jobs.append(batches[key])
        batches[key].targets.append(t)
    return RetractionPlan(jobs, cuda_graph)


def _rows_local(p: torch.Tensor, dim: int | tuple[int, ...]) -> bool:
    """A row-sharded DTensor (FSDP2) whose sphere slices lie within each rank's rows: retracted
    on the local shard, with no communication."""
    if not is_dtensor(p) or p.ndim < 2 or row_sharded_group(p) is None:
        return False
    return all(d % p.ndim != 0 for d in ((dim,) if isinstance(dim, int) else dim))


def _sphere_distance(p: torch.Tensor, o: dict[str, Any]) -> torch.Tensor:
    """:func:`sphere_distance` of a parameter; of a row-local sharded one, the largest over the
    ranks (an all-reduce: every rank must call it)."""
    if not _rows_local(p, o["dim"]):
        return sphere_distance(_whole(p), o["radius"], o["dim"])
    import torch.distributed as dist

    local = p.to_local()
    d = sphere_distance(local, o["radius"], o["dim"]) if local.numel() else local.new_zeros((), dtype=torch.float32)
    d = d.float().reshape(1)
    dist.all_reduce(d, op=dist.ReduceOp.MAX, group=row_sharded_group(p))
    return d.reshape(())


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (a sharded one gathered: one all-gather on every rank)."""
    return p.full_tensor() if is_dtensor(p) else p


def _write(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p <- value`` (a whole tensor); a sharded parameter keeps its own part."""
    if is_dtensor(p):
        p.to_local().copy_(local_part(value, p))
    else:
        p.copy_(value)


def merge_max(metrics: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """``metrics[key]`` = the largest value seen (the logged distance of a role is its worst)."""
    value = value.detach().float().reshape(())
    metrics[key] = value if key not in metrics else torch.maximum(metrics[key], value.to(metrics[key].device))


class RetractionPlan:
    """Bucketed targets and their retraction. ``retract`` is the per-step retraction (each job
    with its own schedule; every ``"predict"`` bucket of one (steps, tol, precision, device)
    through one cached in-place :class:`~.stiefel.StiefelRetractor`: one host sync);
    ``retract_to`` is the fit-start one (full precision, exact SVD where the iteration falls
    short). With ``measure`` both return ``manifold/...`` metrics (max over each role)."""

    def __init__(self, jobs: list[Job], cuda_graph: bool | str = "auto") -> None:
        self.jobs = jobs
        self.cuda_graph = cuda_graph
        #: iterations each Stiefel shape bucket ran in the latest retraction: {"768x2304": 1, ...}
        self.last_stiefel_steps: dict[str, int] = {}
        #: matrices the fit-start retraction projected by SVD
        self.fallback_names: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.jobs)

    @property
    def sharded(self) -> bool:
        """Whether any target is a DTensor (measuring it takes collectives on every rank)."""
        return any(is_dtensor(t.param) for job in self.jobs for t in job.targets)

    @property
    def params(self) -> list[torch.Tensor]:
        return [t.param for job in self.jobs for t in job.targets]

    @torch.no_grad()
    def retract(self, measure: bool) -> dict[str, torch.Tensor]:
        return self._run(measure, None, None)

    @torch.no_grad()
    def retract_to(self, steps: int, tol: float) -> dict[str, torch.Tensor]:
        return self._run(True, steps, tol)

    def _run(self, measure: bool, steps: int | None, tol: float | None) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        predicted: list[Job] = []
        for job in self.jobs:
            if job.constraint == "sphere":
                (t,) = job.targets
                o = t.options
                if measure:
                    merge_max(metrics, f"manifold/sphere_distance_before/{t.role}", _sphere_distance(t.param, o))
                if _rows_local(t.param, o["dim"]):
                    local = t.param.to_local()
                    if local.numel():
                        local.copy_(sphere_retract(local, o["radius"], o["dim"], o["eps"]))
                else:
                    _write(t.param, sphere_retract(_whole(t.param), o["radius"], o["dim"], o["eps"]))
                continue
            if steps is None and job.schedule == "predict" and not job.sharded:
                predicted.append(job)  # all predict buckets together: one host sync
                continue
            if steps is None and job.sharded and job.schedule in ("predict", "fixed") and self._on_owners(job, measure, metrics):
                continue
            dtype = compute_dtype(job.targets[0].param.dtype)
            stack = torch.stack([as_matrix(_whole(t.param)).to(dtype) for t in job.targets])
            if steps is None:
                result = polar_newton_schulz(stack, steps=job.steps, tol=job.tol, schedule=job.schedule,
                                             precision=job.precision)
                polar = result.polar
            else:  # fit start: full-precision iteration with a check per iteration, SVD where short
                result = polar_newton_schulz(stack, steps=steps, tol=tol, schedule="check", precision="fp32")
                polar = result.polar
                short = stiefel_distance(polar) > tol
                if bool(short.any()):
                    polar = polar.clone()
                    polar[short] = stiefel_retract_exact(stack[short])
                    self.fallback_names.extend(t.name for t, s in zip(job.targets, short.tolist()) if s)
            params = [t.param for t in job.targets]
            if job.sharded:
                for j, p in enumerate(params):
                    _write(p, polar[j].reshape(p.shape))
            else:
                torch._foreach_copy_(params, [polar[j].reshape(p.shape) for j, p in enumerate(params)])
            self._log_bucket(job, result.steps, result.distance_before, measure, metrics)
        by_options: dict[tuple, list[Job]] = {}
        for job in predicted:
            by_options.setdefault((job.steps, job.tol, job.precision, job.targets[0].param.device), []).append(job)
        for (n, tol_, precision, _), jobs in by_options.items():
            retractor = retractor_for([[t.param for t in job.targets] for job in jobs], n, tol_, precision, self.cuda_graph)
            for job, result in zip(jobs, retractor()):  # in place: nothing to copy back
                self._log_bucket(job, result.steps, result.distance_before, measure, metrics)
        return metrics

    def _on_owners(self, job: Job, measure: bool, metrics: dict[str, torch.Tensor]) -> bool:
        """A sharded Stiefel bucket retracted on owner ranks: each matrix's shards brought whole to
        one rank (one all-to-all), the owners' matrices iterated there, each rank's rows sent back
        (one all-to-all). The step count is the one a single process chooses: ``"fixed"`` by
        definition, ``"predict"`` from every rank's statistics (one exchange of a few floats per
        matrix). False, with nothing changed, where the layout is not FSDP2's or the bucket is
        too far off for the prediction (the gathered path runs instead)."""
        import torch.distributed as dist

        params = [t.param for t in job.targets]
        owners = assign_owners(params, [1.0] * len(params))
        if owners is None:
            return False
        group = row_sharded_group(params[0])
        whole = gather_to_owners(params, [p.to_local() for p in params], owners)
        mine = sorted(whole)
        dtype = compute_dtype(params[0].dtype)
        shape = tuple(as_matrix(job.targets[0].param).shape)
        device = params[0].to_local().device
        stack = (torch.stack([as_matrix(whole[i]).to(dtype) for i in mine]) if mine
                 else torch.empty((0, *shape), dtype=dtype, device=device))
        if job.schedule == "predict":
            def agree(per_bucket: list) -> list:
                gathered: list = [None] * dist.get_world_size(group)
                dist.all_gather_object(gathered, per_bucket, group=group)
                return [[row for g in gathered for row in g[b]] for b in range(len(per_bucket))]

            # speculating, as the unsharded plan's in-place retractor does: the same count
            result = polar_newton_schulz_buckets([stack], steps=job.steps, tol=job.tol, precision=job.precision,
                                                 agree=agree, speculate=True)[0]
        else:
            result = polar_newton_schulz(stack, steps=job.steps, schedule="fixed", precision=job.precision)
        # the ranks that hold matrices here chose the same count and fallback from the same
        # statistics; a rank without any learns them here
        ran = torch.tensor([result.steps, int(result.fallback)], device=device)
        dist.all_reduce(ran, op=dist.ReduceOp.MAX, group=group)
        count, fallback = (int(v) for v in ran.tolist())
        if fallback:  # too far off for the prediction: the gathered path, on every rank
            return False
        updates = {i: result.polar[j].reshape(params[i].shape) for j, i in enumerate(mine)}
        for p, part in zip(params, scatter_from_owners(params, updates, owners)):
            p.to_local().copy_(part)
        before = None
        if measure:  # every rank measures a sharded plan: each matrix's distance from its owner
            before = torch.zeros(len(params), dtype=torch.float64, device=device)
            before[mine] = result.distance_before.to(before)
            dist.all_reduce(before, op=dist.ReduceOp.MAX, group=group)
        self._log_bucket(job, count, before, measure, metrics)
        return True

    def _log_bucket(self, job: Job, steps_run: int, distance_before: torch.Tensor | None, measure: bool,
                    metrics: dict) -> None:
        shape = "x".join(str(d) for d in as_matrix(job.targets[0].param).shape)
        self.last_stiefel_steps[shape] = steps_run
        if not measure:
            return
        for j, t in enumerate(job.targets):
            merge_max(metrics, f"manifold/stiefel_distance_before/{t.role}", distance_before[j])
        count = torch.tensor(float(steps_run))
        merge_max(metrics, "manifold/stiefel_steps", count)
        merge_max(metrics, f"manifold/stiefel_steps/{shape}", count)

    @torch.no_grad()
    def distances_after(self) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        for job in self.jobs:
            for t in job.targets:
                if job.constraint == "sphere":
                    d = _sphere_distance(t.param, t.options)
                else:
                    d = stiefel_distance(as_matrix(_whole(t.param)))
                merge_max(metrics, f"manifold/{job.constraint}_distance_after/{t.role}", d)
        return metrics

    def release(self) -> None:
        """Free the cached retractors (buffers, CUDA graphs) of this plan's parameters."""
        release_retractors(self.params)
