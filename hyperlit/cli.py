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
configured), and ``--ckpt_path last`` finds the newest ``last.ckpt`` of earlier runs under the same log root (every
subcommand; ``validate``/``test``/``predict`` refuse to run when there is none instead of using untrained weights).

``--ckpt_path FILE`` is checked before anything is built: the file must be a Lightning checkpoint written by the
configured module class (:class:`~hyperlit.checkpoint.CheckpointMismatchError` names both classes otherwise;
Lightning would otherwise swap the model class for the checkpoint's and fail on an unrelated argument), and
``--ckpt_path best`` (the best model of a ``fit`` earlier in the *same process*) is refused with what to give.

``predict`` writes its outputs to a file (:class:`~hyperlit.callbacks.prediction_writer.PredictionWriter`, CSV in
the run's log folder) unless a ``BasePredictionWriter`` is configured.

:func:`main` (the console script; ``main(args, short_errors=True)`` from Python) reports configuration and data
errors as a short ``error: ...`` line on stderr (exit code 2 for a command line or configuration the CLI refuses, 1
for a missing or malformed data set or checkpoint); ``HYPERLIT_TRACEBACK=1`` shows Lightning's and jsonargparse's
full output instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from hyperlit.base import CHECKPOINT_KEY, HyperlitModule
from hyperlit.checkpoint import CheckpointMismatchError, read_checkpoint
from hyperlit.checkpoint_io import find_last_checkpoint, use_atomic_checkpoint_io
from hyperlit.streams import HyperStreamDataModule, serves_hyper_stream, uses_hyper_stream

__all__ = ["ConfigurationError", "HyperlitCLI", "import_all", "main"]

_PACKAGES = ("hyperlit", "datamodules")
#: ``--ckpt_path`` values that Lightning resolves itself (``best`` is refused, see :meth:`HyperlitCLI._parse_ckpt_path`)
_SPECIAL_CKPT = ("last", "hpc")
_MAX_MESSAGE_LINES = 3


class ConfigurationError(ValueError):
    """A command line or configuration that the CLI refuses before running (``hyperlit`` exits with code 2)."""


def import_all(packages: Sequence[str] = _PACKAGES) -> None:
    """Import every submodule of ``packages`` so their classes are known to the CLI's subclass mode."""
    for pkg_name in packages:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            if info.name.endswith(("__main__", ".cli")):
                continue
            importlib.import_module(info.name)


def _import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s chain (``raise ... from``, or raised while handling another)."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def _from_datamodules(err: BaseException) -> bool:
    """Whether ``err`` is one of the DataModules' own errors (``DatasetNotFoundError``, ``DataFormatError``)."""
    return type(err).__module__.split(".")[0] == "datamodules"


def _raising_component(err: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``err`` (the innermost module, DataModule or Trainer being built)."""
    found = None
    tb: types.TracebackType | None = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(owner, (nn.Module, pl.LightningDataModule, Trainer)):
            found = type(owner).__name__
        tb = tb.tb_next
    return found


class HyperlitCLI(LightningCLI):
    """LightningCLI bound to :class:`~hyperlit.base.HyperlitModule` and ``LightningDataModule`` in subclass mode.

    The modules own their optimizers (``auto_configure_optimizers=False``); ``fit`` keeps a ``last.ckpt``, writes
    checkpoints atomically, resolves ``--ckpt_path last``, takes ``--init_from`` and wraps a plain DataModule for
    modules that use a hyper stream; ``--ckpt_path`` is checked against the configured module before anything is
    built; ``predict`` writes its outputs to a file. A ``ValueError`` (or Lightning ``MisconfigurationException``)
    raised while the model, DataModule or Trainer is built becomes a :class:`ConfigurationError` naming the class.
    Every ``LightningCLI`` argument can be given (``args``, ``run``, ...).

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

    # -- --ckpt_path ------------------------------------------------------------------------------------------
    @override
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything is built, then merge its saved hyperparameters (as Lightning does).

        Lightning (2.5.5+) re-reads the model's hyperparameters from the checkpoint, class path included, so another
        module's checkpoint would silently swap the model class; here it raises
        :class:`~hyperlit.checkpoint.CheckpointMismatchError` naming both classes. A file that is not a Lightning
        checkpoint, a missing file and ``best`` (which only a ``fit`` in the same process can resolve) are refused.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path:
            return
        ckpt_path = str(ckpt_path)
        if ckpt_path == "best":
            raise ConfigurationError(
                f"--ckpt_path best names the best checkpoint of a `fit` run earlier in the same Python process, but "
                f"`hyperlit {subcommand}` is a fresh process: give the checkpoint file instead (--ckpt_path "
                "lightning_logs/version_N/checkpoints/NAME.ckpt), or `last` for the newest last.ckpt"
            )
        if ckpt_path in _SPECIAL_CKPT or ckpt_path.startswith("registry") or "://" in ckpt_path:
            return
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigurationError(
                f"--ckpt_path {ckpt_path} {what}: give a checkpoint file (.ckpt), or `last` for the newest last.ckpt"
            )
        ckpt = read_checkpoint(path)
        self._check_checkpoint_module(ckpt, ckpt_path, subcommand)
        self._merge_checkpoint_hparams(ckpt, ckpt_path, subcommand)

    def _configured_model(self, subcommand: str) -> tuple[type | None, str]:
        """The configured model class and its class path."""
        model = self.config[subcommand].get("model")
        class_path = model.get("class_path") if isinstance(model, (Namespace, dict)) else None
        if class_path:
            return _import_class(str(class_path)), str(class_path)
        cls = self._model_class if isinstance(self._model_class, type) else None
        return cls, f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "?"

    def _check_checkpoint_module(self, ckpt: dict[str, Any], path: str, subcommand: str) -> None:
        """Refuse a checkpoint written by another module class than the configured one."""
        own_cls, class_path = self._configured_model(subcommand)
        if own_cls is None or not issubclass(own_cls, HyperlitModule):
            return  # a plain LightningModule: Lightning's own checks
        own = own_cls.__qualname__
        state = ckpt.get(CHECKPOINT_KEY)
        theirs = state.get("module") if isinstance(state, dict) else None
        if theirs is None:
            raise CheckpointMismatchError(
                f"--ckpt_path {path} was not written by a hyperlit module (no '{CHECKPOINT_KEY}' entry), so the "
                f"configured model {own} ({class_path}) cannot load it"
            )
        if theirs != own:
            hparams = ckpt.get("hyper_parameters")
            saved = hparams.get("_class_path") if isinstance(hparams, dict) else None
            where = f" ({saved})" if saved else ""
            also = f", or start a new {own} from its weights with --init_from" if subcommand == "fit" else ""
            raise CheckpointMismatchError(
                f"--ckpt_path {path} was written by {theirs}{where}, but the configured model is {own} "
                f"({class_path}): use the configuration of the run that wrote it (the config.yaml in its log "
                f"folder){also}"
            )

    def _merge_checkpoint_hparams(self, ckpt: dict[str, Any], path: str, subcommand: str) -> None:
        """Lightning's ``_parse_ckpt_path``: the checkpoint's saved model hyperparameters override the config's."""
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except argparse.ArgumentError as err:
            raise ConfigurationError(f"the model hyperparameters saved in {path} do not parse: {err}") from err
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyperparameters saved in {path} failed!\n")
            raise

    def _resolve_last(self, subcommand: str) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` under the log root (Lightning looks in this run's folder)."""
        if self.config_init[subcommand].get("ckpt_path") != "last":
            return
        last = find_last_checkpoint(self.trainer)
        if last is not None:
            self.config_init[subcommand]["ckpt_path"] = last
        elif subcommand != "fit":  # fit starts afresh (set-and-forget restarts); evaluating untrained weights is wrong
            raise ConfigurationError(
                f"--ckpt_path last: no last.ckpt under {self.trainer.default_root_dir} (or the logger's version "
                "folders); give the checkpoint file"
            )

    # -- building --------------------------------------------------------------------------------------------
    @override
    def instantiate_classes(self) -> None:
        """Instantiate, then give a hyper-stream model a DataModule that serves the stream (see module docstring)."""
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            root = _root_cause(err)  # jsonargparse re-raises a constructor's error inside its own ValueError
            if isinstance(root, (ConfigurationError, CheckpointMismatchError)) or _from_datamodules(root):
                if root is err:
                    raise
                raise root from None  # the DataModule's or the checkpoint's own error, with its own traceback
            if not isinstance(root, (ValueError, MisconfigurationException)):
                raise
            who = _raising_component(root)
            raise ConfigurationError(f"{who}: {root}" if who else _condense_argument_error(str(err))) from err
        if (
            self.subcommand in (None, "fit")
            and self.datamodule is not None
            and uses_hyper_stream(self.model)
            and not serves_hyper_stream(self.datamodule)
        ):
            self.datamodule = HyperStreamDataModule(self.datamodule)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, plus a ``last.ckpt``-keeping ``ModelCheckpoint`` (``fit``), a ``PredictionWriter``
        (``predict``) and atomic checkpoint writes."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        added: list[pl.Callback] = []
        checkpointing = config.get("enable_checkpointing") is not False
        if self.subcommand == "fit" and checkpointing and not any(isinstance(cb, Checkpoint) for cb in callbacks):
            added.append(ModelCheckpoint(save_last=True))  # Lightning's default keeps no last.ckpt
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            from hyperlit.callbacks.prediction_writer import PredictionWriter

            added.append(PredictionWriter())
        if added:
            kwargs["callbacks"] = [*callbacks, *added]
        trainer = super().instantiate_trainer(**kwargs)
        plugins = config.get("plugins")
        use_atomic_checkpoint_io(trainer, plugins if isinstance(plugins, (list, tuple)) else [plugins])
        return trainer

    # -- running ---------------------------------------------------------------------------------------------
    def before_fit(self) -> None:
        """``--ckpt_path last`` across versions, and ``--init_from``'s weights."""
        self._resolve_last("fit")
        init_from = self.config[self.subcommand].get("init_from")
        if init_from:
            from hyperlit.checkpoint import load_weights

            load_weights(self.model, init_from)

    def before_validate(self) -> None:
        """``--ckpt_path last`` across versions."""
        self._resolve_last("validate")

    def before_test(self) -> None:
        """``--ckpt_path last`` across versions."""
        self._resolve_last("test")

    def before_predict(self) -> None:
        """``--ckpt_path last`` across versions; the predictions go to the writer, not (a second time) into memory."""
        self._resolve_last("predict")
        if self.config_init["predict"].get("return_predictions") is None:
            self.config_init["predict"]["return_predictions"] = False


# -- the console script ----------------------------------------------------------------------------------------
def _subcommand(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in LightningCLI.subcommands()), None)


def resolve_bare_help(argv: Sequence[str]) -> list[str]:
    """``--model NAME --model.help`` (a bare ``.help``) as ``--model.help NAME``, likewise for ``--data``.

    jsonargparse reads a bare ``--model.help`` as the help of the base class the CLI is bound to, whatever
    ``--model`` chose; the class given earlier on the command line is what the user asks about.
    """
    out = list(argv)
    for key in ("model", "data"):
        chosen = None
        for i, arg in enumerate(out):
            if arg == f"--{key}" and i + 1 < len(out):
                chosen = out[i + 1]
            elif arg.startswith(f"--{key}="):
                chosen = arg.split("=", 1)[1]
            elif arg == f"--{key}.help" and (i + 1 == len(out) or out[i + 1].startswith("-")):
                if chosen is not None and not chosen.endswith((".yaml", ".yml", ".json", "}")):
                    out.insert(i + 1, chosen)
                break
    return out


_ARGPARSE_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|Given value type: .*"
    r"|- Expected a <class 'NoneType'>)"
)
_MAX_GIVEN = 60


def _condense_argument_error(text: str) -> str:
    """jsonargparse's nested message as one line: the key path with the classes tried, the innermost problem(s)
    and the given value (``Parser key "model" ... Option 'hiden' is not accepted`` ->
    ``model (hyperlit.tuning.SelfTuningModule) > net (hyperlit.models.StnMLP): Option 'hiden' is not accepted``).
    """
    path: list[str] = []
    leaves: list[str] = []
    given = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or _ARGPARSE_NOISE.fullmatch(line):
            continue
        line = line.removeprefix("- ")
        if line.startswith("Given value: "):
            given = line.removeprefix("Given value: ")
        elif key := re.fullmatch(r'Parser key "(.+)":', line):
            path.append(key.group(1))
        elif cls := re.fullmatch(r"Problem with given class_path '(.+)':", line):
            if path:
                path[-1] += f" ({cls.group(1)})"
            else:
                path.append(f"({cls.group(1)})")
        else:
            leaves.append(line)
    if not leaves:
        return text
    message = (" > ".join(path) + ": " if path else "") + "; ".join(leaves)
    if given is not None:
        short = given if len(given) <= _MAX_GIVEN else given[: _MAX_GIVEN - 3] + "..."
        message += f" (given: {short})"
    return message


def _short_message(err: BaseException) -> str:
    """``err``'s message in at most a few lines: the first lines, or the head and the tail of a long one."""
    from datamodules.base import DatasetNotFoundError

    if isinstance(err, DatasetNotFoundError):  # files and hint: what the user acts on (the layout: full trace)
        missing = ", ".join(err.missing[:4]) + (", ..." if len(err.missing) > 4 else "")
        hint = str(err).strip().splitlines()[-1]
        return f"DatasetNotFoundError: {err.dataset} not found in {err.root} (missing: {missing})\n{hint}"
    text = str(err).strip() or type(err).__name__
    if isinstance(err, argparse.ArgumentError):
        text = _condense_argument_error(text)
    elif not isinstance(err, ConfigurationError):
        text = f"{type(err).__name__}: {text}"
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if len(lines) > _MAX_MESSAGE_LINES:
        lines = [lines[0], f"  ... ({len(lines) - 2} more lines) ...", lines[-1]]
    return "\n".join(lines)


def _fail(err: BaseException, code: int, argv: Sequence[str]) -> NoReturn:
    sub = _subcommand(argv)
    prog = f"hyperlit {sub}" if sub else "hyperlit"
    from datamodules.base import DatasetNotFoundError

    help_hint = f"`{prog} --help` lists the options; " if code == 2 else ""
    shows = "the expected layout and the full trace" if isinstance(err, DatasetNotFoundError) else "the full trace"
    sys.stderr.write(f"{prog} failed ({help_hint}HYPERLIT_TRACEBACK=1 shows {shows})\n")
    sys.stderr.write(f"error: {_short_message(err)}\n")
    sys.exit(code)


def main(args: Sequence[str] | None = None, *, short_errors: bool | None = None) -> None:
    """Entry point of the ``hyperlit`` console script and ``python -m hyperlit``.

    With ``short_errors`` (default: when ``args`` is ``None``, i.e. the console script) configuration and data errors
    end in a short ``error: ...`` message on stderr and exit code 2 (command line or configuration) or 1 (data set
    or checkpoint); ``HYPERLIT_TRACEBACK=1`` lets the full output and trace through. Called from Python with
    ``args``, the exceptions propagate (jsonargparse's usage errors still exit with code 2).
    """
    from datamodules.base import DataFormatError, DatasetNotFoundError

    import_all()
    if args is None:  # the console script: LightningCLI reads sys.argv (rewritten in place, no args-and-argv warning)
        sys.argv[1:] = resolve_bare_help(sys.argv[1:])
        cli_args = None
    else:
        cli_args = resolve_bare_help(args)
    if short_errors is None:
        short_errors = args is None
    if not short_errors or os.environ.get("HYPERLIT_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no"):
        HyperlitCLI(args=cli_args)
        return
    no_exit = {"exit_on_error": False, **{s: {"exit_on_error": False} for s in LightningCLI.subcommands()}}
    argv = cli_args if cli_args is not None else sys.argv[1:]
    try:
        HyperlitCLI(args=cli_args, parser_kwargs=no_exit)
    except (argparse.ArgumentError, ConfigurationError) as err:
        _fail(err, 2, argv)
    except (CheckpointMismatchError, DatasetNotFoundError, DataFormatError) as err:
        _fail(err, 1, argv)


if __name__ == "__main__":  # pragma: no cover
    main()
