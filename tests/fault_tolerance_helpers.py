"""Test-only pieces that ``hyperlit fit`` subprocesses load by class path (tests/test_fault_tolerance.py).

* :class:`KillAtBatch` SIGKILLs its own process when the given training batch starts (no cleanup, no ``finally``:
  like the OOM killer or a pre-empted node).
* :class:`KillDuringSave` is an :class:`~hyperlit.checkpoint_io.AtomicCheckpointIO` that SIGKILLs its process half-way
  through writing the given checkpoint save.
* :class:`DumpFinalState` writes the final state (weights, buffers, optimizer states, module extras) with
  ``torch.save`` so a test can compare runs.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch

from hyperlit.checkpoint_io import AtomicCheckpointIO

__all__ = ["DumpFinalState", "KillAtBatch", "KillDuringSave", "final_state"]


def _die(message: str) -> None:
    print(message, flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtBatch(pl.Callback):
    """SIGKILL this process at the start of the ``batch``-th training batch of the run (1-based, over all epochs)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.seen += 1
        if self.seen == self.batch:
            _die(f"KillAtBatch: SIGKILL at training batch {self.seen} (epoch {trainer.current_epoch}, index {idx})")


class KillDuringSave(AtomicCheckpointIO):
    """Atomic writer that SIGKILLs its process after writing half of its ``save``-th checkpoint (1-based)."""

    def __init__(self, save: int) -> None:
        super().__init__()
        self.save = save
        self.saves = 0

    def _write(self, checkpoint: dict[str, Any], fh: IO[bytes]) -> None:
        self.saves += 1
        if self.saves != self.save:
            super()._write(checkpoint, fh)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        _die(f"KillDuringSave: SIGKILL after {len(data) // 2} of {len(data)} bytes of save {self.saves}")


def final_state(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """Everything a resumed run must reproduce: weights and buffers, optimizer states, counters, module extras."""
    state: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "optimizers": [opt.state_dict() for opt in trainer.optimizers],
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }
    if hasattr(module, "schedule"):  # STN / best-response: the λ schedule, one row per λ-step
        state["schedule"] = list(module.schedule)
    if getattr(module, "last_front", None) is not None:  # PHN: the front at the evaluation rays
        front = module.last_front
        state["front"] = {"losses": front.losses.clone(), "hv": front.hv, "uniformity": front.uniformity}
    # the module's generator (STN/BR ε, dropout masks) and its named ones (CL's regularized task subsets)
    generators = {"rng": module.rng, **{f"named/{k}": g for k, g in getattr(module, "_generators", {}).items()}}
    state["generators"] = {k: g.get_state() for k, g in generators.items()}
    return state


class DumpFinalState(pl.Callback):
    """``torch.save`` :func:`final_state` to ``path`` when training ends, with the number of training batches this
    process ran (``batches_here``: a resumed run must run exactly those its checkpoint had not covered)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batches_here = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.batches_here += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({**final_state(trainer, pl_module), "batches_here": self.batches_here}, self.path)
