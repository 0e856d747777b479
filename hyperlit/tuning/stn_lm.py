"""Self-Tuning LSTM language model on Penn Treebank (MacKay et al. 2019, §4.3; official ``lstm/train.py``).

:class:`StnLanguageModelModule` is a :class:`~hyperlit.tuning.stn.SelfTuningModule` whose network is the STN LSTM
of :mod:`hyperlit.models.stn_lstm_lm`. What differs from the image models:

* batches are BPTT windows ``(inputs, targets, index)`` (see :mod:`datamodules.ptb`), time first; the hidden
  state is carried (detached) across consecutive windows of each stream — training, hyper and evaluation
  streams separately — and reset when a stream restarts;
* φ-step: ``CE + α·AR + β·TAR`` at per-sequence perturbed hyperparameters (α, β, dropoute and wdrop one value per
  batch), SGD lr 30 without momentum, gradient norm clipped to 0.25;
* λ-step: eval mode, unperturbed λ (σ is not tuned, as in the official LSTM code), **plain cross-entropy** (the
  official code also added α·AR + β·TAR to the validation objective; not ported), Adam lr 1e-2;
* evaluation: token-weighted cross-entropy and perplexity (``val/loss``, ``val/ppl``, ``test/…``) at the
  current λ, from a ``torchmetrics`` mean reduced over DDP ranks (the whole split's value on every rank); a
  non-monotone learning-rate decay of φ's optimizer (÷4 when the validation loss is worse than the best of all but
  the last 5 epochs, official ``--nonmono 5``), driven by that reduced value.

Optimizers (``[φ, λ, σ]``, see :class:`~hyperlit.tuning.bilevel.BilevelModule`): ``phi_optimizer`` (official SGD
lr 30), ``hyper_optimizer`` (Adam 1e-2) and ``sigma_optimizer`` (Adam 1e-2, stepped only with ``tune_sigma``).

Defaults follow the official code: warm-up one epoch (``--warmup_steps 331`` = one PTB epoch at 40 × 70),
T_train = 2, T_val = 1, all seven hyperparameters start at 0.05 with σ = 1, the hypernet sees the constrained
values (official ``--tune_all``). The schedule (one row per λ-step) is written to ``<log_dir>/hparam_schedule.csv``
and plotted; :class:`~hyperlit.tuning.schedule_replay.LSTMLanguageModelModule` replays it with a plain LSTM.

Distributed training: every rank reads its own contiguous shard (see :class:`datamodules.ptb.PTBDataModule`) and
carries its own hidden states; λ gradients are averaged over ranks by the base loop.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import MetricCollection
from typing_extensions import override

from hyperlit.models.stn_lstm_lm import (
    LM_HPARAMS,
    CarriedStates,
    LMOutput,
    StnLSTMLanguageModel,
    lm_hyperparameters,
    lm_training_loss,
)
from hyperlit.tuning.metrics import weighted_mean
from hyperlit.tuning.stn import SelfTuningModule

__all__ = ["LanguageModelEvaluation", "StnLanguageModelModule", "unpack_window"]


def unpack_window(batch: Any) -> tuple[Tensor, Tensor, int]:
    """``(inputs, targets, index)`` of a BPTT window batch, with a clear error for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        inputs, targets, index = batch
        if isinstance(inputs, Tensor) and inputs.dim() == 2 and isinstance(targets, Tensor):
            return inputs, targets, int(index)
    raise TypeError(
        "language-model modules expect BPTT windows (inputs (T, B), targets (T, B), index) as served by "
        f"datamodules.ptb.PTBDataModule; got {type(batch).__name__}"
    )


