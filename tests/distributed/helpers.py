"""Run a module under 2-process ``ddp_spawn`` (or one process) and read back every rank's final state.

Builds on :class:`tests.distributed.test_ddp_bilevel.DumpState` (each rank writes its ``state_dict`` at the end of
training) and its order-preserving :class:`~tests.distributed.test_ddp_bilevel.ShardedStreams`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from tests.distributed.test_ddp_bilevel import DumpState

__all__ = ["fit_ranks"]


def fit_ranks(
    directory: Path,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    devices: int = 2,
    strategy: str = "ddp_spawn",
    **trainer_kwargs: Any,
) -> dict[int, dict[str, list[float]]]:
    """Fit on ``devices`` CPU processes (``use_distributed_sampler=False``); return ``{rank: flat state_dict}``."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        default_root_dir=directory,
        callbacks=[DumpState(str(directory))],
        **kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return {r: json.loads((directory / f"rank{r}.json").read_text()) for r in range(devices)}
