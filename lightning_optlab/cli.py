"""``optlab``: LightningCLI with the package's models, datamodules and callbacks registered.

    optlab fit --config configs/mnist/quickstart.yaml
    optlab fit --config configs/mnist/quickstart.yaml --print_config

Optimizers come from the model's policy only (``auto_configure_optimizers=False``), so a stray
``--optimizer`` cannot silently replace it.
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

# Imported for their side effect: LightningCLI resolves short class names among loaded subclasses.
from . import callbacks as _callbacks  # noqa: F401
from . import data as _data  # noqa: F401
from . import models as _models  # noqa: F401


class OptLabCLI(LightningCLI):
    def _log_dir_message(self) -> str | None:
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger):  # none, or fast_dev_run's dummy logger
            return None
        log_dir, root = logger.log_dir, logger.root_dir
        return (
            f"TensorBoard logs: {os.path.abspath(log_dir)}\n"
            f"  open them with: tensorboard --logdir {os.path.abspath(root)}  (then http://localhost:6006)"
        )

    def before_fit(self) -> None:
        msg = self._log_dir_message()
        if msg:
            rank_zero_info(msg)

    def after_fit(self) -> None:
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1
        }
        if metrics:
            rank_zero_info("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        msg = self._log_dir_message()
        if msg:
            rank_zero_info(msg)


def main(args: list[str] | None = None, run: bool = True) -> OptLabCLI:
    return OptLabCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def entry_point() -> None:
    """The ``optlab`` console script. pip's wrapper calls ``sys.exit(entry_point())``, so this
    must return None (``main`` returns the CLI object, which would exit with status 1)."""
    main()


if __name__ == "__main__":
    entry_point()
