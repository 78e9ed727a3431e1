"""``optlab``: LightningCLI with the package's models, datamodules and callbacks registered.

    optlab fit --config configs/mnist/quickstart.yaml
    optlab fit --config configs/mnist/quickstart.yaml --print_config
    optlab explain --config configs/gpt/gradient_rank_stiefel.yaml   # the routing table, no training

Optimizers come from the model's policy only (``auto_configure_optimizers=False``), so a stray
``--optimizer`` cannot silently replace it.
"""

from __future__ import annotations

import os
import sys

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


def explain_main(args: list[str]) -> str:
    """``optlab explain --config FILE [overrides]``: build the config's model (no Trainer fit, no
    data loaded) and return its routing table: every trainable parameter with its shape, matrix
    view, role, rule, optimizer and constraint (:func:`lightning_optlab.explain`)."""
    from .policy import explain

    if not any(a == "--config" or a.startswith("--config=") for a in args):
        raise SystemExit("usage: optlab explain --config FILE [--model.init_args.KEY=VALUE ...]")
    cli = main(args, run=False)
    model = cli.model
    policy = getattr(model, "policy", None)
    if policy is None:
        raise SystemExit(
            f"optlab explain: {type(model).__name__} has no optimizer policy; set "
            "model.init_args.policy in the config"
        )
    return explain(model, policy)


def entry_point() -> None:
    """The ``optlab`` console script. pip's wrapper calls ``sys.exit(entry_point())``, so this
    must return None (``main`` returns the CLI object, which would exit with status 1)."""
    argv = sys.argv[1:]
    if argv and argv[0] == "explain":
        sys.argv = sys.argv[:1]  # the arguments go to the parser as args, not twice
        print(explain_main(argv[1:]))
        return
    main()


if __name__ == "__main__":
    entry_point()
