import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite also runs from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
torch.set_num_threads(min(2, torch.get_num_threads()))


class TinyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att)
        return x + self.fc_out(torch.relu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-shaped model for policy tests (the package's GPT lives in lightning_optlab.models)."""

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 2, ctx: int = 8, tied: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _lightning_logger_levels() -> dict:
    import logging

    return {n: logging.getLogger(n).level for n in list(logging.root.manager.loggerDict)
            if n.startswith(("lightning", "lightning_optlab"))}


@pytest.fixture(scope="session")
def _initial_logger_levels():
    import lightning.pytorch  # noqa: F401  (creates its loggers)

    return _lightning_logger_levels()


@pytest.fixture(autouse=True)
def _restore_logger_levels(_initial_logger_levels):
    """The benchmark scripts quiet Lightning's loggers (benchmarks.common.quiet_lightning) for the
    whole process; a test (or a module fixture) that runs one must not silence the log assertions
    of later tests. Session-scoped snapshot: module fixtures run before function fixtures."""
    import logging

    yield
    for name in _lightning_logger_levels():
        logging.getLogger(name).setLevel(_initial_logger_levels.get(name, logging.NOTSET))


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT()


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
