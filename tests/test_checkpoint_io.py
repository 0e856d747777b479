"""Atomic checkpoint writes (:class:`hyperlit.checkpoint_io.AtomicCheckpointIO`), the ``last.ckpt`` lookup behind
``hyperlit fit --ckpt_path last``, and what the CLI installs by default."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from hyperlit.checkpoint_io import (
    AtomicCheckpointIO,
    find_last_checkpoint,
    is_temporary_checkpoint,
    use_atomic_checkpoint_io,
)
from hyperlit.cli import HyperlitCLI
from tests.fault_tolerance_helpers import KillDuringSave

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(value: float, n: int = 1000) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((n,), value)}, "global_step": int(value)}


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def test_save_load_roundtrip_leaves_only_the_checkpoint(tmp_path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"  # the folder is created
    io.save_checkpoint(_ckpt(1.0), target)
    io.save_checkpoint(_ckpt(2.0), target)  # overwrite in place
    assert _load(target)["global_step"] == 2
    torch.testing.assert_close(io.load_checkpoint(target)["state_dict"]["w"], torch.full((1000,), 2.0))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


class _FailHalfway(AtomicCheckpointIO):
    def _write(self, checkpoint: dict[str, Any], fh: IO[bytes]) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # like a signal arriving mid-write


def test_interrupted_save_keeps_previous_checkpoint_and_cleans_up(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), target)
    with pytest.raises(KeyboardInterrupt):
        _FailHalfway().save_checkpoint(_ckpt(2.0), target)
    assert _load(target)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_data_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        assert Path(src).parent == Path(dst).parent, "the temporary file must be in the target's folder"
        assert is_temporary_checkpoint(src)
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), tmp_path / "last.ckpt")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def _cross_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make renames fail with EXDEV (the system temporary folder on another filesystem) and kill the fallback copy
    half-way: the copy functions receive the already opened destination file."""
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if str(dst).endswith(".ckpt"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    def half_copy(fsrc: Any, fdst: Any, *args: Any, **kwargs: Any) -> None:
        data = fsrc.read()
        fdst.write(data[: len(data) // 2])
        fdst.flush()
        raise KeyboardInterrupt  # killed during the copy

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "_fastcopy_sendfile", half_copy, raising=False)
    monkeypatch.setattr(shutil, "copyfileobj", half_copy)


def test_lightning_writer_truncates_the_target_across_filesystems(tmp_path, monkeypatch) -> None:
    """Why AtomicCheckpointIO exists: Lightning's writer commits fsspec's temporary file (in the *system* temp
    folder) with ``shutil.move``; across filesystems that copies into the opened target, and a kill during the copy
    leaves a truncated ``last.ckpt``. The same interruption cannot reach AtomicCheckpointIO's target."""
    lightning_target, atomic_target = tmp_path / "lightning" / "last.ckpt", tmp_path / "atomic" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(_ckpt(1.0), lightning_target)
    AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), atomic_target)
    with monkeypatch.context() as m:
        _cross_device(m)
        with pytest.raises(KeyboardInterrupt):
            TorchCheckpointIO().save_checkpoint(_ckpt(2.0), lightning_target)
        AtomicCheckpointIO().save_checkpoint(_ckpt(2.0), atomic_target)  # no rename, no copy: unaffected
    with pytest.raises(Exception):  # noqa: B017 - whichever error torch raises for a truncated zip
        _load(lightning_target)
    assert _load(atomic_target)["global_step"] == 2


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    """A forked process SIGKILLed half-way through writing its second save (KillDuringSave)."""
    target = tmp_path / "checkpoints" / "last.ckpt"
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            torch.set_num_threads(1)  # no OpenMP pool in a forked child
            io = KillDuringSave(save=2)
            io.save_checkpoint(_ckpt(1.0, n=200_000), target)
            io.save_checkpoint(_ckpt(2.0, n=200_000), target)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    deadline = time.monotonic() + 120
    while (status := os.waitpid(pid, os.WNOHANG)[1]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if status == 0:  # still running: do not leave it behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child did not finish its saves within 120 s")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    orphans = [p for p in target.parent.iterdir() if p.name != "last.ckpt"]
    assert len(orphans) == 1 and is_temporary_checkpoint(orphans[0])
    assert 0 < orphans[0].stat().st_size < target.stat().st_size  # the kill landed mid-write
    state = _load(target)
    assert state["global_step"] == 1
    torch.testing.assert_close(state["state_dict"]["w"], torch.full((200_000,), 1.0))
    # neither Lightning's lookup nor ours takes the orphan for a checkpoint
    cb = ModelCheckpoint(dirpath=target.parent, save_last=True)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[cb], enable_progress_bar=False)
    assert cb._find_last_checkpoints(trainer) == {str(target)}
    assert find_last_checkpoint(trainer) == str(target)
    # the next successful save of the same target removes the orphan
    AtomicCheckpointIO().save_checkpoint(_ckpt(3.0), target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_find_last_checkpoint_searches_earlier_versions(tmp_path) -> None:
    """A restarted run logs into a new ``version_N``; ``last`` must find the newest ``last.ckpt`` of any version."""
    logs = tmp_path / "lightning_logs"
    older = logs / "version_0" / "checkpoints" / "last.ckpt"
    newer = logs / "version_1" / "checkpoints" / "last-v1.ckpt"
    for i, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        torch.save(_ckpt(float(i)), path)
        os.utime(path, ns=(time.time_ns() + i * 10**9,) * 2)
    (older.parent / "last_epoch.ckpt").write_bytes(b"")  # not a last checkpoint
    (older.parent / ".last.ckpt.abc123.tmp").write_bytes(b"")  # an interrupted save
    os.utime(older.parent / ".last.ckpt.abc123.tmp", ns=(time.time_ns() + 10**10,) * 2)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), enable_progress_bar=False)
    assert trainer.logger.version == 2  # this run's own folder is new and empty
    assert find_last_checkpoint(trainer) == str(newer)
    assert find_last_checkpoint(pl.Trainer(default_root_dir=tmp_path / "elsewhere", logger=False)) is None


