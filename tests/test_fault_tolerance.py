"""Kill ``hyperlit fit`` with SIGKILL at a random training step, restart it with ``--ckpt_path last``, and check that
the final state equals an uninterrupted run's, for every module.

Each test: (1) an uninterrupted reference run (in this process, one torch thread, through the same CLI entry point);
(2) a ``python -m hyperlit fit`` subprocess killed at a seeded random training batch (printed) or half-way through
a checkpoint write; (3) a subprocess that resumes it with ``--ckpt_path last``. Compared exactly: every weight and
buffer (λ, σ, hypernetwork weights, step counters, the continual-learning accuracy matrix, stored targets), every
optimizer state, the λ schedule (STN, best response) and the front at the evaluation rays (PHN). The resumed run
must also train exactly the batches the killed run had not checkpointed: no work lost, none repeated.

Subprocesses cost 15-30 s each (imports) on the shared CPU; the STN and continual-learning tests run by default,
best response and PHN are ``slow``.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from datamodules.base import HyperlitDataModule, ResumableDataLoader, SeededRandomSampler
from datamodules.digits import DigitsDataModule
from hyperlit.checkpoint_io import AtomicCheckpointIO, is_temporary_checkpoint
from hyperlit.cli import main
from hyperlit.models.stn_cnn import StnMLP
from hyperlit.tuning import SelfTuningModule
from tests.datamodules.tabular_fakedata import write_fake_adult
from tests.fault_tolerance_helpers import final_state

ROOT = Path(__file__).resolve().parents[1]
HELPERS = "tests.fault_tolerance_helpers"


# -- running the CLI -----------------------------------------------------------------------------------------------
def _write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _with(config: dict[str, Any], root: Path, callbacks: list[dict[str, Any]], **trainer: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(yaml.safe_dump(config))  # deep copy
    cfg["trainer"] = {
        **cfg.get("trainer", {}),
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer,
    }
    cfg["trainer"]["callbacks"] = [*cfg["trainer"].get("callbacks", []), *callbacks]
    return cfg


def _dump(path: Path) -> dict[str, Any]:
    return {"class_path": f"{HELPERS}.DumpFinalState", "init_args": {"path": str(path)}}


def _start(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    """Start ``python -m hyperlit fit`` (one thread), its output going to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "hyperlit", "fit", "--config", str(config), *extra]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    return proc.wait(timeout=600), log.read_text()


