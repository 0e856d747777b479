"""A plain LSTM language model trained with fixed hyperparameters or a replayed STN schedule (STN paper, Table 1).

Table 1 of MacKay et al. (2019) compares, on PTB with only the output dropout tuned: a fixed value, the STN, the
STN's final value fixed, and **a plain LSTM trained from scratch following the STN's schedule** (official
``lstm/train_basic.py --load_schedule``). :class:`LSTMLanguageModelModule` covers the plain runs:

* fixed-value mode (``schedule=None``): the regularization hyperparameters stay at ``values``;
* replay mode: ``schedule`` names a CSV written by a tuning run (``hparam_schedule.csv``: one row per λ-step
  with the columns ``phi_step``, ``epoch`` and one per hyperparameter). With ``replay="step"`` (default) the
  φ-step *n* uses the values of the last row recorded after at most *n − 1* φ-steps — exactly the values the STN
  used at that step; with ``replay="epoch"`` epoch *e* uses the last row of epoch *e* (the official per-epoch
  replay, which sets at the start of an epoch the values the STN reached at its end). Before the first row (the
  STN's warm-up) ``values`` apply — set them to the STN's initial values (default 0.05, as the STN's).

The network is :class:`~hyperlit.models.stn_lstm_lm.StnLSTMLanguageModel` with ``hdim=0``: the same embedding,
locked/embedding dropout, DropConnect and AR/TAR as the STN model, with plain (fused-kernel) LSTM layers; the
optimization follows the official baseline (``optimizer``: SGD lr 30; clipping 0.25, non-monotone decay). Validation
and test log the token-weighted cross-entropy and perplexity of the whole split (``torchmetrics``, reduced over DDP
ranks), like :class:`~hyperlit.tuning.stn_lm.StnLanguageModelModule`.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.models.stn_lstm_lm import LM_HPARAMS, LMOutput, StnLSTMLanguageModel, lm_training_loss
from hyperlit.optim import check_factories
from hyperlit.tuning.stn_lm import LanguageModelEvaluation, unpack_window

__all__ = ["LSTMLanguageModelModule", "ReplaySchedule", "load_schedule"]

_DEFAULTS = {
    "alpha": 0.0,
    "beta": 0.0,
    "dropouto": 0.05,
    "dropouti": 0.05,
    "dropouth": 0.05,
    "dropoute": 0.05,
    "wdrop": 0.05,
}


class ReplaySchedule:
    """Hyperparameter values indexed by φ-step and epoch, read from a tuning run's schedule CSV.

    Args:
        rows: Schedule rows (``phi_step``, ``epoch`` and hyperparameter columns), in recording order.
        names: The hyperparameters to replay (columns of that name must exist).
    """

    def __init__(self, rows: list[dict[str, float]], names: list[str]) -> None:
        if not rows:
            raise ValueError("the schedule has no rows")
        missing = [c for c in ("phi_step", "epoch", *names) if c not in rows[0]]
        if missing:
            raise KeyError(f"the schedule lacks the columns {missing}; it has {sorted(rows[0])}")
        for i, row in enumerate(rows):
            for c in ("phi_step", "epoch", *names):
                if not math.isfinite(row[c]):
                    raise ValueError(f"schedule row {i}: column {c!r} is {row[c]}")
        steps = [row["phi_step"] for row in rows]
        if any(b < a for a, b in itertools.pairwise(steps)):
            raise ValueError("schedule rows are not in increasing phi_step order")
        self.rows = rows
        self.names = names
        self.steps = steps
        self.epochs = [row["epoch"] for row in rows]

    def at_step(self, steps_done: int) -> dict[str, float] | None:
        """Values for the φ-step after ``steps_done`` steps (``None`` before the first λ-step)."""
        i = bisect.bisect_right(self.steps, steps_done) - 1
        return None if i < 0 else {n: self.rows[i][n] for n in self.names}

    def at_epoch(self, epoch: int) -> dict[str, float] | None:
        """Values reached at the end of ``epoch`` (or the last earlier epoch with rows; ``None`` before any)."""
        i = bisect.bisect_right(self.epochs, epoch) - 1
        return None if i < 0 else {n: self.rows[i][n] for n in self.names}


def load_schedule(path: str | Path, names: list[str] | None = None) -> ReplaySchedule:
    """Read a schedule CSV (``hparam_schedule.csv`` of a tuning run); ``names`` default to every LM column in it.

    Raises:
        FileNotFoundError: No file at ``path``.
        KeyError: Required columns are missing.
        ValueError: A value is not a finite number, or the file has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"schedule file {path} does not exist (a tuning run writes <log_dir>/hparam_schedule.csv)"
        )
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = []
        for i, raw in enumerate(reader):
            try:
                rows.append({k: float(v) for k, v in raw.items() if k is not None and v not in (None, "")})
            except ValueError as err:
                raise ValueError(f"{path}: row {i + 1} holds a non-numeric value ({err})") from err
    if names is None:
        names = [n for n in LM_HPARAMS if n in header]
        if not names:
            raise KeyError(f"{path} has none of the columns {list(LM_HPARAMS)}; header: {header}")
    return ReplaySchedule(rows, names)


