"""Muon's Newton-Schulz work moved into backward: each matrix is orthogonalized as soon as its
gradient is complete, on a CUDA side stream, while backward goes on through the layers below.

Why: on a GPU a Muon step is a few milliseconds of Newton-Schulz after backward, on the critical
path (issue 8 measured 4.0 ms against 17.9 ms of forward+backward on a 42M GPT). Backward produces
the hidden matrices' gradients one layer at a time, last layer first, so everything except the
momentum blend of the step only depends on a gradient that is final long before backward ends.

How (opt-in, pure torch)::

    overlap = MuonOverlap(optimizer)    # a ModularOptimizer (or Muon) with 'muon' groups
    for batch in loader:
        optimizer.zero_grad()
        loss = model(batch)
        overlap.arm()                   # only before a backward that a step() follows
        loss.backward()
        overlap.disarm()
        optimizer.step()                # 'muon' groups take the pre-computed directions

``MuonOverlap`` registers ``Tensor.register_post_accumulate_grad_hook`` on every parameter of the
optimizer's ``muon`` groups. While armed, the hook of a parameter computes, from its fresh
gradient and its momentum buffer, exactly what :func:`~.muon.muon_step` would compute for it
*except anything that touches state or weights*: the blended momentum ``lerp(buf, g, 1-m)`` (a
temporary), the nesterov look-ahead and its Newton-Schulz polar factor (one-matrix call of the same
:func:`~.functional.orthogonalize`, same dtypes). On CUDA this runs on a side stream that first
waits on backward's stream; on CPU it runs inline (no speed-up; the same code path for tests).

At ``step()``, :func:`~.muon.muon_step` asks :meth:`MuonOverlap.take` for the group's directions.
Only when *every* stepped parameter has one, computed from the very gradient tensor being stepped
(same object, same ``_version``: an in-place change afterwards through an ordinary op --
``clip_grad_norm_``/``clip_grad_value_``, another backward accumulating into it -- bumps the
version; see below for changes it cannot see) and with the group's current
hyperparameters, the step waits on the side stream and applies: the momentum blend into the state
buffer (the same in-place foreach kernel as the plain step), decoupled weight decay, the shape-scaled
update with the *current* lr (so lr schedulers work). Otherwise the plain step runs (the CUDA graph
or the eager path), with a warning naming why, once per reason.

Design choices:

* The momentum buffer is not pre-computed into a second tensor and committed: the step re-runs the
  one foreach ``lerp_`` the plain step runs anyway (same kernel, same bits as the hook's temporary),
  which costs the same as a copy, needs no second momentum-sized tensor and leaves state untouched
  until the step. So the NaN/Inf guard of ``ModularOptimizer.step`` (which runs before any rule)
  still refuses a bad step with weights and momentum unchanged; the pre-computed directions of that
  step are simply dropped at the next :meth:`arm`.
* One matrix per Newton-Schulz call, started the moment its gradient is ready (most overlap). On CPU
  a stacked call gives the same bits as one call per matrix, so the steps are bit-identical to the
  plain step there; on CUDA, cuBLAS may choose other kernels for another batch size (bf16 rounding
  differences only).
* Arming is explicit, because only the caller knows whether a backward is followed by a step
  (gradient accumulation: arm the last micro-batch only). An armed backward that is *not* followed
  by a step is wasted work, never wrong: the version check catches the accumulation on top.

Not supported (refused at construction and at every :meth:`arm`, with the reason, see
:func:`overlap_unsupported_reason`): several processes (DDP all-reduces the gradients after the
hook fired, and the NS work is split across ranks), sharded parameters. Do not arm under an fp16
``GradScaler``: its in-place unscale (``torch._amp_foreach_non_finite_check_and_unscale_``) does
not bump version counters, so the step could not tell the gradients changed (measured; the same
kernel with a scale of exactly 1 is the NaN/Inf check of ``ModularOptimizer.step``, which is why
that check leaves the overlap usable). Gradient clipping is detected, but then every step runs the
plain path. The Lightning callback :class:`~lightning_optlab.callbacks.MuonBackwardOverlap` does not
attach in any of these cases.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .functional import compute_dtype, muon_momentum, ns_split_world, orthogonalize, resolve_ns_dtype, upcast
from .matrix import DEFAULT_VIEW, MatrixView, group_views

# Hyperparameters the pre-computed direction depends on (lr, weight_decay and adjust_lr_fn are
# applied at step time and may change freely in between).
_DIRECTION_KEYS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "eps", "ns_dtype", "ns_split")


def _direction_key(group: dict) -> tuple:
    return tuple(str(group[k]) for k in _DIRECTION_KEYS)


def muon_direction(
    group: dict, param: Tensor, grad: Tensor, buffer: Tensor | None, view: MatrixView = DEFAULT_VIEW
) -> Tensor:
    """Muon's orthogonalized direction for one parameter (as its matrix ``view``, compute dtype),
    by the same ops as :func:`~.functional.muon_update`, without touching ``buffer``."""
    g = upcast(grad)
    buf = upcast(buffer) if buffer is not None else torch.zeros_like(g)  # the step's fresh buffer
    direction = muon_momentum([g], [buf], group["momentum"], group["nesterov"], update_buffers=False)[0]
    return orthogonalize(
        [view.to_matrix(direction)], steps=group["ns_steps"], coefficients=group["ns_coefficients"],
        eps=group["eps"], dtype=resolve_ns_dtype(group["ns_dtype"], param.device),
        out_dtype=compute_dtype(param.dtype), split=False,
    )[0]


def overlap_unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why :class:`MuonOverlap` cannot be exact for ``optimizer`` (None when it can)."""
    from .modular import ModularOptimizer

    if not isinstance(optimizer, ModularOptimizer):
        return f"{type(optimizer).__name__} is not a ModularOptimizer (or Muon)"
    groups = [g for g in optimizer.param_groups if g.get("algorithm") == "muon"]
    if not groups:
        return "the optimizer has no 'muon' param group"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return (
            f"{dist.get_world_size()} processes: DDP all-reduces gradients after the hook has fired "
            "(and Muon's NS work is split across ranks then)"
        )
    for group in groups:
        try:
            split = ns_split_world(group["ns_split"])
        except RuntimeError as exc:  # ns_split=True without a process group
            return str(exc)
        if split:
            return "the Newton-Schulz work is split across ranks (ns_split)"
        for p in group["params"]:
            if type(p).__name__ in ("DTensor", "FlatParameter") or getattr(p, "_is_flat_param", False):
                return f"sharded parameters ({type(p).__name__}); Newton-Schulz needs whole matrices"
    return None


