"""``hyperlit fit --trainer.strategy=ddp --trainer.devices=2`` as a subprocess (Lightning relaunches the command
for rank 1): the quickstart STN config trains on 2 CPU processes, exits 0, and only rank 0 prints the tuned
hyperparameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two interpreters' imports: 25-27 s

ROOT = Path(__file__).resolve().parents[2]


def test_cli_fit_with_ddp_on_two_cpu_processes(tmp_path) -> None:
    cmd = [
        sys.executable, "-m", "hyperlit", "fit", "--config", "examples/quickstart.yaml",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.warmup_epochs", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("Tuned hyperparameters:") == 1, out[-3000:]
    assert "dropout0=" in out
    # rank 0 wrote the schedule next to its logger: 4 φ-steps after the warm-up epoch, T_train=2 → 2 λ-steps
    schedules = list(tmp_path.rglob("hparam_schedule.csv"))
    assert len(schedules) == 1
    assert len(schedules[0].read_text().strip().splitlines()) == 1 + 2