def _cli(tmp_path: Path, *args: str) -> HyperlitCLI:
    return HyperlitCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=[
            "fit",
            "--config",
            str(ROOT / "examples" / "quickstart.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs",
            "0",
            "--trainer.enable_checkpointing",
            "true",
            *args,
        ],
    )


def _checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]


def test_cli_defaults_atomic_writes_and_a_last_checkpoint(tmp_path) -> None:
    trainer = _cli(tmp_path).trainer
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert [cb.save_last for cb in _checkpoints(trainer)] == [True]


def test_cli_keeps_the_users_checkpoint_io_and_callbacks(tmp_path) -> None:
    trainer = _cli(
        tmp_path,
        "--trainer.plugins",
        "lightning.fabric.plugins.TorchCheckpointIO",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=7",
    ).trainer
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    assert [(cb.save_last, cb._every_n_train_steps) for cb in _checkpoints(trainer)] == [(None, 7)]
    # and without checkpointing nothing is added (the quickstart as shipped)
    plain = _cli(tmp_path, "--trainer.enable_checkpointing", "false").trainer
    assert _checkpoints(plain) == []


def test_use_atomic_checkpoint_io_replaces_only_lightnings_default(tmp_path) -> None:
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False)
    assert use_atomic_checkpoint_io(trainer) and type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert not use_atomic_checkpoint_io(trainer)  # already atomic
    mine = TorchCheckpointIO()
    other = pl.Trainer(default_root_dir=tmp_path, logger=False, plugins=[mine])
    assert not use_atomic_checkpoint_io(other, [mine]) and other.strategy.checkpoint_io is mine


# -- --ckpt_path is checked before anything is built ------------------------------------------------------------------
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
_QUIET = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(scope="module")
def quickstart_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``hyperlit fit`` checkpoint of the quickstart's SelfTuningModule (4 training batches)."""
    from hyperlit.cli import main

    root = tmp_path_factory.mktemp("quickstart_fit")
    main(
        [
            "fit", "--config", str(QUICKSTART), "--model.plot_schedule", "false", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
            "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(root), *_QUIET,
        ]
    )  # fmt: skip
    path = root / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def _test_cli(tmp_path: Path, config: Path, ckpt_path: str, *args: str) -> HyperlitCLI:
    return HyperlitCLI(
        args=[
            "test", "--config", str(config), "--ckpt_path", ckpt_path, "--trainer.default_root_dir", str(tmp_path),
            "--trainer.limit_test_batches", "1", *_QUIET, *args,
        ]
    )  # fmt: skip


def test_ckpt_path_of_the_configured_module_is_tested(tmp_path: Path, quickstart_ckpt: Path) -> None:
    cli = _test_cli(tmp_path, QUICKSTART, str(quickstart_ckpt))
    assert type(cli.model).__name__ == "SelfTuningModule"
    assert "test/loss" in cli.trainer.callback_metrics