class LSTMLanguageModelModule(LanguageModelEvaluation, HyperlitModule):
    """Plain LSTM language model with fixed or replayed regularization hyperparameters (manual optimization).

    Args:
        vocab_size: Vocabulary size (PTB: 10,000).
        embedding_size: Embedding width (paper: 650).
        hidden_size: LSTM width (paper: 650).
        num_layers: LSTM layers (paper: 2).
        tie_weights: Tie the decoder to the embedding.
        values: Fixed hyperparameter values by name (defaults: 0.05 for the dropout rates, 0 for α, β); in replay
            mode they apply before the schedule's first row and to names the schedule lacks.
        schedule: Path of a schedule CSV to replay (``None``: fixed-value mode).
        replay: ``step`` (the STN's values at every φ-step) or ``epoch`` (official per-epoch replay).
        optimizer: Optimizer of every weight (the only optimizer; official: SGD lr 30, no weight decay).
        lr_scheduler: Its learning-rate schedule, stepped once per epoch (``None``: only the non-monotone decay).
        grad_clip: Gradient-norm clipping (official: 0.25; ``None``: off).
        nonmono: Window of the non-monotone learning-rate decay in epochs (``None``: off).
        lr_decay: Divisor of the learning rate at each decay (official: 4).
        seed: Seed of the module's generator (every dropout mask).
    """

    def __init__(
        self,
        vocab_size: int = 10000,
        embedding_size: int = 650,
        hidden_size: int = 650,
        num_layers: int = 2,
        tie_weights: bool = True,
        values: dict[str, float] | None = None,
        schedule: str | None = None,
        replay: Literal["step", "epoch"] = "step",
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=30.0),
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = 0.25,
        nonmono: int | None = 5,
        lr_decay: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        unknown = sorted(set(values or {}) - set(LM_HPARAMS))
        if unknown:
            raise KeyError(f"values names unknown hyperparameters {unknown}; known: {list(LM_HPARAMS)}")
        if replay not in ("step", "epoch"):
            raise ValueError(f"replay must be 'step' or 'epoch', got {replay!r}")
        check_factories(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        if nonmono is not None and nonmono < 1:
            raise ValueError(f"nonmono must be >= 1 or None, got {nonmono}")
        if not lr_decay > 1:
            raise ValueError(f"lr_decay must be > 1, got {lr_decay}")
        self.save_hyperparameters()
        self.values = {**_DEFAULTS, **{k: float(v) for k, v in (values or {}).items()}}
        for name in ("dropouto", "dropouti", "dropouth", "dropoute", "wdrop"):
            if not 0 <= self.values[name] < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {self.values[name]}")
        for name in ("alpha", "beta"):
            if self.values[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {self.values[name]}")
        self.schedule = load_schedule(schedule) if schedule is not None else None
        self.replay = replay
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.nonmono = nonmono
        self.lr_decay = lr_decay
        self.net = StnLSTMLanguageModel(vocab_size, embedding_size, hidden_size, num_layers, tie_weights, hdim=0)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._init_evaluation()

    def current_values(self) -> dict[str, float]:
        """The hyperparameter values of the next φ-step (fixed, or from the replayed schedule)."""
        out = dict(self.values)
        if self.schedule is not None:
            replayed = (
                self.schedule.at_step(int(self.steps))
                if self.replay == "step"
                else self.schedule.at_epoch(self.current_epoch)
            )
            out.update(replayed or {})
        return out

    @override
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        dm_vocab = getattr(dm, "vocab_size", None) if dm is not None else None
        if dm_vocab is not None and int(dm_vocab) != self.net.vocab_size:
            raise ValueError(
                f"the model has vocab_size={self.net.vocab_size} but {type(dm).__name__} has {dm_vocab} tokens; "
                f"set model.init_args.vocab_size to {dm_vocab}"
            )

    @override
    def configure_optimizers(self) -> Any:
        """One optimizer over every weight (official: SGD) and its schedule, if one is given."""
        opt = self.build_optimizer(self.optimizer, self.parameters(), "optimizer")
        return self.optimizers_config([opt], [self.build_scheduler(self.lr_scheduler, opt, "lr_scheduler")])

    @override
    def forward(self, tokens: Tensor, state: Any = None) -> LMOutput:
        return self.net(tokens, None, self.current_values(), self.rng, state)

    @override
    def eval_forward(self, inputs: Tensor, state: Any) -> LMOutput:
        return self.net(inputs, None, None, state=state)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, Mapping) and "train" in batch:
            # a DataModule that served a tuning module before yields {"train", "hyper"} batches: train on "train"
            batch = batch["train"]
        inputs, targets, index = unpack_window(batch)
        values = self.current_values()
        out = self.net(inputs, None, values, self.rng, self.states.get("train", index, inputs.size(1)))
        self.states.put("train", index, out.state)
        loss, ce = lm_training_loss(out, targets, values["alpha"], values["beta"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {int(self.steps)} (epoch {self.current_epoch}); "
                f"hyperparameters {values}"
            )
        (opt,) = self.optimizer_list()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.steps += 1
        n = targets.numel()
        metrics = self.stage_metrics("train")
        metrics["loss"](loss.detach(), n)
        metrics["ce"](ce.detach(), n)
        self.log("train/loss", metrics["loss"], prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/ce", metrics["ce"], on_step=True, on_epoch=True)
        self.log_dict({f"hparam/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False, batch_size=n)