class LanguageModelEvaluation:
    """Mixin for the LSTM language-model modules (before :class:`~hyperlit.base.HyperlitModule` in the bases):
    carried hidden states, token-weighted validation/test cross-entropy and perplexity, the non-monotone
    learning-rate decay and its checkpointed history.

    The cross-entropy of an evaluation split is a ``torchmetrics.MeanMetric`` weighted by each window's token
    count, computed (and so reduced over DDP ranks) at the epoch's end: ``val/loss`` is the cross-entropy per token
    of the whole split, ``val/ppl = exp(val/loss)``, on every rank. The host class provides ``self.net`` (an
    :class:`~hyperlit.models.stn_lstm_lm.StnLSTMLanguageModel`), ``eval_forward(inputs, state)`` and the
    attributes ``nonmono`` and ``lr_decay``.
    """

    net: StnLSTMLanguageModel
    nonmono: int | None
    lr_decay: float

    def _init_evaluation(self) -> None:
        self.states = CarriedStates()
        self.val_history: list[float] = []

    def configure_metrics(self) -> MetricCollection:
        """Token-weighted means: the cross-entropy of evaluation splits (``loss``), the training ``loss`` and ``ce``."""
        metrics = {"loss": weighted_mean(), "ce": weighted_mean()}
        return MetricCollection(metrics, compute_groups=False)

    def eval_forward(self, inputs: Tensor, state: Any) -> LMOutput:
        raise NotImplementedError

    def _eval_ce(self, batch: Any, stream: str) -> tuple[Tensor, int]:
        inputs, targets, index = unpack_window(batch)
        out = self.eval_forward(inputs, self.states.get(stream, index, inputs.size(1)))
        self.states.put(stream, index, out.state)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), targets.reshape(-1))
        return ce, targets.numel()

    def _update_eval(self, batch: Any, stage: str) -> None:
        ce, n = self._eval_ce(batch, stage)
        self.stage_metrics(stage)["loss"].update(ce.detach(), n)  # type: ignore[attr-defined]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update_eval(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update_eval(batch, "test")

    def _epoch_loss(self, stage: str) -> Tensor:
        """Token-weighted mean cross-entropy of the epoch's windows over every rank (the base resets the metric when
        the next epoch starts)."""
        return self.stage_metrics(stage)["loss"].compute()  # type: ignore[attr-defined]

    def _log_epoch(self, stage: str, loss: Tensor, prog_bar: bool) -> None:
        # the value is already the whole split's on every rank: the mean over ranks leaves it as it is
        for name, value in (("loss", loss), ("ppl", loss.exp())):
            self.log(f"{stage}/{name}", value, prog_bar=prog_bar, sync_dist=True)  # type: ignore[attr-defined]

    def on_validation_epoch_end(self) -> None:
        loss = self._epoch_loss("val")
        self._log_epoch("val", loss, prog_bar=True)
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._nonmonotone_decay(float(loss))

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self._epoch_loss("test"), prog_bar=False)

    def _nonmonotone_decay(self, val_loss: float) -> None:
        """Divide φ's learning rate by ``lr_decay`` when ``val_loss`` is worse than the best validation loss of all
        but the last ``nonmono`` epochs (official ``lstm/train.py``)."""
        history = self.val_history
        if self.nonmono and len(history) > self.nonmono and val_loss > min(history[: -self.nonmono]):
            opt = self.optimizer_list()[0]  # type: ignore[attr-defined]
            for group in opt.param_groups:
                group["lr"] /= self.lr_decay
            self.info(f"non-monotone decay: learning rate now {opt.param_groups[0]['lr']:.4g}")  # type: ignore[attr-defined]
        history.append(val_loss)
        self.log("train/lr", self.optimizers_lr())  # type: ignore[attr-defined]

    def optimizers_lr(self) -> float:
        """The current learning rate of φ's (the first) optimizer."""
        return float(self.optimizer_list()[0].param_groups[0]["lr"])  # type: ignore[attr-defined]

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "val_history": list(self.val_history)}  # type: ignore[misc]

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().restore_checkpoint_state(state)  # type: ignore[misc]
        self.val_history = list(state.get("val_history", []))
        self.states.reset()


