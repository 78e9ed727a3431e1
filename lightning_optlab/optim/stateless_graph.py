"""The group step of a stateless rule (``sinkgd``, ``sinkhorn_tanh``) replayed as one CUDA graph.

Eagerly, such a step is ~180 kernel launches from Python (matvecs, foreach vector ops, per-shape
prescales, per-weight updates) and a fast GPU waits on the host. Here the group keeps one
static float32 stack per shape bucket (:func:`.stacks.stack_by_shape`'s layout); per step the
host copies the gradients into it (one foreach copy), writes the lr into a device scalar (so LR
schedulers need no recapture) and replays the captured body: the rule's own group-step function
(:func:`.sinkgd.sinkgd_stacks_step_` / :func:`.sinkgd.sinkhorn_tanh_stacks_step_`), the
very function the eager step runs on fresh stacks. Its intermediates (squares, scale vectors)
live in the graph's private memory pool; nothing is kept between steps but the stacks and the
pool, and no state is written (``state_dict()['state']`` stays empty). No host sync.

The full-fp32-matmul setting the Sinkhorn matvecs need is a host-side switch: it is applied
while the body is captured (the kernels chosen then are the ones replayed) and not touched on
replay.

Used only where it is exact with respect to the eager step (up to ``lr`` being a float32 device
scalar): fp32 contiguous weights on one CUDA device, every parameter of the group with a
gradient, not inside another capture. A change of any hyperparameter other than ``lr``, or of
the group's parameters, builds a new graph. The first step with a new graph runs the body
eagerly on the static stacks (CUDA graphs need a warm-up); capture happens on the second.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .cuda_graph import CapturedStep, cached_graph
from .stacks import from_work, work_shape
from .steps import compute_dtype
from .matrix import group_views


class StatelessGraph:
    """Static gradient stacks, the lr scalar and the captured step of one param group.

    ``body(params, stacks, lr, group)`` is the rule's group-step function; ``keys`` are the
    hyperparameters baked into the graph (any change rebuilds it).
    """

    def __init__(self, params: list[torch.Tensor], group: dict, keys: Sequence[str], body: Callable) -> None:
        self.params = params
        self.keys = tuple(keys)
        self.key = self._key(group)
        self.body = body
        device = params[0].device
        self.views = views = group_views(group, params)
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            kind, shape = work_shape(p, views[i])
            buckets.setdefault((kind, shape), []).append(i)
        dtype = compute_dtype(params[0].dtype)
        self.stacks = [
            (kind, idx, torch.zeros((len(idx), *shape), device=device, dtype=dtype))
            for (kind, shape), idx in buckets.items()
        ]
        self.grad_views: list[Any] = [None] * len(params)
        for _, idx, G in self.stacks:
            for j, i in enumerate(idx):
                self.grad_views[i] = from_work(params[i], G[j], views[i])
        self.lr = torch.zeros((), device=device, dtype=dtype)
        self.captured = CapturedStep(device)

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.captured.graph

    @property
    def warmed_up(self) -> bool:
        return self.captured.warmed_up

    def _key(self, group: dict) -> tuple:
        return tuple(repr(group[k]) for k in self.keys)

    def matches(self, params: list[torch.Tensor], group: dict) -> bool:
        return (
            len(params) == len(self.params)
            and all(p is q for p, q in zip(params, self.params))
            and self.key == self._key(group)
        )

    def _run(self, group: dict) -> None:
        self.body(self.params, self.stacks, self.lr, group, self.views)

    def step(self, grads: list[torch.Tensor], group: dict) -> None:
        torch._foreach_copy_(self.grad_views, grads)
        self.lr.fill_(float(group["lr"]))
        self.captured.run(lambda: self._run(group))


def graph_for(name: str, group: dict, params: list[torch.Tensor], keys: Sequence[str], body: Callable) -> StatelessGraph:
    """The group's graph for rule ``name`` (rebuilt when its parameters or hyperparameters change)."""
    return cached_graph(group, f"{name}_graph", params, lambda: StatelessGraph(params, group, keys, body))
