"""Muon's step with its heavy part replayed as one CUDA graph.

Eagerly, a Muon step over a transformer's hidden matrices is ~150 small kernel launches
(momentum, stacking, five Newton-Schulz iterations per shape, casts, updates), and on a fast
GPU the device then waits on Python. Here each shape bucket keeps its gradients and momentum buffers
*stacked* in static ``(B, m, n)`` float32 tensors (the per-parameter ``momentum_buffer`` state
entries are views into them, so ``state_dict`` is unchanged) and its Newton-Schulz input in a
static bf16 stack. Per step the host copies the gradients in (one foreach copy), writes the lr
into a device scalar (schedulers keep working) and replays one graph: decoupled weight decay
(one foreach kernel), then per shape bucket, each on its own CUDA stream so that one bucket's
memory-bound momentum and normalization overlap another's matmuls and the small buckets'
matmuls fill the SMs the big ones leave idle: the momentum blend, the Nesterov look-ahead
written by ``lerp`` straight into the bf16 stack (the cast is the store),
:func:`~.newton_schulz.frobenius_normalize_`, :func:`~.newton_schulz.quintic_iterations`, and
the shape-scaled update added to each weight from the bf16 result (``addcmul_`` with a device
scalar: no float32 update tensors).

Its cost against the eager step and torch.optim.Muon is in ``docs/benchmarks.md`` (bench_ops).

It is exact with respect to the eager path up to float rounding (lr*wd and lr*scale are device
scalars), and used only where that holds: fp32 weights on one CUDA device, no split of the NS
work across ranks, every parameter of the group with a gradient (otherwise the step runs
eagerly on the same state views). A change of hyperparameters other than ``lr`` recaptures the
graph. The first step with a new graph runs the same computation eagerly (CUDA graphs need a
warm-up); capture happens on the second.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import cuda_graph
from .cuda_graph import CapturedStep, bucket_streams, run_branches
from .newton_schulz import resolve_ns_dtype
from .stacks import matrix_buckets
from .steps import decoupled_weight_decay_, muon_lookahead_, muon_lr_scale
from .matrix import group_views
from .newton_schulz import coefficient_schedule, newton_schulz_

_KEYS = ("momentum", "nesterov", "weight_decay", "ns_steps", "ns_coefficients", "eps", "adjust_lr_fn", "ns_dtype",
         "ns_method")


def graph_eligible(group: dict, params: list[torch.Tensor], split_world: Any) -> bool:
    """:func:`.cuda_graph.graph_eligible` for Muon, which also needs the NS work unsplit (a
    split across ranks runs eagerly)."""
    if split_world:
        return False
    return cuda_graph.graph_eligible("muon", group, params, also_needs=" and no NS split across ranks")


class MuonGraph:
    """Static buffers and the captured graph of one param group."""

    def __init__(self, params: list[torch.Tensor], group: dict) -> None:
        self.params = params
        self.key = tuple(str(group[k]) for k in _KEYS)
        device = params[0].device
        dtype = resolve_ns_dtype(group["ns_dtype"], device)
        # Each parameter's matrix view (blocks of a split projection take consecutive slots);
        # the per-parameter views of the stacks are plain strided views in the stored layout.
        self.views = group_views(group, params)
        self.buckets = matrix_buckets([p.shape for p in params], self.views)
        self.grads = [
            torch.zeros((sum(self.views[i].blocks for i, _ in slots), *shape), device=device)
            for shape, slots in self.buckets
        ]
        self.buffers = [torch.zeros_like(g) for g in self.grads]
        self.inputs = [torch.zeros(g.shape, device=device, dtype=dtype) for g in self.grads]
        self.grad_views: list[Any] = [None] * len(params)
        self.buffer_views: list[Any] = [None] * len(params)
        for (shape, slots), g, b in zip(self.buckets, self.grads, self.buffers):
            for i, start in slots:
                self.grad_views[i] = self._param_view(g, i, start)
                self.buffer_views[i] = self._param_view(b, i, start)
        self.streams = bucket_streams(device, len(self.buckets))
        self.lr = torch.zeros((), device=device)
        self.captured = CapturedStep(device)

    def _param_view(self, stack: torch.Tensor, i: int, start: int) -> torch.Tensor:
        view = self.views[i]
        return view.from_matrix(stack[start : start + view.blocks], self.params[i].shape)

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.captured.graph

    def matches(self, params: list[torch.Tensor], group: dict) -> bool:
        return (
            len(params) == len(self.params)
            and all(p is q for p, q in zip(params, self.params))
            and self.key == tuple(str(group[k]) for k in _KEYS)
        )

    def adopt_state(self, states: list[dict]) -> None:
        """Make every ``momentum_buffer`` a view of the stacked buffers (copying values that
        came from elsewhere, e.g. ``load_state_dict``)."""
        for state, view in zip(states, self.buffer_views):
            buf = state.get("momentum_buffer")
            if buf is view:
                continue
            if buf is None:
                view.zero_()
            else:
                view.copy_(buf)
            state["momentum_buffer"] = view

    def _body(self, group: dict) -> None:
        """The whole step after the gradients are copied in: captured once, replayed every step.
        Each shape bucket runs on its own stream, so one bucket's memory-bound momentum and
        normalization overlap another's matmuls, and the small buckets' matmuls fill the SMs
        the big ones leave idle."""
        decoupled_weight_decay_(self.params, self.lr, group["weight_decay"])
        momentum, nesterov = group["momentum"], group["nesterov"]
        steps, eps, method = group["ns_steps"], group["eps"], group["ns_method"]
        coefficients = coefficient_schedule(group["ns_coefficients"], steps)

        def bucket(shape, slots, G, buf, X) -> None:
            ortho = newton_schulz_(muon_lookahead_(G, buf, momentum, nesterov, out=X), steps, coefficients, eps, method)
            step = self.lr * -muon_lr_scale(*shape, group["adjust_lr_fn"])
            for i, start in slots:
                self.params[i].addcmul_(self._param_view(ortho, i, start), step)

        run_branches(self.streams, [
            functools.partial(bucket, shape, slots, G, buf, X)
            for (shape, slots), G, buf, X in zip(self.buckets, self.grads, self.buffers, self.inputs)
        ])

    def load(self, grads: list[torch.Tensor], states: list[dict]) -> None:
        """Copy the gradients into the static stacks (changes no weight and no state value)."""
        self.adopt_state(states)
        torch._foreach_copy_(self.grad_views, grads)

    def run(self, group: dict) -> None:
        """The step proper, on the loaded gradients: replay (or warm up, or capture)."""
        self.lr.fill_(float(group["lr"]))
        self.captured.run(lambda: self._body(group))

    def step(self, grads: list[torch.Tensor], states: list[dict], group: dict) -> None:
        self.load(grads, states)
        self.run(group)


def graph_for(group: dict, params: list[torch.Tensor]) -> MuonGraph:
    """The group's graph (rebuilt when its parameters or hyperparameters change)."""
    return cuda_graph.cached_graph(group, "muon_graph", params, lambda: MuonGraph(params, group))
