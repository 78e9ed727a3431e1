"""What Muon's (:mod:`.muon_graph`) and the stateless rules' (:mod:`.stateless_graph`) CUDA-graph
steps share: the ``cuda_graph`` hyperparameter (``"auto"`` | True | False) and its check, when a
group's step can be a graph, the per-group cache of the graph object, and the step itself run
eagerly once (the warm-up CUDA graphs need: cuBLAS handles, workspaces and the caching allocator
settle), captured on the next call and replayed after."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

CUDA_GRAPH_SETTINGS = ("auto", True, False)
# Where the fast paths run. Off CUDA their CapturedStep runs eagerly, so a test that adds "cpu"
# here runs the fast paths' buffers and bodies on CPU against the plain step.
FAST_PATH_DEVICES = ("cuda",)


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
        len(params) > 0
        and len(params) == len(group["params"])
        and all(p.device.type in FAST_PATH_DEVICES and p.dtype == torch.float32 and p.is_contiguous() for p in params)
        and len({p.device for p in params}) == 1
        and not (params[0].is_cuda and torch.cuda.is_current_stream_capturing())
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
    """The one capture mechanism: ``run(body)`` runs ``body`` eagerly on the first call (on a
    side stream: the warm-up CUDA graphs need, so cuBLAS handles, workspaces and the caching
    allocator settle outside the capture), captures it on the second and replays it after that.
    ``body`` must read and write only tensors that stay at the same addresses.

    Off CUDA, or once a capture has failed (``failed`` says why; with ``strict`` the error is
    raised instead), ``body`` runs eagerly every call: the same specification on the same
    buffers, which is how CPU tests exercise the fast paths' layouts.
    """

    def __init__(self, device: torch.device, strict: bool = False, pool: Any = None) -> None:
        self.device = torch.device(device)
        self.strict = strict
        self.pool = pool  # a graph memory pool shared with graphs replayed in capture order
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed_up = False
        self.failed: str | None = None

    @property
    def capturable(self) -> bool:
        return self.device.type == "cuda" and self.failed is None

    def run(self, body: Callable[[], None]) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.capturable:
            body()
            return
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        if not self.warmed_up:
            with torch.cuda.stream(side):
                body()
            main.wait_stream(side)
            self.warmed_up = True
            return
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a monitor's worker thread waiting on its copies (an event sync) while
            # the training thread captures is not an error; only this thread's calls are checked
            with torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                body()
        except Exception as exc:  # capture refused: eager from now on (the body did not run)
            self.failed = f"{type(exc).__name__}: {exc}"
            if self.strict:
                raise
            main.wait_stream(side)
            body()
            return
        main.wait_stream(side)
        self.graph = graph
        graph.replay()  # capturing does not run the step


def bucket_streams(device: torch.device, n: int) -> list[torch.cuda.Stream] | None:
    """One CUDA stream per bucket of a fast path (None off CUDA or for a single bucket)."""
    device = torch.device(device)
    return [torch.cuda.Stream(device) for _ in range(n)] if device.type == "cuda" and n > 1 else None


def run_branches(streams: list[torch.cuda.Stream] | None, bodies: Sequence[Callable[[], None]]) -> None:
    """Run ``bodies`` each on its own stream, forked from and joined into the current one (inside
    a capture: parallel branches of the graph), so one bucket's memory-bound work overlaps
    another's matmuls; in order on the current stream when ``streams`` is None."""
    if streams is None:
        for body in bodies:
            body()
        return
    main = torch.cuda.current_stream()
    for stream, body in zip(streams, bodies):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            body()
    for stream in streams:
        main.wait_stream(stream)