class StnLanguageModelModule(LanguageModelEvaluation, SelfTuningModule):
    """STN LSTM language model with its regularization hyperparameters tuned on the validation stream.

    Args:
        vocab_size: Vocabulary size (must equal the DataModule's; PTB: 10,000).
        embedding_size: Embedding width (paper: 650).
        hidden_size: LSTM width (paper: 650).
        num_layers: LSTM layers (paper: 2).
        tie_weights: Tie the decoder to the elementary embedding.
        tune: Which of ``alpha, beta, dropouto, dropouti, dropouth, dropoute, wdrop`` to tune (default: all seven;
            Table 1 tunes ``[dropouto]``).
        init: Initial values of tuned hyperparameters by name (default 0.05 each).
        init_sigma: Perturbation scale σ in the unconstrained space (official: 1, not tuned).
        fixed: Values of the hyperparameters that are not tuned (default: 0.05 for dropout rates, 0 for α, β —
            the official defaults).
        v_init: Initialization of the bottlenecks ``V``: ``normal`` (N(0, 0.01²), official) or ``zero``.
        train_steps: φ-steps per cycle (T_train).
        hyper_steps: λ-steps per cycle (T_val).
        warmup_epochs: Epochs of φ-steps before λ moves (official: one epoch, ``--warmup_steps 331``).
        warmup_steps: Alternatively a number of warm-up φ-steps.
        hnet_input: What the hypernet sees: ``constrained`` (official ``--tune_all``) or ``unconstrained``.
        phi_optimizer: Optimizer of the weights (first optimizer; official: SGD lr 30, no momentum, no weight decay).
        hyper_optimizer: Optimizer of λ (second optimizer; official: Adam lr 1e-2).
        sigma_optimizer: Optimizer of σ (third optimizer, stepped only with ``tune_sigma``; Adam lr 1e-2).
        phi_lr_scheduler: Learning-rate schedule of the weights, stepped once per epoch (``None``: only the
            non-monotone decay).
        grad_clip: Gradient-norm clipping of the weights (official: 0.25).
        tune_sigma: Tune σ with the entropy term (official LSTM: no).
        entropy_weight: τ, when σ is tuned.
        nonmono: Window of the non-monotone learning-rate decay in epochs (``None``: off).
        lr_decay: Divisor of the learning rate at each decay (official: 4).
        plot_schedule: Save and plot the λ-schedule (CSV + PNG in the log directory).
        nan_policy: ``raise`` or ``skip`` on non-finite losses or hyperparameters.
        seed: Seed of the module's generator (perturbations and every dropout mask).
    """

    def __init__(
        self,
        vocab_size: int = 10000,
        embedding_size: int = 650,
        hidden_size: int = 650,
        num_layers: int = 2,
        tie_weights: bool = True,
        tune: list[str] | None = None,
        init: dict[str, float] | None = None,
        init_sigma: float = 1.0,
        fixed: dict[str, float] | None = None,
        v_init: Literal["normal", "zero"] = "normal",
        train_steps: int = 2,
        hyper_steps: int = 1,
        warmup_epochs: int = 1,
        warmup_steps: int = 0,
        hnet_input: Literal["unconstrained", "constrained"] = "constrained",
        phi_optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=30.0),
        hyper_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-2),
        sigma_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-2),
        phi_lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = 0.25,
        tune_sigma: bool = False,
        entropy_weight: float = 0.0,
        nonmono: int | None = 5,
        lr_decay: float = 4.0,
        plot_schedule: bool = True,
        nan_policy: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ) -> None:
        names = list(tune) if tune is not None else list(LM_HPARAMS)
        entries = lm_hyperparameters(names, init, init_sigma)
        fixed_values = {n: (0.0 if n in ("alpha", "beta") else 0.05) for n in LM_HPARAMS if n not in names}
        unknown = sorted(set(fixed or {}) - set(LM_HPARAMS))
        if unknown:
            raise KeyError(f"fixed names unknown hyperparameters {unknown}; known: {list(LM_HPARAMS)}")
        fixed_values.update(fixed or {})
        if nonmono is not None and nonmono < 1:
            raise ValueError(f"nonmono must be >= 1 or None, got {nonmono}")
        if not lr_decay > 1:
            raise ValueError(f"lr_decay must be > 1, got {lr_decay}")
        net = StnLSTMLanguageModel(
            vocab_size,
            embedding_size,
            hidden_size,
            num_layers,
            tie_weights,
            hdim=len(entries),
            fixed=fixed_values,
            v_init=v_init,
        )
        super().__init__(
            net,
            hyperparameters=entries,
            plot_schedule=plot_schedule,
            train_steps=train_steps,
            hyper_steps=hyper_steps,
            warmup_epochs=warmup_epochs,
            warmup_steps=warmup_steps,
            entropy_weight=entropy_weight,
            tune_sigma=tune_sigma,
            hnet_input=hnet_input,
            phi_optimizer=phi_optimizer,
            hyper_optimizer=hyper_optimizer,
            sigma_optimizer=sigma_optimizer,
            phi_lr_scheduler=phi_lr_scheduler,
            grad_clip=grad_clip,
            nan_policy=nan_policy,
            seed=seed,
        )
        # keep this class's arguments only: the base class also recorded its own (``hyperparameters``, ``loss`` …),
        # which this constructor does not take, so load_from_checkpoint could not rebuild the module from them
        own = set(inspect.signature(StnLanguageModelModule.__init__).parameters)
        for key in [k for k in self.hparams if k not in own]:
            del self.hparams[key]
        self.save_hyperparameters()
        self.nonmono = nonmono
        self.lr_decay = lr_decay
        self._init_evaluation()

    # -- data plumbing ---------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        dm_vocab = getattr(dm, "vocab_size", None)
        if dm_vocab is not None and int(dm_vocab) != self.net.vocab_size:
            raise ValueError(
                f"the model has vocab_size={self.net.vocab_size} but {type(dm).__name__} has {dm_vocab} tokens; "
                f"set model.init_args.vocab_size to {dm_vocab}"
            )
        if hasattr(dm, "hyper_repeat") and dm.hyper_repeat is None:
            # the hyper stream advances every batch, λ-steps come every T_train/T_val batches: repeat each window
            dm.hyper_repeat = max(1, math.ceil(self.train_steps / self.hyper_steps)) if self.train_steps else 1

    @override
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of a BPTT window ``(inputs, targets, index)`` (see :func:`unpack_window`)."""
        inputs, targets, _ = unpack_window(batch)
        return inputs, targets

    @override
    def batch_size(self, batch: Any) -> int:
        """Number of streams (sequences) of a window: one perturbation per sequence."""
        return unpack_window(batch)[0].size(1)

    # -- the two objectives ------------------------------------------------------------------------------
    @override
    def forward(self, tokens: Tensor, lam: Tensor | None = None, state: Any = None) -> LMOutput:  # type: ignore[override]
        """Logits etc. at per-sequence unconstrained hyperparameters ``lam`` (default: current λ)."""
        lam = self.space.repeat(tokens.size(1)) if lam is None else lam
        return self.net(tokens, self.hnet_input(lam), self.hparam_dict(lam), self.rng, state)

    @override
    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """``CE + α·AR + β·TAR`` on a training window at the perturbed λ_b (train mode)."""
        inputs, targets, index = unpack_window(batch)
        hp = self.hparam_dict(lam)
        out = self.net(
            inputs,
            self.hnet_input(lam),
            hp,
            generator=self.rng,
            state=self.states.get("train", index, inputs.size(1)),
        )
        self.states.put("train", index, out.state)
        alpha, beta = self.net.regularization_strengths(hp)
        loss, ce = lm_training_loss(out, targets, alpha, beta)
        if self._trainer is not None:
            metric = self.stage_metrics("train")["ce"]
            metric(ce.detach(), targets.numel())
            self.log("train/ce", metric, on_step=True, on_epoch=True)
        return loss

    @override
    def hyper_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Plain cross-entropy on a validation window (eval mode; λ reaches the loss only through the hypernet)."""
        inputs, targets, index = unpack_window(batch)
        out = self.net(inputs, self.hnet_input(lam), None, state=self.states.get("hyper", index, inputs.size(1)))
        self.states.put("hyper", index, out.state)
        return F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), targets.reshape(-1))

    @override
    def eval_forward(self, inputs: Tensor, state: Any) -> LMOutput:
        lam = self.space.repeat(inputs.size(1))
        return self.net(inputs, self.hnet_input(lam), None, state=state)

    @override
    def evaluate(self, batch: Any) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Cross-entropy of an evaluation window (state carried on the test or validation stream)."""
        testing = self._trainer is not None and self.trainer.testing
        return self._eval_ce(batch, "test" if testing else "val")[0], None
