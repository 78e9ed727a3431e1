"""Small helpers shared by the notebooks: run a config (shrunk for CPU) and read its TensorBoard events.

Kept next to the notebooks, not in the package: they are conveniences for demos, not API.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))


def run_dir(name: str) -> Path:
    """Where a notebook's runs go: ``$OPTLAB_RUN_DIR/name`` if set, else a fresh temporary directory."""
    base = os.environ.get("OPTLAB_RUN_DIR")
    path = Path(base) / name if base else Path(tempfile.mkdtemp(prefix=f"optlab_{name}_"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_config(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def callback_args(config: dict, class_name: str) -> dict:
    """The ``init_args`` dict of the config's callback whose class path ends in ``class_name``."""
    for cb in config["trainer"].get("callbacks") or []:
        if str(cb.get("class_path", "")).endswith(class_name):
            return cb.setdefault("init_args", {})
    raise KeyError(f"no {class_name} in the config's callbacks")


def shrink_for_cpu(config: dict, save_dir: Path, max_steps: int, version: str | None = None, **data: Any) -> dict:
    """A copy of a LightningCLI config that runs quickly on CPU, logging under ``save_dir``.

    GPT models go to ``size: tiny``, text data to a ~400 kB slice of the corpus, bf16 to fp32
    (bf16 matmuls are emulated on most CPUs), and the run to ``max_steps`` optimizer steps.
    """
    cfg = copy.deepcopy(config)
    trainer = cfg.setdefault("trainer", {})
    trainer.update(max_steps=max_steps, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(save_dir))
    trainer.pop("max_epochs", None)
    if trainer.get("precision") == "bf16-mixed":
        trainer["precision"] = "32-true"
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = str(save_dir)
        if version is not None:
            logger["init_args"]["version"] = version
    model = cfg["model"]
    if str(model["class_path"]).endswith("GPT"):
        model["init_args"]["size"] = "tiny"
    data_cfg = cfg["data"]
    if str(data_cfg["class_path"]).endswith("TextDataModule"):
        data_cfg.setdefault("init_args", {}).update(
            max_bytes=400_000, num_workers=0, batch_size=16, cache_dir=str(save_dir / "text-cache"))
        trainer.update(val_check_interval=max(1, max_steps // 3), limit_val_batches=4)
    if str(data_cfg["class_path"]).endswith("MNISTDataModule"):
        data_cfg.setdefault("init_args", {}).update(download=False)
    data_cfg.setdefault("init_args", {}).update(data)
    return cfg


def run_config(config: dict, workdir: Path, name: str = "config"):
    """``optlab fit --config <config>`` in this process; returns the LightningCLI object."""
    from lightning_optlab.cli import main

    path = Path(workdir) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv, sys.argv = sys.argv, ["optlab"]  # the CLI gets its arguments from args=, not the kernel's argv
    try:
        return main(["fit", "--config", str(path)])
    finally:
        sys.argv = argv


def event_accumulator(log_dir: str | Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar tag."""
    events = acc.Scalars(tag)
    return np.array([e.step for e in events]), np.array([e.value for e in events])


def tags(acc, kind: str = "scalars", where: Callable[[str], bool] | None = None) -> list[str]:
    found = acc.Tags().get(kind, [])
    return sorted(t for t in found if where is None or where(t))


def sorted_values(histogram) -> np.ndarray:
    """The values a TensorBoard histogram summarises, descending, to its bucket resolution.

    Each value is placed at the geometric middle of its bucket, clipped to the recorded min/max
    (exact for the largest and smallest). For a singular-value histogram this is the spectrum.
    """
    upper = np.asarray(histogram.bucket_limit, dtype=float)
    lower = np.concatenate([[histogram.min], upper[:-1]])
    lo, hi = np.clip(lower, histogram.min, histogram.max), np.clip(upper, histogram.min, histogram.max)
    middle = np.where((lo > 0) & (hi > 0), np.sqrt(np.abs(lo * hi)), (lo + hi) / 2)
    values = np.repeat(middle, np.asarray(histogram.bucket).round().astype(int))
    values = np.sort(values)[::-1]
    if values.size:
        values[0], values[-1] = histogram.max, histogram.min
    return values


def spectra_over_time(acc, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, spectra[step, index]) of a singular-spectrum histogram tag (descending values)."""
    events = acc.Histograms(tag)
    spectra = [sorted_values(e.histogram_value) for e in events]
    width = max(len(s) for s in spectra)
    table = np.full((len(spectra), width), np.nan)
    for i, s in enumerate(spectra):
        table[i, : len(s)] = s
    return np.array([e.step for e in events]), table
