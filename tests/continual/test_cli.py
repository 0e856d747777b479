"""The continual-learning configs parse with the ``hyperlit`` CLI, and one runs end to end in a subprocess."""

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
    assert cfg["model"]["class_path"] == "hyperlit.continual.module.HyperContinualModule"
    assert cfg["model"]["init_args"]["num_tasks"] == cfg["data"]["init_args"]["num_tasks"]


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
    assert "[accuracy matrix, final]" in out.stdout
    table = out.stdout.split("[accuracy matrix, final]")[1].splitlines()
    last = table[5].split("|")  # header, rule, rows 0, 1, 2
    assert last[0].strip() == "2" and "-" not in last[1].split()  # the last row is complete
    assert (tmp_path / "accuracy_matrix_final.png").is_file()
