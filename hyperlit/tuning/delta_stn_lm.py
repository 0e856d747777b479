"""Δ-STN LSTM language model on Penn Treebank (Bae & Grosse, NeurIPS 2020, on the loop of MacKay et al. 2019, §4.3).

:class:`DeltaStnLanguageModelModule` is the STN LSTM language model of :mod:`hyperlit.tuning.stn_lm` trained as
:class:`~hyperlit.tuning.delta_stn.DeltaSelfTuningModule` trains the image models (the Δ-STN code ships no
language model: this combines its two-update step with the STN LM's truncated-BPTT loop):

* **centred response** ``ŵ(λ) = w₀ + Θ(λ − λ̂)``: the hypernet input is ``ε = h(λ) − h(λ̂).detach()``, so the
  elementary (general) weights ``w₀`` are the language model at the current λ̂ and Θ (response embedding and LSTM
  weights ``R``, ``r`` and the bottlenecks ``V``) models how the weights move with λ;
* **two updates per training window, optimizers** ``[φ = w₀, λ, σ, Θ]``: (a) ``w₀`` descends ``CE + α·AR + β·TAR``
  at λ̂ (every regularizer at λ̂, ``ε = 0``); (b) Θ descends the same loss at per-sequence perturbed
  ``λ_b = λ̂ + σ ⊙ n_b`` (regularizers at ``λ_b``) of the **linearized** network ``f(0) + J_ε f·ε`` (logits and the
  AR/TAR activations alike; ``linearize=True``, a :func:`torch.func.jvp` over the hypernet input through
  :func:`~hyperlit.nn.stn_lstm.stn_lstm_recurrence`), or of ``f(ε)`` (``linearize=False``), with ``w₀`` detached;
  one ``manual_backward(L_a + L_b)`` gives each its own gradient (at ``ε = 0`` every gate ``V·0`` vanishes, so
  ``L_a`` reaches only ``w₀``);
* **carried hidden state** (truncated BPTT): step (a) starts from the training stream's carried (detached) state
  and carries its final state to the next window; step (b) starts from the *same* carried state and stores none
  (the carried state is always the general network's at λ̂);
* the λ-step is the STN LM's (eval mode, plain cross-entropy on the hyper stream, its own carried state) at the
  centred input; validation, test and prediction run at ``ε = 0``: the pure general weights;
* the non-monotone learning-rate decay divides the learning rates of both weight optimizers (w₀ and Θ) together,
  as it divides the single weight optimizer's in the STN LM.

Checkpoints: every counter, optimizer and generator state; the carried hidden states are not saved (the STN LM
resets them on restore, and the PTB loaders restart an epoch on a mid-epoch resume), so a resume from an
end-of-epoch checkpoint continues exactly as the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.func import jvp
from typing_extensions import override

from hyperlit.models.stn_lstm_lm import LMOutput, lm_training_loss
from hyperlit.nn.stn_lstm import LSTMState
from hyperlit.optim import check_factories
from hyperlit.tuning.delta_stn import DeltaSelfTuningModule
from hyperlit.tuning.stn_lm import StnLanguageModelModule, unpack_window

__all__ = ["DeltaStnLanguageModelModule"]


class DeltaStnLanguageModelModule(StnLanguageModelModule, DeltaSelfTuningModule):
    """Δ-STN LSTM language model: centred structured response, general and response weights trained separately.

    Args:
        linearize: Train Θ on the linearized network ``f(0) + J_ε f·ε`` (the official ``--linearize``); ``False``
            uses ``f(ε)``.
        response_optimizer: Optimizer of the response parameters Θ (the fourth optimizer); default as
            ``phi_optimizer``'s (SGD lr 30, no momentum): set both when changing one.
        response_lr_scheduler: Optional learning-rate schedule of the response optimizer (stepped per epoch).
        **kwargs: :class:`~hyperlit.tuning.stn_lm.StnLanguageModelModule`'s arguments (sizes, ``tune``, ``init``,
            the loop's settings); ``phi_optimizer`` trains the general weights w₀.
    """

    def __init__(
        self,
        linearize: bool = True,
        response_optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=30.0),
        response_lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_factories(response_optimizer=response_optimizer, response_lr_scheduler=response_lr_scheduler)
        self.linearize = bool(linearize)
        self.response_optimizer = response_optimizer
        self.response_lr_scheduler = response_lr_scheduler
        #: ``(index, state)`` of the training window step (a) started from: step (b) starts there too
        self._window_start: tuple[int, list[LSTMState] | None] | None = None

    # -- step (a): the general weights at λ̂ ---------------------------------------------------------------------
    @override
    def general_loss(self, batch: Any) -> Tensor:
        """Step (a): ``CE + α·AR + β·TAR`` at λ̂ (``ε = 0``) from the carried training state, which it advances."""
        inputs, targets, index = unpack_window(batch)
        n = inputs.size(1)
        lam = self.space.repeat(n).detach()
        hp = self.hparam_dict(lam)
        state = self.states.get("train", index, n)
        self._window_start = (index, state)
        zero = self.hnet_input(lam).detach()  # exactly zero: W + diag(V·0) R = W
        out = self.net(inputs, zero, hp, generator=self.rng, state=state)
        self.states.put("train", index, out.state)
        alpha, beta = self.net.regularization_strengths(hp)
        loss, ce = lm_training_loss(out, targets, alpha, beta)
        if self._trainer is not None:
            metric = self.stage_metrics("train")["ce"]
            metric(ce.detach(), targets.numel())
            self.log("train/ce", metric, on_step=True, on_epoch=True)
        return loss

    # -- step (b): the response parameters at perturbed λ ---------------------------------------------------------
    @override
    def response_forward(  # type: ignore[override]
        self,
        inputs: Tensor,
        eps: Tensor,
        hparams: dict[str, Tensor],
        state: list[LSTMState] | None = None,
        generator: torch.Generator | None = None,
    ) -> LMOutput:
        """Outputs of step (b) at the centred input ``eps`` (B, H) from ``state``, general weights detached.

        With ``linearize``: logits, AR and TAR activations of ``f(0) + J_ε f(0)·ε`` by one :func:`torch.func.jvp`
        (one pass: the dropout masks are shared by both terms); otherwise ``f(ε)``. The returned ``state`` is the
        start ``state`` (step (b) stores none).
        """

        def at(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            out = self._detached_call("forward", inputs, h, hparams, generator=generator, state=state)
            return out.logits, out.raw, out.dropped

        if self.linearize:
            primal, tangent = jvp(at, (torch.zeros_like(eps),), (eps,))
            logits, raw, dropped = (p + t for p, t in zip(primal, tangent))
        else:
            logits, raw, dropped = at(eps)
        start = state if state is not None else self.net.zero_state(inputs.size(1))
        return LMOutput(logits, list(start), raw, dropped)

    @override
    def response_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Step (b): ``CE + α·AR + β·TAR`` at the perturbed ``lam`` (B, H) of :meth:`response_forward`, from the
        carried state step (a) of this window started from (the stream's carried state when step (a) did not run)."""
        inputs, targets, index = unpack_window(batch)
        lam = lam.detach()
        hp = self.hparam_dict(lam)
        start = self._window_start
        state = start[1] if start is not None and start[0] == index else self.states.get("train", index, lam.size(0))
        out = self.response_forward(inputs, self.hnet_input(lam).detach(), hp, state, generator=self.rng)
        alpha, beta = self.net.regularization_strengths(hp)
        return lm_training_loss(out, targets, alpha, beta)[0]

    @override
    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """``L_a + L_b`` of one window: one backward gives w₀ the gradient of step (a) and Θ that of step (b)."""
        return DeltaSelfTuningModule.train_loss(self, batch, lam)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """:class:`~hyperlit.tuning.delta_stn.DeltaSelfTuningModule`'s loop on BPTT windows."""
        try:
            DeltaSelfTuningModule.training_step(self, batch, batch_idx)
        finally:
            self._window_start = None

    # -- the non-monotone decay of both weight optimizers ----------------------------------------------------------
    @override
    def _nonmonotone_decay(self, val_loss: float) -> None:
        """The STN LM's decay of w₀'s learning rate, applied to Θ's optimizer (the fourth) too."""
        before = self.optimizers_lr()
        super()._nonmonotone_decay(val_loss)
        if self.optimizers_lr() != before:
            for group in self.optimizer_list()[3].param_groups:
                group["lr"] /= self.lr_decay
