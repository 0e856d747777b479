"""``hyperlit`` command line: a ``LightningCLI`` over every hyperlit LightningModule and DataModule.

Modules and DataModules are found by importing every submodule of ``hyperlit`` and ``datamodules``, so a new
module is listed by ``hyperlit fit --help`` without any registration. A user's own classes can be named by
import path (``--model my_pkg.MyModule``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

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

    def before_fit(self) -> None:
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
