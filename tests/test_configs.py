"""Every config under configs/ runs one fast_dev_run step on CPU, through the CLI parser.

Parametrized over the folder: a new config is tested without editing this file. The overrides
keep it quick: the GPT at ``size=tiny``, the text corpus cut to ~100 kB in a temporary cache,
MNIST without download attempts. Each config must also say at its top which question it asks
and what to look at.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_optlab.cli import main
from lightning_optlab.optim import ModularOptimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def quick_overrides(spec: dict, tmp_path: Path) -> list[str]:
    """Flags that make a config's model and data tiny, chosen by their classes."""
    model = str((spec.get("model") or {}).get("class_path", ""))
    data = str((spec.get("data") or {}).get("class_path", ""))
    args = []
    if model.endswith("GPT"):
        args.append("--model.init_args.size=tiny")
    if data.endswith("TextDataModule"):
        args += [
            "--data.init_args.max_bytes=100000",
            f"--data.init_args.cache_dir={tmp_path / 'text-cache'}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
        ]
    if data.endswith("MNISTDataModule"):
        args += ["--data.init_args.download=false", "--data.init_args.batch_size=32"]
    return args


def test_there_are_configs():
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_is_documented_and_runs_one_step_on_cpu(config, tmp_path, monkeypatch):
    text = config.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Question:" in header and "Look at:" in header, f"{config} must say at its top what it asks and shows"
    spec = yaml.safe_load(text)
    monkeypatch.chdir(tmp_path)  # anything a config writes relative to the cwd lands here
    monkeypatch.setattr(sys, "argv", ["optlab"])  # the CLI reads args=..., not pytest's argv
    cli = main(
        [
            "--config", str(config),
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            *quick_overrides(spec, tmp_path),
        ],
        run=False,
    )
    model = cli.model
    assert model.policy is not None, "every config declares its optimizer policy"
    if "GPT" in type(model).__name__:
        assert model.d_model == 64  # the override reached the model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert isinstance(cli.trainer.optimizers[0], ModularOptimizer)
    # Every rule of the policy moved some of its parameters. (Not every tensor: a stateless rule
    # with a small lr may move a LayerNorm gain of 1.0 by less than float32 resolves there.)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in cli.trainer.optimizers[0].param_groups:
        moved = [names[id(p)] for p in group["params"] if not torch.equal(p.detach().cpu(), before[names[id(p)]].cpu())]
        assert moved, f"{config.name}: one step moved no parameter of param group {group.get('name')!r}"
    loss = cli.trainer.callback_metrics.get("train/loss")
    assert loss is not None and torch.isfinite(loss)
