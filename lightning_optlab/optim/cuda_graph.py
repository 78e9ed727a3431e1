"""A step replayed as a CUDA graph: run eagerly once (the warm-up CUDA graphs need: cuBLAS
handles, workspaces and the caching allocator settle), capture on the next call, replay after.
Shared by Muon's (:mod:`.muon_graph`) and the stateless rules' (:mod:`.stateless_graph`) steps."""

from __future__ import annotations

from typing import Callable

import torch


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
