"""What Muon's (:mod:`.muon_graph`) and the stateless rules' (:mod:`.stateless_graph`) CUDA-graph
steps share: the ``cuda_graph`` hyperparameter (``"auto"`` | True | False) and its check, when a
group's step can be a graph, the per-group cache of the graph object, and the step itself run
eagerly once (the warm-up CUDA graphs need: cuBLAS handles, workspaces and the caching allocator
settle), captured on the next call and replayed after."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

CUDA_GRAPH_SETTINGS = ("auto", True, False)


def check_cuda_graph_setting(value: Any, where: str = "") -> None:
    """The one check of a ``cuda_graph`` option (rules, StiefelRetractor, ManifoldRetraction);
    ``where`` prefixes the message with its owner."""
    if value not in CUDA_GRAPH_SETTINGS:
        raise ValueError(f"{where}cuda_graph must be 'auto', true or false, got {value!r}")


def graph_eligible(rule: str, group: dict, params: Sequence[torch.Tensor], also_needs: str = "") -> bool:
    """Whether ``group``'s step can run as a CUDA graph (exact with respect to the eager step):
    fp32 contiguous weights on one CUDA device, every parameter of the group with a gradient,
    not inside another capture. ``cuda_graph=True`` where it cannot is an error naming the rule
    (``also_needs``: the rule's own further condition, for the message)."""
    setting = group["cuda_graph"]
    if setting is False:
        return False
    eligible = (
        torch.cuda.is_available()
        and len(params) > 0
        and len(params) == len(group["params"])
        and all(p.is_cuda and p.dtype == torch.float32 and p.is_contiguous() for p in params)
        and len({p.device for p in params}) == 1
        and not torch.cuda.is_current_stream_capturing()
    )
    if setting is True and not eligible:
        raise RuntimeError(
            f"{rule} ({group.get('name', 'param group')}): cuda_graph=True needs fp32 contiguous "
            f"weights on one CUDA device, every parameter of the group with a gradient{also_needs}; "
            "use cuda_graph: auto to fall back to the eager step"
        )
    return eligible


def cached_graph(group: dict, slot: str, params: Sequence[torch.Tensor], build: Callable[[], Any]) -> Any:
    """``group``'s graph object kept in ``group["_runtime"][slot]`` (never saved in state_dict),
    rebuilt by ``build()`` when its ``matches(params, group)`` says the parameters or the
    hyperparameters it baked in have changed."""
    runtime = group.setdefault("_runtime", {})
    graph = runtime.get(slot)
    if graph is None or not graph.matches(params, group):
        runtime[slot] = None  # free the old graph's pool before building the new one
        graph = runtime[slot] = build()
    return graph


class CapturedStep:
    """``run(body)``: eager on the first call, captured and replayed on the second, replayed
    after that. ``body`` must read and write only tensors that stay at the same addresses."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed_up = False

    def run(self, body: Callable[[], None]) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.warmed_up:
            body()
            self.warmed_up = True
            return
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = graph
        graph.replay()  # capturing does not run the step
