"""What a newcomer sees: the TensorBoard layout of a run and a progress bar made of lines."""

import re

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optlab import OptLabMixin
from lightning_optlab.callbacks import LineProgressBar, SpectralMonitor, StepTimeMonitor, TensorBoardLayout

POLICY = {"rules": [
    {"name": "input", "match": {"role": "embedding"}, "optimizer": "adamw", "lr": 1e-3, "constraint": "sphere"},
    {"name": "hidden", "match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
    {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 1e-3},
]}


class Classifier(OptLabMixin, L.LightningModule):
    def __init__(self, width: int = 16):
        super().__init__(policy=POLICY)
        self.save_hyperparameters()  # what makes TensorBoardLogger write its hp_metric placeholder
        self.net = nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y), prog_bar=True)


def loader(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)),
                      batch_size=8)


def fit(tmp_path, callbacks, epochs=2):
    trainer = L.Trainer(
        max_epochs=epochs, logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=callbacks,
        log_every_n_steps=2, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(Classifier(), loader(), loader(32, seed=1))
    return trainer


def read_run(trainer):
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    return events.Tags()["scalars"], charts


def test_layout_arranges_every_figure_and_no_chart_is_empty(tmp_path):
    trainer = fit(tmp_path, [SpectralMonitor(every_n_steps=3), StepTimeMonitor(),
                             LearningRateMonitor(logging_interval="step"), TensorBoardLayout()])
    tags, charts = read_run(trainer)
    assert "hp_metric" not in tags  # the placeholder is gone
    for title, regexes in charts.items():  # each chart draws something
        assert any(re.search(rx, t) for rx in regexes for t in tags), (title, regexes)
    # every per-component spectral figure, every step-time share, the lr and manifold tags have a chart
    wanted = [t for t in tags if re.match(r"spectral/\w+/component/|step_time/.*_share|lr-|manifold/.*_distance_after", t)]
    assert len(wanted) > 30
    for tag in wanted:
        assert any(re.search(rx, tag) for regexes in charts.values() for rx in regexes), tag
    # weights and gradients side by side in each spectral section
    sections = {section for section, _ in charts if section.startswith("2.")}
    assert len(sections) == 5
    for section in sections:
        assert sorted(title.split(" ")[0] for s, title in charts if s == section) == ["gradients", "weights"]
    assert ("1 training", "accuracy") in charts and ("1 training", "bits per byte") not in charts


def test_without_the_layout_callback_lightning_logs_the_placeholder(tmp_path):
    """The reference behaviour the callback changes."""
    tags, _ = EventAccumulator(fit(tmp_path, [], epochs=1).logger.log_dir).Reload().Tags()["scalars"], None
    assert "hp_metric" in tags


def test_line_progress_bar_prints_lines_not_redraws(tmp_path, capsys):
    fit(tmp_path, [LineProgressBar(every_n_steps=4)])
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith(("epoch", "validation"))]
    # 12 batches per epoch: lines after batches 4, 8, 12 of each epoch, and one per validation
    assert [line.split("  ")[1] for line in lines if line.startswith("epoch")] == ["batch 4/12", "batch 8/12", "batch 12/12"] * 2
    assert sum(line.startswith("validation after step") for line in lines) == 2
    assert all("train/loss=" in line and "val/" not in line for line in lines if line.startswith("epoch"))