def test_ckpt_path_of_another_module_names_both_classes(tmp_path: Path, quickstart_ckpt: Path, capsys) -> None:
    """Lightning would re-read the checkpoint's hyperparameters and swap the model class; the CLI refuses first."""
    from hyperlit.checkpoint import CheckpointMismatchError
    from hyperlit.cli import main

    phn = ROOT / "examples" / "phn_default.yaml"
    with pytest.raises(
        CheckpointMismatchError,
        match=r"was written by SelfTuningModule \(hyperlit\.tuning\.SelfTuningModule\), but the configured model is "
        r"ParetoHyperNetModule \(hyperlit\.pareto\.ParetoHyperNetModule\): use the configuration of the run",
    ):
        _test_cli(tmp_path, phn, str(quickstart_ckpt))
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(phn), "--ckpt_path", str(quickstart_ckpt)], short_errors=True)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 5 and err[-1].startswith("error: CheckpointMismatchError: --ckpt_path ")
    assert "but the configured model is ParetoHyperNetModule" in err[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("yaml", r"quickstart\.yaml is not a Lightning checkpoint: torch\.load cannot read it \(a configuration file\? "
         r"give it with --config\)"),
        ("no_state_dict", r"x\.ckpt is not a Lightning checkpoint \(no 'state_dict'\)"),
        ("plain_lightning", r"x\.ckpt was not written by a hyperlit module \(no 'hyperlit' entry\), so the configured "
         r"model SelfTuningModule \(hyperlit\.tuning\.SelfTuningModule\) cannot load it"),
    ],
)  # fmt: skip
def test_ckpt_path_that_is_no_hyperlit_checkpoint(tmp_path: Path, content: str, message: str) -> None:
    from hyperlit.checkpoint import CheckpointMismatchError

    if content == "yaml":
        path = tmp_path / "quickstart.yaml"
        shutil.copy(QUICKSTART, path)
    else:
        path = tmp_path / "x.ckpt"
        torch.save({"epoch": 1} if content == "no_state_dict" else {"state_dict": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointMismatchError, match=message):
        _test_cli(tmp_path, QUICKSTART, str(path))


def test_ckpt_path_best_needs_the_same_process(tmp_path: Path, capsys) -> None:
    from hyperlit.cli import ConfigurationError, main

    message = (
        r"--ckpt_path best names the best checkpoint of a `fit` run earlier in the same Python process, but "
        r"`hyperlit test` is a fresh process: give the checkpoint file instead"
    )
    with pytest.raises(ConfigurationError, match=message):
        _test_cli(tmp_path, ROOT / "examples" / "stn_ptb.yaml", "best")
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(ROOT / "examples" / "stn_ptb.yaml"), "--ckpt_path", "best"], short_errors=True)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --ckpt_path best names the best")


def test_ckpt_path_missing_file_and_last_without_checkpoint(tmp_path: Path) -> None:
    from hyperlit.cli import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"--ckpt_path \S*nope\.ckpt does not exist: give a checkpoint file"):
        _test_cli(tmp_path, QUICKSTART, str(tmp_path / "nope.ckpt"))
    # ``test --ckpt_path last`` with no last.ckpt anywhere would test untrained weights: refused
    with pytest.raises(ConfigurationError, match=r"--ckpt_path last: no last\.ckpt under .*; give the checkpoint file"):
        _test_cli(tmp_path, QUICKSTART, "last")


def test_test_ckpt_path_last_finds_the_fit_runs_last_checkpoint(tmp_path: Path, quickstart_ckpt: Path) -> None:
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    shutil.copy(quickstart_ckpt, root / "checkpoints" / "last.ckpt")
    cli = _test_cli(root, QUICKSTART, "last")
    assert cli.config_init["test"]["ckpt_path"] == str(root / "checkpoints" / "last.ckpt")
    assert "test/loss" in cli.trainer.callback_metrics


class _Opaque:
    """An object a weights-only ``torch.load`` refuses."""


def test_read_checkpoint_names_what_is_wrong(tmp_path: Path) -> None:
    from hyperlit.checkpoint import CheckpointMismatchError, read_checkpoint

    with pytest.raises(FileNotFoundError, match=r"checkpoint \S*nope\.ckpt does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}, "extra": _Opaque()}, tmp_path / "opaque.ckpt")
    with pytest.raises(
        CheckpointMismatchError, match=r"opaque\.ckpt is a torch file that torch\.load\(weights_only=True\) cannot read"
    ):
        read_checkpoint(tmp_path / "opaque.ckpt")
    assert isinstance(read_checkpoint(tmp_path / "opaque.ckpt", weights_only=False)["extra"], _Opaque)
