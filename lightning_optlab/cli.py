"""``optlab``: LightningCLI with the package's models, datamodules and callbacks registered.

    optlab fit --config configs/mnist/quickstart.yaml
    optlab fit --config configs/mnist/quickstart.yaml --print_config
    optlab explain --config configs/gpt/gradient_rank_stiefel.yaml   # the routing table, no training

Optimizers come from the model's policy only (``auto_configure_optimizers=False``), so a stray
``--optimizer`` cannot silently replace it. A bad config or policy ends the command with one
sentence that names the file, the rule and the fix (exit status 2); ``--debug`` (or
``OPTLAB_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from argparse import ArgumentError
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

# Imported for their side effect: LightningCLI resolves short class names among loaded subclasses.
from . import callbacks as _callbacks  # noqa: F401
from . import data as _data  # noqa: F401
from . import models as _models  # noqa: F401


POLICY_HELP = (
    "The optimizer comes from the model's policy, not from --optimizer: set "
    "model.init_args.policy to {rules: [...]} (or a policy YAML file), one rule per group of "
    "parameters, e.g. {match: {role: hidden}, optimizer: muon, lr: 0.02}. "
    "`optlab explain --config FILE` prints which rule claims each parameter; "
    "`--model.help CLASS` lists the model's arguments; README.md's Usage has the policy keys."
)


class _SaveConfigToLogDir(SaveConfigCallback):
    """Lightning's config saving, except that a run without a logger writes nothing: with
    ``logger: false`` the log dir would be the working directory."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


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

    def instantiate_trainer(self, **kwargs: Any):
        """The configured Trainer, with the run's TensorBoard layout and, when stdout is not a
        terminal, a progress bar that prints lines instead of redrawing (see the callbacks)."""
        from .callbacks import LineProgressBar, TensorBoardLayout

        trainer = super().instantiate_trainer(**kwargs)
        if any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers) and not any(
            isinstance(c, TensorBoardLayout) for c in trainer.callbacks
        ):
            trainer.callbacks.append(TensorBoardLayout())
        bar = trainer.progress_bar_callback
        if bar is not None and not self._configures_progress_bar() and not sys.stdout.isatty():
            # the Trainer's default bar; a configured one is left alone
            trainer.callbacks[trainer.callbacks.index(bar)] = LineProgressBar()
        return trainer

    def _configures_progress_bar(self) -> bool:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        for entry in (config.get("trainer") or {}).get("callbacks") or []:
            path = entry.get("class_path", "") if hasattr(entry, "get") else ""
            module, _, name = path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError):
                continue
            if isinstance(cls, type) and issubclass(cls, ProgressBar):
                return True
        return False

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
        save_config_callback=_SaveConfigToLogDir,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "exit_on_error": False,  # entry_point prints the one sentence that matters
            **{
                name: {"description": POLICY_HELP, "exit_on_error": False}
                for name in ("fit", "validate", "test", "predict")
            },
        },
        args=args,
        run=run,
    )


def explain_main(args: list[str]) -> str:
    """``optlab explain --config FILE [overrides]``: build the config's model (no Trainer fit, no
    data loaded) and return its routing table: every trainable parameter with its shape, matrix
    view, role, rule, optimizer and constraint (:func:`lightning_optlab.explain`)."""
    from .policy import explain

    if not _config_paths(args):
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


SUBCOMMANDS = tuple(LightningCLI.subcommands())


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for k, arg in enumerate(argv):
        if arg == "--config" and k + 1 < len(argv):
            paths.append(argv[k + 1])
        elif arg.startswith("--config="):
            paths.append(arg.partition("=")[2])
    return paths


def _config_file_problem(argv: list[str]) -> str | None:
    """Why a ``--config`` file could not be read (missing, or not YAML, with the line), naming
    the file; None when every one reads. Asked only after the parser failed: its own message
    says ``"<unicode string>", line 3`` without the file."""
    from .policy.yaml_text import read_yaml_file

    for path in _config_paths(argv):
        try:
            read_yaml_file(path, what="config file")
        except (FileNotFoundError, ValueError) as err:
            return str(err)
    return None


def _root_message(err: BaseException) -> str:
    """The innermost message in an exception chain: the package's own error that jsonargparse
    wraps in "Does not validate against any of the Union subtypes"."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            break
        err = inner
    text = str(err).strip() or type(err).__name__
    # jsonargparse's own errors are long; its first line says what failed.
    return text.splitlines()[0] if type(err).__module__.startswith("jsonargparse") else text


def _short_error(err: BaseException, argv: list[str]) -> str:
    configs = _config_paths(argv)
    where = f" in {', '.join(repr(c) for c in configs)}" if configs else ""
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "fit"
    if isinstance(err, ArgumentError):  # jsonargparse: 'Parser key "k":' then the reason
        message = _config_file_problem(argv) or " ".join(line.strip() for line in str(err).splitlines()[:3])
    else:
        message = _root_message(err)
    return (
        f"optlab: error{where}: {message}\n"
        f"  check a policy without training: optlab explain --config FILE; options: optlab {command} --help\n"
        "  full traceback: add --debug (or set OPTLAB_DEBUG=1)"
    )


def entry_point() -> None:
    """The ``optlab`` console script. pip's wrapper calls ``sys.exit(entry_point())``, so this
    must return None (``main`` returns the CLI object, which would exit with status 1)."""
    argv = sys.argv[1:]
    debug = "--debug" in argv or os.environ.get("OPTLAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    sys.argv = sys.argv[:1] + argv
    explaining = bool(argv) and argv[0] == "explain"
    try:
        if explaining:
            sys.argv = sys.argv[:1]  # the arguments go to the parser as args, not twice
            print(explain_main(argv[1:]))
            return
        main()
    except (ValueError, TypeError, FileNotFoundError, ArgumentError) as err:
        if debug:
            raise
        # Errors inside training (a non-finite gradient, a shape mismatch) keep their traceback.
        if not isinstance(err, ArgumentError) and not _during_setup(err):
            raise
        print(_short_error(err, argv), file=sys.stderr)
        raise SystemExit(2) from None


def _during_setup(err: BaseException) -> bool:
    """Whether ``err`` was raised while the CLI parsed the config, built its classes or the
    policy's optimizer: a config mistake, not a failure inside training."""
    policy_dir = os.path.join(os.path.dirname(__file__), "policy")
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _SETUP_FRAMES or code.co_filename.startswith(policy_dir):
            return True
        tb = tb.tb_next
    return False


# Where a config mistake surfaces: parsing, instantiating the classes, building the optimizer.
_SETUP_FRAMES = frozenset({"instantiate_classes", "parse_arguments", "explain_main", "configure_optimizers"})


if __name__ == "__main__":
    entry_point()
