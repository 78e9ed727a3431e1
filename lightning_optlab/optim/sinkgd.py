"""Stateless multi-normalized gradient descent: SinkGD (paper) and the Sinkhorn-tanh variant.

* ``sinkgd`` / :class:`SinkGD` -- Scetbon et al., "Gradient Multi-Normalization for Stateless
  and Scalable LLM Training" (arXiv 2502.06742): ``sinkhorn_iterations`` alternations of row-
  then column-wise l2 normalization (rows to norm sqrt(n), columns to sqrt(m) for an m x n
  matrix, i.e. unit-RMS entries), then ``p <- p * (1 - lr * weight_decay) - lr * G``.
  Each tensor is read as its matrix view (:mod:`.matrix`: conv kernels flattened to (out, fan_in),
  HF ``Conv1D`` transposed); vectors (1-D, or (C, 1, 1) scales) and scalars to unit RMS.
  The paper uses it on the 2-D hidden matrices and Adam elsewhere; a policy says the same.
* ``sinkhorn_tanh`` / :class:`SinkhornTanh` -- the "Sinkhorn-like" SinkGD of the ablation notes:
  ``n_iter`` rounds of (row l2, column l2, ``tanh(g / tau)``), the result rescaled to the
  gradient's RMS, decoupled weight decay. Defaults lr 3e-4, weight_decay 0.1, tau 0.1,
  n_iter 5, eps 1e-8 (the notes' S1); S2 is tau 0.05 / n_iter 10, S3 tau 0.2 / n_iter 3.

Both keep no state at all (``state_dict()['state']`` is empty). Math in fp32, result cast back
to the parameter dtype. ``cuda_graph`` (default False): with ``"auto"`` (or True) the group step
on CUDA with fp32 weights is replayed as one CUDA graph (:mod:`.stateless_graph`), which keeps a
float32 stack of the gradients and the graph's pool of intermediates between steps -- workspace,
not state, but memory all the same (about 4-5 bytes per parameter; step times with and without
it in ``docs/benchmarks.md``). SinkGD is
chosen for its SGD-like memory, so the default keeps that; ask for the graph where speed matters
more. A NaN/Inf gradient raises
``FloatingPointError`` before anything is changed (see :mod:`.functional`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .cuda_graph import check_cuda_graph_setting, graph_eligible
from .functional import sinkgd_stacks_step_, sinkhorn_tanh_stacks_step_, stack_by_shape
from .matrix import group_views
from .registry import UpdateRule, check_common, register_rule
from .rule_optimizer import RuleOptimizer
from .stateless_graph import graph_for

SINKGD_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, sinkhorn_iterations=5, weight_decay=0.0, eps=1e-8, cuda_graph=False
)
SINKHORN_TANH_DEFAULTS: dict[str, Any] = dict(
    lr=3e-4, weight_decay=0.1, tau=0.1, n_iter=5, eps=1e-8, cuda_graph=False
)
# what a captured graph bakes in (lr is a device scalar and may change freely)
_SINKGD_GRAPH_KEYS = ("sinkhorn_iterations", "weight_decay", "eps")
_SINKHORN_TANH_GRAPH_KEYS = ("weight_decay", "tau", "n_iter", "eps")


def _check_count(hp: Mapping[str, Any], key: str, minimum: int) -> None:
    value = hp[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_sinkgd(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    _check_count(hp, "sinkhorn_iterations", 1)
    check_cuda_graph_setting(hp["cuda_graph"])


def check_sinkhorn_tanh(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    _check_count(hp, "n_iter", 1)
    tau = hp["tau"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    check_cuda_graph_setting(hp["cuda_graph"])


def _sinkgd_body(params: list, stacks: list, lr: Any, group: dict, views: list) -> None:
    sinkgd_stacks_step_(params, stacks, lr, group["weight_decay"], group["sinkhorn_iterations"], group["eps"], views)


def _sinkhorn_tanh_body(params: list, stacks: list, lr: Any, group: dict, views: list) -> None:
    sinkhorn_tanh_stacks_step_(params, stacks, lr, group["weight_decay"], group["tau"], group["n_iter"], group["eps"],
                               views)


def sinkgd_step(group: dict, params: list, grads: list, states: list) -> None:
    """One SinkGD step over a param group (stateless: ``states`` are left empty).

    Gradients are stacked by shape; matrices run as Sinkhorn on scale vectors
    (:func:`.functional.sinkgd_stacks_step_`: batched matrix-vector products over the squared
    gradients, the two scale vectors folded into the update of each weight). On CUDA with fp32
    weights the same function is replayed as a CUDA graph (:mod:`.stateless_graph`, unless
    ``cuda_graph`` is False). Nothing waits on the device.
    """
    if graph_eligible("sinkgd", group, params):
        graph_for("sinkgd", group, params, _SINKGD_GRAPH_KEYS, _sinkgd_body).step(grads, group)
        return
    views = group_views(group, params)
    _sinkgd_body(params, stack_by_shape(grads, views), float(group["lr"]), group, views)


def sinkhorn_tanh_step(group: dict, params: list, grads: list, states: list) -> None:
    """One Sinkhorn-tanh step over a param group (stateless; batched by shape, graph on CUDA like SinkGD)."""
    if graph_eligible("sinkhorn_tanh", group, params):
        graph_for("sinkhorn_tanh", group, params, _SINKHORN_TANH_GRAPH_KEYS, _sinkhorn_tanh_body).step(grads, group)
        return
    views = group_views(group, params)
    _sinkhorn_tanh_body(params, stack_by_shape(grads, views), float(group["lr"]), group, views)


SINKGD_RULE = register_rule(
    UpdateRule(
        name="sinkgd",
        example=dict(lr=0.01, weight_decay=0.01),
        step=sinkgd_step,
        defaults=SINKGD_DEFAULTS,
        summary="SinkGD (arXiv 2502.06742): stateless alternating row/column l2 normalization",
        check=check_sinkgd,
        stateless=True,
    )
)
SINKHORN_TANH_RULE = register_rule(
    UpdateRule(
        name="sinkhorn_tanh",
        example=dict(lr=0.01),
        step=sinkhorn_tanh_step,
        defaults=SINKHORN_TANH_DEFAULTS,
        summary="Sinkhorn-like SinkGD: (row, column, tanh(g/tau))^n_iter, RMS restored; stateless",
        check=check_sinkhorn_tanh,
        stateless=True,
    )
)


class SinkGD(RuleOptimizer):
    """SinkGD for plain PyTorch; the same update as the ``sinkgd`` rule.

    Args:
        params: parameters (or ``named_parameters()``, or param groups).
        lr: learning rate (default 1e-3; the paper's recipe is 0.05 x the Adam lr).
        sinkhorn_iterations: row/column alternations L (default 5).
        weight_decay: decoupled, ``p <- p * (1 - lr * weight_decay)`` (default 0).
        eps: floor of the row/column norms (default 1e-8); a zero gradient gives a zero update.
        cuda_graph: ``False`` (default: nothing kept between steps) always runs eagerly;
            ``"auto"`` replays the step as one CUDA graph where that is exact (fp32 weights on
            one CUDA device, every parameter with a gradient; see :mod:`.stateless_graph`;
            faster, with ~4.8 bytes per parameter of workspace kept), eager otherwise; ``True``
            raises where the graph cannot run.
    """

    rule_name = "sinkgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SINKGD_DEFAULTS["lr"],
        sinkhorn_iterations: int = SINKGD_DEFAULTS["sinkhorn_iterations"],
        weight_decay: float = SINKGD_DEFAULTS["weight_decay"],
        eps: float = SINKGD_DEFAULTS["eps"],
        cuda_graph: bool | str = SINKGD_DEFAULTS["cuda_graph"],
    ) -> None:
        super().__init__(
            params, lr=lr, sinkhorn_iterations=sinkhorn_iterations, weight_decay=weight_decay, eps=eps,
            cuda_graph=cuda_graph,
        )


class SinkhornTanh(RuleOptimizer):
    """Sinkhorn-tanh SinkGD for plain PyTorch; the same update as the ``sinkhorn_tanh`` rule.

    Args:
        params: parameters (or ``named_parameters()``, or param groups).
        lr: learning rate (default 3e-4).
        weight_decay: decoupled, ``p <- p - weight_decay * lr * p`` before the step (default 0.1).
        tau: tanh temperature; smaller is sharper (default 0.1).
        n_iter: (row, column, tanh) rounds (default 5).
        eps: floor of every norm (default 1e-8).
        cuda_graph: ``False`` (default), ``"auto"`` or ``True``, as for :class:`SinkGD`.
    """

    rule_name = "sinkhorn_tanh"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SINKHORN_TANH_DEFAULTS["lr"],
        weight_decay: float = SINKHORN_TANH_DEFAULTS["weight_decay"],
        tau: float = SINKHORN_TANH_DEFAULTS["tau"],
        n_iter: int = SINKHORN_TANH_DEFAULTS["n_iter"],
        eps: float = SINKHORN_TANH_DEFAULTS["eps"],
        cuda_graph: bool | str = SINKHORN_TANH_DEFAULTS["cuda_graph"],
    ) -> None:
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, tau=tau, n_iter=n_iter, eps=eps, cuda_graph=cuda_graph
        )
