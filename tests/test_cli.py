"""The ``hyperlit`` command line: help, --print_config, and clear errors (through subprocesses where it matters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hyperlit", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_fit_help_lists_modules_and_datamodules(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("SelfTuningModule", "DigitsDataModule", "MNISTDataModule", "--init_from", "--ckpt_path"):
        assert name in out, name
    assert "--optimizer" not in out  # our modules own their optimizers


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--model", "SelfTuningModule", "--model.help"],
        ["fit", "--model=SelfTuningModule", "--model.help"],
        ["fit", "--model.help", "SelfTuningModule"],
    ],
)
def test_model_help_shows_the_chosen_module(args, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.net NET" in out  # SelfTuningModule's own arguments, not the base class's
    assert "--model.hyperparameters" in out


def test_print_config_of_quickstart(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "hyperlit.tuning.SelfTuningModule"
    assert config["data"]["class_path"] == "datamodules.DigitsDataModule"
    assert config["trainer"]["max_epochs"] >= 1


def test_wrong_config_key_is_a_clear_error(tmp_path) -> None:
    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["init_args"]["hyper_lerning_rate"] = 0.1  # typo'd key
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _run("fit", "--config", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "hyper_lerning_rate" in result.stderr


def test_datamodule_on_empty_directory_is_a_clear_error(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(
        "fit",
        "--config",
        str(QUICKSTART),
        "--model.init_args.net.init_args.in_features",
        "784",
        "--data",
        "datamodules.mnist.MNISTDataModule",
        "--data.data_dir",
        str(empty),
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "DatasetNotFoundError" in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr
    assert "HYPERLIT_TRACEBACK=1 shows the expected layout" in result.stderr
    assert "download=True" in result.stderr


def test_cli_is_bound_to_the_hyperlit_base_and_exported() -> None:
    import hyperlit
    from hyperlit.base import HyperlitModule
    from hyperlit.cli import HyperlitCLI

    assert hyperlit.HyperlitCLI is HyperlitCLI and hyperlit.HyperlitModule is HyperlitModule
    cli = HyperlitCLI(args=["--config", str(QUICKSTART), "--trainer.logger", "false"], run=False)
    assert cli.model_class is HyperlitModule and cli.subclass_mode_model and cli.subclass_mode_data
    assert isinstance(cli.model, HyperlitModule)


def test_optimizer_given_on_the_command_line(capsys) -> None:
    """``--model.phi_optimizer torch.optim.AdamW --model.phi_optimizer.lr 3e-4`` replaces the YAML's SGD, and an
    ``.lr`` alone edits the configured optimizer; ``--print_config`` shows both."""
    with pytest.raises(SystemExit):
        main(
            [
                "fit", "--config", str(QUICKSTART), "--model.phi_optimizer", "torch.optim.AdamW",
                "--model.phi_optimizer.lr", "3e-4", "--model.hyper_optimizer.lr", "0.01", "--print_config",
            ]
        )  # fmt: skip
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["phi_optimizer"]["class_path"] == "torch.optim.AdamW"
    assert init["phi_optimizer"]["init_args"]["lr"] == 3e-4
    assert init["hyper_optimizer"] == {
        "class_path": "torch.optim.Adam",
        "init_args": init["hyper_optimizer"]["init_args"],
    }
    assert init["hyper_optimizer"]["init_args"]["lr"] == 0.01
    assert init["sigma_optimizer"]["init_args"]["lr"] == 0.03  # the YAML's


class Record(pl.Callback):
    """Remembers what the CLI handed to the Trainer (for the tests of this file)."""

    seen: ClassVar[dict[str, Any]] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Record.seen.update(
            datamodule=trainer.datamodule,
            optimizers=list(trainer.optimizers),
            hyper_steps=int(pl_module.hyper_steps_done),
        )


class PlainTrainVal(pl.LightningDataModule):
    """A user's DataModule with only train/val loaders (64 features, 10 classes, like the quickstart's digits)."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:64], self.y[:64]), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[64:], self.y[64:]), batch_size=self.batch_size)


def test_fit_with_another_optimizer_and_a_plain_datamodule(tmp_path) -> None:
    """The acceptance run: the quickstart with AdamW for φ, one epoch, on a user's train/val DataModule, which
    ``hyperlit fit`` wraps so that its validation loader serves the λ-steps."""
    from hyperlit.streams import HyperStreamDataModule

    Record.seen.clear()
    main(
        [
            "fit", "--config", str(QUICKSTART), "--model.phi_optimizer", "torch.optim.AdamW",
            "--model.warmup_epochs", "0", "--model.warmup_steps", "2", "--data", f"{__name__}.PlainTrainVal",
            "--data.batch_size", "16",
            "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+", f"{__name__}.Record",
        ]
    )  # fmt: skip
    dm = Record.seen["datamodule"]
    assert isinstance(dm, HyperStreamDataModule) and isinstance(dm.datamodule, PlainTrainVal)
    phi, lam, sigma = Record.seen["optimizers"]
    assert (
        isinstance(phi, torch.optim.AdamW) and isinstance(lam, torch.optim.Adam) and isinstance(sigma, torch.optim.Adam)
    )
    assert Record.seen["hyper_steps"] == 1  # 4 batches: 2 warm-up φ-steps, then T_train=2 : T_val=1


# -- short error output: the message last, a hint, a non-zero exit code ------------------------------------------------
def _short_error(capsys: pytest.CaptureFixture[str], code: int, *args: str) -> list[str]:
    with pytest.raises(SystemExit) as info:
        main(list(args), short_errors=True)
    assert info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert 2 <= len(lines) <= 5, lines
    assert "HYPERLIT_TRACEBACK=1" in lines[0]
    return lines


def test_bad_argument_value_is_a_short_error(capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYPERLIT_TRACEBACK", raising=False)
    lines = _short_error(capsys, 2, "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "many")
    assert lines[0].startswith("hyperlit fit failed (`hyperlit fit --help` lists the options;")
    assert lines[-1] == "error: trainer.max_epochs: Expected a <class 'int'> (given: many)"


def test_module_constructor_error_names_the_class(capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYPERLIT_TRACEBACK", raising=False)
    lines = _short_error(capsys, 2, "fit", "--config", str(QUICKSTART), "--model.train_steps", "-1")
    assert lines[-1] == "error: SelfTuningModule: need train_steps >= 0 and hyper_steps >= 1, got -1, 1"


def test_missing_data_directory_is_a_short_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYPERLIT_TRACEBACK", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _short_error(
        capsys, 1, "fit", "--config", str(QUICKSTART), "--model.init_args.net.init_args.in_features", "784",
        "--data", "datamodules.mnist.MNISTDataModule", "--data.data_dir", str(empty), "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert lines[0] == "hyperlit fit failed (HYPERLIT_TRACEBACK=1 shows the expected layout and the full trace)"
    assert lines[-2].startswith(f"error: DatasetNotFoundError: MNIST not found in {empty} (missing: MNIST/raw/train-")
    assert "t10k-labels-idx1-ubyte" in lines[-2]
    assert "download=True" in lines[-1]


def test_hyperlit_traceback_lets_the_full_error_through(monkeypatch) -> None:
    monkeypatch.setenv("HYPERLIT_TRACEBACK", "1")
    with pytest.raises(SystemExit) as info:  # jsonargparse's own usage + error output
        main(["fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "many"], short_errors=True)
    assert info.value.code == 2
    with pytest.raises(ValueError, match=r"need train_steps >= 0"):
        main(["fit", "--config", str(QUICKSTART), "--model.train_steps", "-1"], short_errors=True)