def _in_process(config: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses (OMP_NUM_THREADS=1): the same reduction order
    try:
        main(["fit", "--config", str(config)])
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(tmp_path: Path, config: dict[str, Any], kill: dict[str, Any]) -> dict[str, Any]:
    """Reference run (in this process, while the killed run starts), killed run, resumed run.

    Returns the reference and resumed final states, the killed run's output and the temporary files the kill left.
    """
    run = tmp_path / "run"
    killed_cbs, killed_trainer = [_dump(tmp_path / "never.pt")], {}
    if "batch" in kill:
        killed_cbs.append({"class_path": f"{HELPERS}.KillAtBatch", "init_args": {"batch": kill["batch"]}})
    else:
        killed_trainer["plugins"] = [{"class_path": f"{HELPERS}.KillDuringSave", "init_args": {"save": kill["save"]}}]
    killed_cfg = _write_config(tmp_path / "killed.yaml", _with(config, run, killed_cbs, **killed_trainer))
    killed = _start(killed_cfg, tmp_path / "killed.log")
    _in_process(
        _write_config(tmp_path / "reference.yaml", _with(config, tmp_path / "ref", [_dump(tmp_path / "ref.pt")]))
    )
    reference = torch.load(tmp_path / "ref.pt", weights_only=False)

    code, out = _finish(killed, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, out[-3000:]
    assert not (tmp_path / "never.pt").exists()
    orphans = sorted(p for p in run.rglob("*") if is_temporary_checkpoint(p))
    lasts = sorted(run.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert lasts, f"the killed run left no last.ckpt: {sorted(p.name for p in run.rglob('*'))}"
    progress = torch.load(lasts[-1], weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    trained_before = int(progress["total"]["processed"])  # batches the checkpoint covers

    resumed_cfg = _write_config(tmp_path / "resumed.yaml", _with(config, run, [_dump(tmp_path / "res.pt")]))
    code, out_resumed = _finish(
        _start(resumed_cfg, tmp_path / "resumed.log", "--ckpt_path", "last"), tmp_path / "resumed.log"
    )
    assert code == 0, out_resumed[-3000:]
    assert f"Restoring states from the checkpoint path at {lasts[-1]}" in out_resumed, out_resumed[-3000:]
    resumed = torch.load(tmp_path / "res.pt", weights_only=False)
    # no work lost, none repeated: the resumed run trains exactly the batches its checkpoint did not cover
    assert 0 < trained_before < reference["batches_here"]
    assert resumed["batches_here"] == reference["batches_here"] - trained_before
    return {"reference": reference, "resumed": resumed, "killed_output": out, "orphans": orphans}


def _assert_same_state(reference: dict[str, Any], resumed: dict[str, Any]) -> None:
    assert resumed["global_step"] == reference["global_step"]
    assert resumed["epoch"] == reference["epoch"]
    ref_sd, res_sd = reference["state_dict"], resumed["state_dict"]
    assert ref_sd.keys() == res_sd.keys()
    for key, value in ref_sd.items():
        torch.testing.assert_close(res_sd[key], value, rtol=0, atol=0, equal_nan=True, msg=lambda m, k=key: f"{k}: {m}")
    assert len(resumed["optimizers"]) == len(reference["optimizers"])
    for opt_ref, opt_res in zip(reference["optimizers"], resumed["optimizers"]):
        assert opt_ref["param_groups"] == opt_res["param_groups"]
        for pid, st in opt_ref["state"].items():
            for name, value in st.items():
                torch.testing.assert_close(opt_res["state"][pid][name], value, rtol=0, atol=0, msg=f"{pid}.{name}")
    assert resumed["generators"].keys() == reference["generators"].keys()
    for name, gen_state in reference["generators"].items():
        assert torch.equal(resumed["generators"][name], gen_state), name
    for key in ("schedule", "front"):
        if key in reference:
            assert key in resumed
            if key == "front":
                torch.testing.assert_close(resumed[key]["losses"], reference[key]["losses"], rtol=0, atol=0)
                assert resumed[key]["hv"] == reference[key]["hv"]
            else:
                assert resumed[key] == reference[key]


def _kill_point(name: str, low: int, high: int, what: str = "training batch") -> int:
    """A seeded random integer in [low, high] (printed, so a failure can be replayed; HYPERLIT_FT_SEED varies it)."""
    seed = int(os.environ.get("HYPERLIT_FT_SEED", "0"))
    value = random.Random(f"{name}-{seed}").randint(low, high)
    print(f"{name}: SIGKILL at {what} {value} (HYPERLIT_FT_SEED={seed})")
    return value


# -- mid-epoch resume without subprocesses ---------------------------------------------------------------------------
def test_sampler_resume_skips_one_pass_of_that_epoch_only() -> None:
    sampler = SeededRandomSampler(10, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume(2, 3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # a cycled stream's next pass over the epoch is whole
    sampler.resume(5, 3)
    sampler.set_epoch(3)
    assert len(list(sampler)) == 10  # not yet that epoch: the skip waits
    sampler.set_epoch(5)
    assert len(list(sampler)) == 7


def test_loader_resumes_a_cycled_stream_modulo_its_length() -> None:
    dm = HyperlitDataModule(data_dir=".", batch_size=2)
    loader = dm._loader(TensorDataset(torch.arange(10)), shuffle=True)  # 5 batches
    assert isinstance(loader, ResumableDataLoader) and len(loader) == 5
    loader.sampler.set_epoch(1)
    batches = [b[0].tolist() for b in loader]
    loader.load_state_dict({"epoch": 1, "consumed_batches": 7})  # 7 batches of a cycled 5-batch stream: 2 in
    assert [b[0].tolist() for b in loader] == batches[2:]
    assert not isinstance(dm._loader(TensorDataset(torch.arange(10)), shuffle=False), ResumableDataLoader)


def _stn() -> SelfTuningModule:
    net = StnMLP(in_features=64, hidden=(32,), num_classes=10)
    return SelfTuningModule(
        net,
        warmup_epochs=1,
        phi_optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        hyper_optimizer=functools.partial(torch.optim.Adam, lr=0.03),
        sigma_optimizer=functools.partial(torch.optim.Adam, lr=0.03),
        plot_schedule=False,
    )


def _stn_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stn_resumes_exactly_from_every_mid_epoch_checkpoint(tmp_path, one_thread) -> None:
    """In-process: a checkpoint after every training batch (48); resuming from every third one (warm-up and
    λ-phase, every position in the 5-batch hyper stream's cycle, an epoch's last batch) ends in the uninterrupted
    run's state. ``HYPERLIT_FT_ALL=1`` resumes from all 48."""
    pl.seed_everything(0)
    model = _stn()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = _stn_trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    reference = final_state(trainer, model)
    paths = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    positions = {(c["epoch"], c["consumed_batches"]) for c in (torch.load(p)["DigitsDataModule"] for p in paths)}
    assert len(paths) == len(positions) == 48 and {e for e, _ in positions} == {0, 1, 2}
    chosen = paths if os.environ.get("HYPERLIT_FT_ALL") else paths[::3]
    chosen_positions = [
        (c["epoch"], c["consumed_batches"]) for c in (torch.load(p)["DigitsDataModule"] for p in chosen)
    ]
    assert {b % 5 for _, b in chosen_positions} == set(range(5))  # every position in the hyper stream's cycle
    assert (0, 16) in chosen_positions and {e for e, _ in chosen_positions} == {0, 1, 2}
    for path in chosen:
        pl.seed_everything(1)  # a different initialisation and global RNG: everything must come from the checkpoint
        resumed = _stn()
        resumed_trainer = _stn_trainer(tmp_path / "resumed")
        resumed_trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=64), ckpt_path=path)
        _assert_same_state(reference, final_state(resumed_trainer, resumed))


# -- modules ---------------------------------------------------------------------------------------------------------
def _stn_config() -> dict[str, Any]:
    """The quickstart shrunk: 16 training batches per epoch, a 5-batch hyper stream (cycled), 3 epochs."""
    config = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    config["model"]["init_args"]["net"]["init_args"]["hidden"] = [32]
    config["model"]["init_args"]["warmup_epochs"] = 1
    config["trainer"].update(max_epochs=3, log_every_n_steps=4, enable_checkpointing=True)
    return config


def test_stn_killed_mid_epoch_resumes_exactly(tmp_path) -> None:
    """SelfTuningModule: checkpoints every 5 optimizer steps (mid-epoch), SIGKILL at a random batch of 48."""
    config = _stn_config()
    ckpt = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 5, "save_last": True, "save_top_k": 0},
    }
    config["trainer"]["callbacks"] = [ckpt]
    batch = _kill_point("stn", 6, 47)
    runs = _kill_and_resume(tmp_path, config, {"batch": batch})
    assert f"SIGKILL at training batch {batch}" in runs["killed_output"]
    _assert_same_state(runs["reference"], runs["resumed"])
    assert int(runs["reference"]["state_dict"]["hyper_steps_done"]) > 0
    assert runs["reference"]["schedule"], "λ never moved"
    # resumed from version_0's last.ckpt while logging into version_1 (Lightning would have looked there only)
    assert sorted(p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def _default_checkpointing(config: dict[str, Any]) -> dict[str, Any]:
    """No checkpoint callback configured: ``hyperlit fit`` adds ``ModelCheckpoint(save_last=True)`` (epoch ends)."""
    assert not any("ModelCheckpoint" in cb["class_path"] for cb in config["trainer"].get("callbacks", []))
    config["trainer"]["enable_checkpointing"] = True
    return config


def test_continual_killed_while_writing_last_ckpt_resumes_exactly(tmp_path) -> None:
    """HyperContinualModule on the 1-D regression sequence (3 tasks × 2 epochs of 10 steps), the CLI's default
    checkpointing (each epoch end: a top-1 file, then last.ckpt) and SIGKILL half-way through rewriting last.ckpt."""
    config = yaml.safe_load((ROOT / "examples" / "cl_regression1d.yaml").read_text())
    config["model"]["init_args"].update(hidden=[8, 8], hnet_hidden=[8, 8])
    config["data"]["init_args"].update(steps_per_task=10, epochs_per_task=2, num_train=64, num_test=32)
    config["trainer"].update(max_epochs=6, logger=False, log_every_n_steps=5)
    _default_checkpointing(config)
    # each epoch end writes the top-1 file, then last.ckpt: kill during the rewrite of last.ckpt at epoch 2-5
    save = 2 * _kill_point("continual", 2, 5, what="the last.ckpt write of epoch")
    runs = _kill_and_resume(tmp_path, config, {"save": save})
    assert "SIGKILL after" in runs["killed_output"] and f"of save {save}" in runs["killed_output"]
    # the kill left a half-written temporary file, which was not taken for a checkpoint and is gone after the resume
    assert len(runs["orphans"]) == 1 and runs["orphans"][0].name.startswith(".last.ckpt.")
    assert not runs["orphans"][0].exists()
    _assert_same_state(runs["reference"], runs["resumed"])
    acc = runs["reference"]["state_dict"]["acc_matrix"]
    assert not torch.isnan(acc.tril()).any() and int(runs["reference"]["state_dict"]["current_task"]) == 2


@pytest.mark.slow  # three hyperlit subprocess starts
def test_best_response_killed_resumes_from_epoch_end(tmp_path) -> None:
    """BestResponseModule (local mode, alternating) on digits with the CLI's default checkpointing."""
    config = {
        "seed_everything": 3,
        "model": {
            "class_path": "hyperlit.tuning.BestResponseModule",
            "init_args": {
                "mode": "local",
                "input_dim": 64,
                "hidden_sizes": [],
                "num_classes": 10,
                "hnet_hidden": [16],
                "num_samples": 2,
                "warmup_steps": 8,
                "phi_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.003}},
                "hyper_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            },
        },
        "data": {"class_path": "datamodules.DigitsDataModule", "init_args": {"batch_size": 64}},
        "trainer": {"max_epochs": 3, "logger": False, "num_sanity_val_steps": 0, "log_every_n_steps": 4},
    }
    _default_checkpointing(config)
    batch = _kill_point("best response", 18, 47)
    runs = _kill_and_resume(tmp_path, config, {"batch": batch})
    _assert_same_state(runs["reference"], runs["resumed"])
    assert runs["reference"]["schedule"], "λ never moved"


@pytest.mark.slow  # three hyperlit subprocess starts
def test_pareto_killed_mid_epoch_resumes_exactly(tmp_path) -> None:
    """ParetoHyperNetModule (EPO) on fake UCI Adult, checkpoints every 3 steps, SIGKILL at a random batch."""
    write_fake_adult(tmp_path / "data", n_train=160, n_test=60)
    config = yaml.safe_load((ROOT / "examples" / "phn_adult.yaml").read_text())
    config["model"]["init_args"].update(target_hidden=[8], hnet_hidden=[16], test_ray_partitions=4)
    config["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}
    config["data"]["init_args"].update(data_dir=str(tmp_path / "data"), verify_row_counts=False, batch_size=16)
    ckpt = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": 0},
    }
    config["trainer"] = {"max_epochs": 3, "num_sanity_val_steps": 0, "log_every_n_steps": 4, "callbacks": [ckpt]}
    reference_batches = 3 * 9  # 3 epochs of 9 batches (the fake file's training split: 129-144 rows, batches of 16)
    batch = _kill_point("pareto", 4, reference_batches - 1)
    runs = _kill_and_resume(tmp_path, config, {"batch": batch})
    assert runs["reference"]["batches_here"] == reference_batches
    _assert_same_state(runs["reference"], runs["resumed"])
    assert runs["reference"]["front"]["hv"] > 0
