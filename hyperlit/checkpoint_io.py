"""Crash-safe checkpoint files, and ``--ckpt_path last`` that finds the previous run's ``last.ckpt``.

:class:`AtomicCheckpointIO` writes a checkpoint to a temporary file *in the target's directory*, flushes it,
syncs it (``fsync``), moves it onto the target (``os.replace``) and syncs the directory. A process killed (SIGKILL, OOM
killer, pre-emption) at any moment of a save leaves either the previous file or the new one under the target's
name, never a truncated one; the temporary file it may leave behind is a hidden ``.<name>.<random>.tmp`` that no
checkpoint lookup mistakes for a checkpoint, and the next successful save of the same target removes it.

Why Lightning's own writer is not enough (read in Lightning 2.6.6 with fsspec 2026.9,
``lightning.fabric.utilities.cloud_io._atomic_save``): it serialises the checkpoint into an in-memory buffer, then
opens the target through fsspec inside ``fs.transaction``. For a local path the transaction makes fsspec's
``LocalFileOpener`` write to ``tempfile.mkstemp()`` -- a file in the *system* temporary directory, not next to the
target -- and commit with ``shutil.move``. Consequences:

* when ``$TMPDIR`` is on another filesystem than the checkpoints (a tmpfs ``/tmp``, node-local scratch vs. a shared
  file system: the usual cluster set-up), ``os.rename`` fails and ``shutil.move`` falls back to ``copy2``, which
  **opens the target and writes it in place**: a kill during that copy leaves a truncated ``last.ckpt``, and the
  run can no longer resume (tests/test_checkpoint_io.py reproduces this);
* nothing is synced (``fsync``), neither the data nor the directory entry, so after a node crash or power loss the renamed
  file can be empty;
* a process killed mid-save leaves a checkpoint-sized orphan in the system temporary directory;
* the whole checkpoint is held twice in host memory (the object and the serialised buffer).

:func:`find_last_checkpoint` backs ``hyperlit fit --ckpt_path last``: Lightning looks for ``last.ckpt`` only in the
*current* run's checkpoint folder, which for the default logger is a fresh ``version_N`` directory, so a restarted
run would silently start from scratch. See README, "Fault tolerance".
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["AtomicCheckpointIO", "find_last_checkpoint", "is_temporary_checkpoint", "use_atomic_checkpoint_io"]

_TMP_SUFFIX = ".tmp"
_LAST = re.compile(r"last(-v\d+)?")


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def is_temporary_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a (possibly orphaned) temporary file of :class:`AtomicCheckpointIO`."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _is_local(path: str | Path) -> bool:
    return type(get_filesystem(str(path))).__name__ == "LocalFileSystem"


def _fsync_directory(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (temp file in the same folder + fsync +
    ``os.replace`` + directory fsync); remote paths (``s3://`` ...) fall back to Lightning's writer.

    ``hyperlit fit`` installs it unless the Trainer was given its own ``CheckpointIO`` plugin; with a plain
    ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``. See the module docstring for why Lightning's
    ``TorchCheckpointIO`` is not enough.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(os.fspath(path)).expanduser().absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=_TMP_SUFFIX, dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                self._write(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _file_mode())  # mkstemp creates 0600 files; match what open() would have created
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_directory(target.parent)
        self._remove_orphans(target)

    def _write(self, checkpoint: dict[str, Any], fh: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary file (the hook tests use to interrupt a save)."""
        torch.save(checkpoint, fh)

    @staticmethod
    def _remove_orphans(target: Path) -> None:
        """Delete temporary files of earlier, interrupted saves of the same target."""
        for orphan in target.parent.glob(f"{_temp_prefix(target)}*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                orphan.unlink()


def use_atomic_checkpoint_io(trainer: pl.Trainer, user_plugins: Iterable[Any] | None = None) -> bool:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless a ``CheckpointIO`` was chosen already.

    Replaces only Lightning's default ``TorchCheckpointIO`` (exact type); a ``CheckpointIO`` among
    ``user_plugins``, or a strategy with its own writer (XLA, DeepSpeed...), is left alone. Returns whether it did.
    """
    if any(isinstance(p, CheckpointIO) for p in (user_plugins or ())):
        return False
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def _is_last(path: Path) -> bool:
    return path.suffix == ".ckpt" and _LAST.fullmatch(path.stem) is not None and path.is_file()


def find_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) of this run *or an earlier run* with the same log root.

    Looks in every ``ModelCheckpoint``'s ``dirpath``, in ``<save_dir>/<name>/*/checkpoints`` of the first logger
    (all ``version_N`` folders) and in ``<default_root_dir>/checkpoints``; ``None`` if there is none. Temporary files
    of interrupted saves never match.
    """
    dirs: set[Path] = {Path(trainer.default_root_dir) / "checkpoints"}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None and _is_local(cb.dirpath):
            dirs.add(Path(cb.dirpath))
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        if _is_local(save_dir):
            name = logger.name
            root = Path(save_dir) / name if name else Path(save_dir)
            if root.is_dir():
                dirs.update(p / "checkpoints" for p in root.iterdir() if p.is_dir())
    found = [p for d in dirs if d.is_dir() for p in d.iterdir() if _is_last(p)]
    if not found:
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime_ns))
