"""``hyperlit fit --trainer.strategy=ddp --trainer.devices=2 --trainer.accelerator=cpu`` subprocesses (Lightning
relaunches the command for rank 1) for the STN language model, PHN, the best-response hypernetwork and the
continual-learning hypernetwork, each on tiny generated data in the real on-disk formats.

Each run must exit 0; its step counters (read back from ``last.ckpt``) must show that every rank trained on its
own shard (the global step count is the single-process count / 2); its λ / hypernetwork weights must be finite and
have moved between the epoch checkpoints; and the module's validation metric must be in rank 0's ``metrics.csv``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from tests.datamodules.ptb_fakedata import write_fake_ptb
from tests.datamodules.tabular_fakedata import write_fake_adult
from tests.fakedata import write_fake_mnist

# each run: two interpreters' imports plus a few steps; 74-103 s at load 7-9 on the 2 shared cores (about 23 s of
# CPU). STN LM and PHN run by default, best-response and continual (63-66 s at load 9) with the slow tests.
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _fit(tmp_path: Path, model: dict[str, Any], data: dict[str, Any], **trainer: Any) -> Path:
    """Run ``hyperlit fit`` with DDP on 2 CPU processes; return the checkpoint folder."""
    ckpt_dir = tmp_path / "ckpt"
    config = {
        "seed_everything": 0,
        "model": model,
        "data": data,
        "trainer": {
            "strategy": "ddp",
            "devices": 2,
            "accelerator": "cpu",
            "max_epochs": 2,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(ckpt_dir),
                        "filename": "{epoch}",
                        "save_top_k": -1,
                        "every_n_epochs": 1,
                        "save_last": True,
                    },
                },
                *trainer.pop("callbacks", []),
            ],
            **trainer,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "hyperlit", "fit", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "GLOBAL_RANK: 1" in out, out[-4000:]  # Lightning did launch the second process
    return ckpt_dir


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _metrics(tmp_path: Path) -> pd.DataFrame:
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1, files  # rank 0 only
    return pd.read_csv(files[0])


def _moved_and_finite(ckpt_dir: Path, prefix: str) -> None:
    first, last = _state(ckpt_dir / "epoch=0.ckpt"), _state(ckpt_dir / "last.ckpt")
    keys = [k for k in last if k.startswith(prefix) and last[k].is_floating_point()]
    assert keys, prefix
    assert all(torch.isfinite(last[k]).all() for k in keys)
    assert any(not torch.equal(first[k], last[k]) for k in keys), f"{prefix}* did not change in epoch 2"


@pytest.mark.slow  # ~35 s; the STN LM under DDP is also checked by tests/distributed/test_ddp_stn_lm.py
def test_cli_ddp_stn_language_model(tmp_path: Path) -> None:
    from hyperlit.tuning.stn_lm import StnLanguageModelModule
    from tests.datamodules.ptb_fakedata import WORDS

    root = write_fake_ptb(tmp_path / "data", n_train=120, n_valid=30, n_test=10)
    model = {
        "class_path": "hyperlit.tuning.StnLanguageModelModule",
        "init_args": {
            "vocab_size": len(WORDS) + 1,
            "embedding_size": 8,
            "hidden_size": 8,
            "warmup_epochs": 0,
            "warmup_steps": 2,
            "phi_optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 2.0}},
            "hyper_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05}},
        },
    }
    data = {
        "class_path": "datamodules.PTBDataModule",
        "init_args": {
            "data_dir": str(root),
            "cache_dir": str(tmp_path / "hf"),
            "batch_size": 2,
            "bptt": 6,
            "eval_batch_size": 2,
            "test_batch_size": 1,
        },
    }
    ckpt_dir = _fit(tmp_path, model, data, limit_train_batches=5, limit_val_batches=3)
    loaded = StnLanguageModelModule.load_from_checkpoint(ckpt_dir / "last.ckpt")
    # 5 windows per epoch on each rank (its own 2 of 4 contiguous streams), 2 epochs
    assert int(loaded.phi_steps) == 10 and int(loaded.warmup_phi_steps) == 2 and int(loaded.hyper_steps_done) == 4
    lam = loaded.space.unconstrained.detach()
    assert torch.isfinite(lam).all()
    assert not torch.allclose(lam, torch.full_like(lam, math.log(0.05 / 0.95)))  # λ moved from its init (0.05)
    _moved_and_finite(ckpt_dir, "net.")
    metrics = _metrics(tmp_path)
    ppl = metrics["val/ppl"].dropna()
    assert len(ppl) == 2 and ((ppl > 1) & (ppl < 1e4)).all()
    schedules = list(tmp_path.rglob("hparam_schedule.csv"))
    assert len(schedules) == 1 and len(schedules[0].read_text().strip().splitlines()) == 1 + 4


def test_cli_ddp_pareto_hypernetwork(tmp_path: Path) -> None:
    write_fake_adult(tmp_path / "data", n_train=320, n_test=80)
    model = {
        "class_path": "hyperlit.pareto.ParetoHyperNetModule",
        "init_args": {
            "objectives": ["bce", "fpr_gap", "fnr_gap"],
            "solver": "epo",
            "target_hidden": [8],
            "hnet_hidden": [16],
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}},
            "test_ray_partitions": 4,
        },
    }
    data = {
        "class_path": "datamodules.AdultDataModule",
        "init_args": {"data_dir": str(tmp_path / "data"), "verify_row_counts": False, "batch_size": 32},
    }
    ckpt_dir = _fit(tmp_path, model, data)
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    # adult.data splits 7:1 → 280 training rows; 140 per rank → 5 batches of 32 per epoch (one process: 9)
    assert int(last["state_dict"]["ray_step"]) == 10 and int(last["state_dict"]["epo_solves"]) == 10
    _moved_and_finite(ckpt_dir, "hnet.")
    hv = _metrics(tmp_path)["val/hv"].dropna()
    assert len(hv) == 2 and ((hv > 0) & (hv <= 1)).all()


@pytest.mark.slow
def test_cli_ddp_best_response(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "data", n_train=200, n_test=40)
    model = {
        "class_path": "hyperlit.tuning.BestResponseModule",
        "init_args": {
            "mode": "local",
            "input_dim": 784,
            "hidden_sizes": [],
            "num_classes": 10,
            "init_log_penalty": -1.0,
            "sample_std": 0.5,
            "hnet_hidden": [],
            "loss": "mse",
            "warmup_steps": 1,
            "phi_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            "hyper_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05}},
        },
    }
    data = {
        "class_path": "datamodules.MNISTDataModule",
        "init_args": {"data_dir": str(tmp_path / "data"), "train_size": 40, "val_size": 40, "batch_size": 10},
    }
    ckpt_dir = _fit(tmp_path, model, data)
    last = _state(ckpt_dir / "last.ckpt")
    # 40 training images, 20 per rank → 2 batches of 10 per epoch (one process: 4); one λ-step per φ-step
    assert int(last["phi_steps"]) == 4 and int(last["warmup_phi_steps"]) == 1 and int(last["hyper_steps_done"]) == 3
    lam = last["space.unconstrained"]
    assert torch.isfinite(lam).all() and not torch.allclose(lam, torch.tensor(-1.0))
    _moved_and_finite(ckpt_dir, "hnet.")
    assert "val/loss" in _metrics(tmp_path).columns


@pytest.mark.slow
def test_cli_ddp_continual(tmp_path: Path) -> None:
    model = {
        "class_path": "hyperlit.continual.HyperContinualModule",
        "init_args": {
            "num_tasks": 2,
            "input_dim": 1,
            "output_dim": 1,
            "hidden": [8],
            "task_type": "regression",
            "hnet_hidden": [8],
            "emb_dim": 2,
            "beta": 0.05,
            "hnet_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            "emb_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    }
    data = {
        "class_path": "datamodules.Regression1DDataModule",
        "init_args": {"num_tasks": 2, "num_train": 32, "num_test": 10, "batch_size": 4, "steps_per_task": 6},
    }
    # the task sampler shards every global batch itself (Lightning's sampler would reshuffle it)
    ckpt_dir = _fit(tmp_path, model, data, use_distributed_sampler=False)
    last = _state(ckpt_dir / "last.ckpt")
    assert int(last["current_task"]) == 1 and int(last["total_steps"]) == 12  # 6 global steps per task
    acc = last["acc_matrix"].view(2, 2)
    assert torch.isfinite(acc[0, 0]) and torch.isfinite(acc[1]).all() and torch.isnan(acc[0, 1])
    _moved_and_finite(ckpt_dir, "hnet.")
    first = _state(ckpt_dir / "epoch=0.ckpt")
    assert not torch.equal(first["task_embeddings"][1], last["task_embeddings"][1])  # task 1's embedding trained
