"""MLPClassifier: the research plan's MNIST model, with its three components.

``input`` (first Linear: role ``embedding``), ``hidden`` (the Linear layers between), ``output``
(last Linear: role ``output``); biases have role ``bias``. Inputs are flattened images.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from ..module import OptLabMixin


class MLPClassifier(OptLabMixin, LightningModule):
    """A ReLU MLP classifier trained with a per-layer optimizer policy.

    Example::

        model = MLPClassifier(policy={"rules": [
            {"match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
            {"match": {}, "optimizer": "adamw", "lr": 1e-3},
        ]})

    Args:
        policy: the optimizer policy (see :class:`~lightning_optlab.policy.Policy`).
        scheduler: optional LR schedule spec (see :mod:`lightning_optlab.schedules`).
        input_dim: flattened input size (784 for MNIST).
        hidden_sizes: widths of the hidden layers; ``len(hidden_sizes) - 1`` hidden matrices.
        num_classes: output size.
        bias: whether the Linear layers have biases.
    """

    def __init__(
        self,
        policy: Any = None,
        scheduler: dict | None = None,
        input_dim: int = 784,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        num_classes: int = 10,
        bias: bool = True,
    ) -> None:
        super().__init__(policy=policy, scheduler=scheduler)
        if not hidden_sizes:
            raise ValueError("MLPClassifier: hidden_sizes needs at least one width")
        self.save_hyperparameters()
        widths = [input_dim, *hidden_sizes]
        self.input = nn.Linear(widths[0], widths[1], bias=bias)
        self.hidden = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(widths[1:-1], widths[2:])
        )
        self.output = nn.Linear(widths[-1], num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.input(x.flatten(1)))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.output(x)

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x.to(self.input.weight.dtype))
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(-1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        self.log(f"{stage}/acc", acc, prog_bar=stage != "train", on_step=on_step, on_epoch=not on_step)
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")
