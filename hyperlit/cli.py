"""``hyperlit`` command line: a ``LightningCLI`` over every hyperlit LightningModule and DataModule.

Modules and DataModules are found by importing every submodule of ``hyperlit`` and ``datamodules``, so a new
module is listed by ``hyperlit fit --help`` without any registration. A user's own classes can be named by
import path (``--model my_pkg.MyModule``).

Fault tolerance (README, "Fault tolerance"): checkpoints are written atomically
(:class:`hyperlit.checkpoint_io.AtomicCheckpointIO`, unless a ``CheckpointIO`` plugin is given), ``fit`` keeps a
``last.ckpt`` (a default ``ModelCheckpoint(save_last=True)`` when checkpointing is on and no checkpoint callback is
configured), and ``--ckpt_path last`` finds the newest ``last.ckpt`` of earlier runs under the same log root.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from hyperlit.checkpoint_io import find_last_checkpoint, use_atomic_checkpoint_io

__all__ = ["HyperlitCLI", "import_all", "main"]

_PACKAGES = ("hyperlit", "datamodules")


def import_all(packages: Sequence[str] = _PACKAGES) -> None:
    """Import every submodule of ``packages`` so their classes are known to the CLI's subclass mode."""
    for pkg_name in packages:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            if info.name.endswith(("__main__", ".cli")):
                continue
            importlib.import_module(info.name)


class HyperlitCLI(LightningCLI):
    """LightningCLI in subclass mode; our modules own their optimizers (``auto_configure_optimizers=False``)."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="Checkpoint whose weights initialise the model (weights only, fresh optimizers and counters); "
            "use --ckpt_path to resume a run instead.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, plus a ``last.ckpt``-keeping ``ModelCheckpoint`` (``fit``) and atomic checkpoint writes."""
        config = self._get(self.config_init, "trainer", default={})
        if self.subcommand == "fit" and config.get("enable_checkpointing") is not False:
            callbacks = config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if not any(isinstance(cb, Checkpoint) for cb in callbacks):  # Lightning's default keeps no last.ckpt
                kwargs["callbacks"] = [*callbacks, ModelCheckpoint(save_last=True)]
        trainer = super().instantiate_trainer(**kwargs)
        plugins = config.get("plugins")
        use_atomic_checkpoint_io(trainer, plugins if isinstance(plugins, (list, tuple)) else [plugins])
        return trainer

    def before_fit(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path") == "last":
            # Lightning looks only in this run's (new) version folder; resume the newest last.ckpt of the log root
            last = find_last_checkpoint(self.trainer)
            if last is not None:
                self.config_init[self.subcommand]["ckpt_path"] = last
        init_from = self.config[self.subcommand].get("init_from")
        if init_from:
            from hyperlit.checkpoint import load_weights

            load_weights(self.model, init_from)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``hyperlit`` console script and ``python -m hyperlit``."""
    import lightning.pytorch as pl

    import_all()
    HyperlitCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
