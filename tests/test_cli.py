"""The ``hyperlit`` command line: help, --print_config, and clear errors (through subprocesses where it matters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def test_print_config_of_quickstart(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "hyperlit.tuning.SelfTuningModule"
    assert config["data"]["class_path"] == "datamodules.digits.DigitsDataModule"
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
    assert "train-images-idx3-ubyte.gz" in result.stderr
    assert "download=True" in result.stderr
