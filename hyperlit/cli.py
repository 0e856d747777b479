"""``hyperlit`` command line: a ``LightningCLI`` over every hyperlit module and every LightningDataModule.

:class:`HyperlitCLI` takes models that subclass :class:`~hyperlit.base.HyperlitModule` and any
``LightningDataModule`` (subclass mode). Modules and DataModules are found by importing every submodule of
``hyperlit`` and ``datamodules``, so a new module is listed by ``hyperlit fit --help`` without any registration. A
user's own classes can be named by import path (``--model my_pkg.MyModule``). The modules own their optimizers:
each takes one ``OptimizerCallable`` per parameter group (``--model.phi_optimizer torch.optim.AdamW
--model.phi_optimizer.lr 3e-4``), so there is no ``--optimizer``/``--lr_scheduler``.

A model that trains hyperparameters on a held-out stream (``uses_hyper_stream``, the tuning modules) given a
DataModule that does not serve that stream itself (a user's plain train/val DataModule) gets the DataModule
wrapped in :class:`~hyperlit.streams.HyperStreamDataModule`: its validation loader becomes the hyper stream.

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

import lightning.pytorch as pl
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.checkpoint_io import find_last_checkpoint, use_atomic_checkpoint_io
from hyperlit.streams import HyperStreamDataModule, serves_hyper_stream, uses_hyper_stream

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
    """LightningCLI bound to :class:`~hyperlit.base.HyperlitModule` and ``LightningDataModule`` in subclass mode.

    The modules own their optimizers (``auto_configure_optimizers=False``); ``fit`` keeps a ``last.ckpt``, writes
    checkpoints atomically, resolves ``--ckpt_path last``, takes ``--init_from`` and wraps a plain DataModule for
    modules that use a hyper stream. Every ``LightningCLI`` argument can be given (``args``, ``run``, ...).

    Args:
        model_class: The models' base class (subclass mode: any subclass, by class path).
        datamodule_class: The DataModules' base class.
        **kwargs: Further ``LightningCLI`` arguments.
    """

    def __init__(
        self,
        model_class: type[pl.LightningModule] = HyperlitModule,
        datamodule_class: type[pl.LightningDataModule] = pl.LightningDataModule,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class, datamodule_class, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="Checkpoint whose weights initialise the model (weights only, fresh optimizers and counters); "
            "use --ckpt_path to resume a run instead.",
        )

    @override
    def instantiate_classes(self) -> None:
        """Instantiate, then give a hyper-stream model a DataModule that serves the stream (see module docstring)."""
        super().instantiate_classes()
        if (
            self.subcommand in (None, "fit")
            and self.datamodule is not None
            and uses_hyper_stream(self.model)
            and not serves_hyper_stream(self.datamodule)
        ):
            self.datamodule = HyperStreamDataModule(self.datamodule)

    @override
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
        """``--ckpt_path last`` across versions, and ``--init_from``'s weights."""
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
    import_all()
    HyperlitCLI(args=list(args) if args is not None else None)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
