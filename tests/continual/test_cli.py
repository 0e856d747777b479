"""The continual-learning configs parse with the ``hyperlit`` CLI (optimizers shown and overridable from the
command line), and one runs end to end in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperlit.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cl_permuted_mnist", "cl_split_mnist", "cl_regression1d"])
def test_config_parses(name: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "examples" / f"{name}.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "hyperlit.continual.HyperContinualModule"
    assert cfg["data"]["class_path"].startswith("datamodules.") and cfg["data"]["class_path"].count(".") == 1
    model = cfg["model"]["init_args"]
    assert model["num_tasks"] == cfg["data"]["init_args"]["num_tasks"]
    for name in ("hnet_optimizer", "emb_optimizer"):
        assert model[name]["class_path"] == "torch.optim.Adam"
        assert model[name]["init_args"]["betas"] == [0.9, 0.999]
    assert model["hnet_optimizer"]["init_args"]["lr"] == model["emb_optimizer"]["init_args"]["lr"]


@pytest.mark.parametrize("prefix", ["--model.", "--model.init_args."])
def test_optimizer_overridden_from_the_command_line(prefix: str, capsys) -> None:
    args = [f"{prefix}hnet_optimizer", "torch.optim.AdamW", f"{prefix}hnet_optimizer.lr", "3e-4"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "examples" / "cl_split_mnist.yaml"), *args, "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["hnet_optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["hnet_optimizer"]["init_args"]["lr"] == 3e-4
    assert model["emb_optimizer"]["class_path"] == "torch.optim.Adam"


def test_regression_config_runs(tmp_path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "hyperlit",
        "fit",
        "--config",
        str(ROOT / "examples" / "cl_regression1d.yaml"),
        "--data.init_args.steps_per_task",
        "3",
        "--model.emb_optimizer",
        "torch.optim.AdamW",
        "--model.emb_optimizer.lr",
        "3e-4",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr  # the table comes through Lightning's logger (rank_zero_info)
    assert "[accuracy matrix, final]" in text
    table = text.split("[accuracy matrix, final]")[1].splitlines()
    last = table[5].split("|")  # header, rule, rows 0, 1, 2
    assert last[0].strip() == "2" and "-" not in last[1].split()  # the last row is complete
    assert (tmp_path / "accuracy_matrix_final.png").is_file()