@dataclass
class _Pending:
    grad: Tensor  # the gradient tensor the direction was computed from
    version: int  # its version counter then (in-place changes afterwards bump it)
    key: tuple  # the group's direction hyperparameters then
    direction: Tensor


class MuonOverlap:
    """Orthogonalize each Muon matrix during backward (see the module docstring).

    Args:
        optimizer: a :class:`~.modular.ModularOptimizer` (or :class:`~.muon.Muon`) with at least one
            ``muon`` param group; refused (``RuntimeError`` with the reason) where the overlap
            cannot be exact (:func:`overlap_unsupported_reason`).

    Attributes (diagnostics): ``overlapped_steps`` / ``plain_steps`` count group steps that used the
    pre-computed directions / that had some but fell back; ``fallback_reasons`` the distinct reasons.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        reason = overlap_unsupported_reason(optimizer)
        if reason is not None:
            raise RuntimeError(f"MuonOverlap: cannot overlap Muon with backward: {reason}")
        self.optimizer = optimizer
        self.overlapped_steps = 0
        self.plain_steps = 0
        self.fallback_reasons: list[str] = []
        self._armed = False
        self._handles: dict[Tensor, Any] = {}
        self._group_of: dict[Tensor, dict] = {}
        self._view_of: dict[Tensor, MatrixView] = {}
        self._pending: dict[Tensor, _Pending] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._refresh()

    # ------------------------------------------------------------------------ lifecycle
    def _refresh(self) -> None:
        """Attach to the current muon groups (``load_state_dict`` replaces the group dicts, so
        this runs at every :meth:`arm`) and hook parameters not hooked yet."""
        self._group_of, self._view_of = {}, {}
        for group in self.optimizer.param_groups:
            if group.get("algorithm") != "muon":
                continue
            group.setdefault("_runtime", {})["muon_overlap"] = self  # read by muon_step
            for p, view in zip(group["params"], group_views(group, group["params"])):
                self._group_of[p] = group
                self._view_of[p] = view
                if p not in self._handles and p.requires_grad:
                    self._handles[p] = p.register_post_accumulate_grad_hook(self._on_grad)

    def arm(self) -> None:
        """The next backward is followed by ``optimizer.step()``: pre-compute during it.
        Directions left from an earlier backward (a refused or skipped step) are dropped."""
        reason = overlap_unsupported_reason(self.optimizer)  # e.g. a process group started since
        if reason is not None:
            raise RuntimeError(f"MuonOverlap: cannot overlap Muon with backward: {reason}")
        self._refresh()
        self._pending.clear()
        self._armed = True

    def disarm(self) -> None:
        """Stop pre-computing (what was computed stays for the next step)."""
        self._armed = False

    def close(self) -> None:
        """Remove the hooks and detach from the optimizer; its steps are plain again."""
        self._armed = False
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        for group in self.optimizer.param_groups:
            runtime = group.get("_runtime", {})
            if runtime.get("muon_overlap") is self:
                del runtime["muon_overlap"]

    # ----------------------------------------------------------------------- the hook
    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    @torch.no_grad()
    def _on_grad(self, param: Tensor) -> None:
        if not self._armed:
            return
        group = self._group_of.get(param)
        grad = param.grad
        if group is None or grad is None or grad.is_sparse:
            return  # the step handles (or refuses) these
        buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
        if grad.is_cuda:
            # Autograd runs this hook with backward's stream current; the side stream starts
            # after the gradient is written, backward continues without waiting for it.
            main = torch.cuda.current_stream(grad.device)
            side = self._side_stream(grad.device)
            side.wait_stream(main)
            # (autocast off: the step, which this must equal, runs outside any autocast region)
            with torch.cuda.stream(side), torch.autocast("cuda", enabled=False):
                direction = muon_direction(group, param, grad, buffer, self._view_of[param])
            # If the step never comes (refused, skipped) the gradient may be freed on the main
            # stream while the side stream still reads it: tell the allocator.
            grad.record_stream(side)
            if buffer is not None:
                buffer.record_stream(side)
        else:
            with torch.autocast(grad.device.type, enabled=False):
                direction = muon_direction(group, param, grad, buffer, self._view_of[param])
        self._pending[param] = _Pending(grad, grad._version, _direction_key(group), direction)

    # ------------------------------------------------------------------------ the step
    def _fallback(self, reason: str) -> None:
        self.plain_steps += 1
        if reason not in self.fallback_reasons:
            self.fallback_reasons.append(reason)
            warnings.warn(f"MuonOverlap: {reason}; this step ran the plain Muon step", stacklevel=3)

    def take(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> list[Tensor] | None:
        """The pre-computed directions of ``params`` (the stepped parameters of ``group``), ready
        on the current stream, or None when the plain step must run. Consumes them."""
        entries = [self._pending.pop(p, None) for p in params]
        if all(e is None for e in entries):
            return None  # not armed for this step: plain step, nothing to say
        names = group.get("param_names")
        everything = list(group["params"])

        def who(p: Tensor) -> str:
            i = next((k for k, q in enumerate(everything) if q is p), None)
            return repr(names[i]) if names is not None and i is not None else f"parameter #{i}"

        out_dtype = upcast(params[0]).dtype
        key = _direction_key(group)
        for p, g, e in zip(params, grads, entries):
            if e is None:
                return self._fallback(f"no gradient for {who(p)} arrived during the armed backward")
            if e.grad is not g or g._version != e.version:
                return self._fallback(
                    f"the gradient of {who(p)} changed after backward (gradient clipping, "
                    "another backward or another in-place change)"
                )
            if e.key != key:
                return self._fallback(f"hyperparameters of {group.get('name', 'a muon group')} changed between backward and step")
            if e.direction.dtype != out_dtype:
                return self._fallback("the muon group mixes parameter dtypes")
        directions = [e.direction for e in entries]
        cuda_devices = {d.device for d in directions if d.is_cuda}
        for device in cuda_devices:
            current = torch.cuda.current_stream(device)
            current.wait_stream(self._side_stream(device))
        for d in directions:
            if d.is_cuda:  # allocated on the side stream, read on this one
                d.record_stream(torch.cuda.current_stream(d.device))
        self.overlapped_steps += 1
        return directions
