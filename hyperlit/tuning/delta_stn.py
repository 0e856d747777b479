"""Δ-STN: Self-Tuning Networks with a centred, linearized best response (Bae & Grosse, NeurIPS 2020).

Δ-STN keeps the STN layers of :mod:`hyperlit.nn.stn` and changes what they are trained to represent:

* **centred response** ``ŵ(λ) = w₀ + Θ(λ − λ̂)``: the hypernetwork input is ``ε = h(λ) − h(λ̂).detach()``
  (``h`` the space's hypernet-input mapping, :meth:`DeltaSelfTuningModule.hnet_input`), so the general weights
  ``w₀`` (the layers' ``general_parameters()``) *are* the network at the current λ̂ and the response parameters
  ``Θ`` (``W_h``, ``b_h``, ``V``: ``response_parameters()``) only model how the weights move with λ;
* **two updates per batch, two optimizers**: (a) ``w₀`` descends the *unperturbed* training loss at λ̂
  (regularizers and augmentation at λ̂, ``ε = 0``); (b) ``Θ`` descends the training loss at per-example perturbed
  ``λ_b = λ̂ + σ ⊙ n_b`` (regularizers and augmentation at ``λ_b``) of the **linearized** network
  ``f(x; ε = 0) + J_ε f · ε`` (``linearize=True``, a :func:`torch.func.jvp` over the hypernet input), which fits the
  best-response Jacobian at λ̂ directly; ``linearize=False`` uses the plain ``f(x; ε)``;
* the λ-step is STN's (eval mode, no augmentation, regularizers detached, entropy term when σ is tuned) with the
  centred input: value ``ε``, gradient the identity to λ̂ and σ (the official code's plain, non-linearized forward);
* validation, test and prediction run at ``ε = 0``: the pure general weights.

One backward per batch (DDP-clean): step (b) runs the network through :func:`torch.func.functional_call` with the
general parameters *detached*, so ``L_b`` reaches only Θ, while step (a) at ``ε = 0`` gives Θ an exactly zero
gradient (every gate ``V·0`` vanishes); so ``manual_backward(L_a + L_b)`` through DDP's reducer gives ``w₀`` the
gradient of ``L_a`` and Θ that of ``L_b`` (each averaged over ranks), and both optimizers step. Step (b) runs on
copies of the network's buffers: BatchNorm running statistics are those of the general network at λ̂ (step a).

Optimizers, in this order: ``[φ = w₀, λ, σ, Θ]`` (BilevelModule's three, then ``response_optimizer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call, jvp
from typing_extensions import override

from hyperlit.nn.stn import StnNet
from hyperlit.optim import check_factories
from hyperlit.streams import split_streams
from hyperlit.tuning.metrics import weighted_mean
from hyperlit.tuning.stn import SelfTuningModule

__all__ = ["DeltaSelfTuningModule"]


class _Method(nn.Module):
    """``net.<name>(...)`` as a module's ``forward``, so :func:`torch.func.functional_call` can swap its tensors."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.net, self.name)(*args, **kwargs)


class DeltaSelfTuningModule(SelfTuningModule):
    """Δ-STN training: a centred structured response, general and response weights trained by separate updates.

    Args:
        net: The STN network, as for :class:`~hyperlit.tuning.stn.SelfTuningModule` (every model of
            :mod:`hyperlit.models.stn_cnn`, or :func:`~hyperlit.nn.stn.convert_to_stn` of a plain network).
        linearize: Train Θ on the linearized network ``f(x; 0) + J_ε f · ε`` (the official ``--linearize``);
            ``False`` uses ``f(x; ε)``.
        response_optimizer: Optimizer of the response parameters Θ (the fourth optimizer, separate from w₀'s);
            default as ``phi_optimizer``'s (SGD lr 0.01, momentum 0.9): set both when changing one.
        response_lr_scheduler: Optional learning-rate schedule of the response optimizer (stepped per epoch).
        **kwargs: :class:`~hyperlit.tuning.stn.SelfTuningModule`'s arguments (``hyperparameters``, ``tune``,
            ``loss``, ``plot_schedule``) and the loop's (:class:`~hyperlit.tuning.bilevel.BilevelModule`);
            ``phi_optimizer`` trains the general weights w₀.
    """

    def __init__(
        self,
        net: StnNet,
        linearize: bool = True,
        response_optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        response_lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        check_factories(response_optimizer=response_optimizer, response_lr_scheduler=response_lr_scheduler)
        if not any(p.requires_grad for p in self.net.response_parameters()):
            raise ValueError(
                f"{type(net).__name__} has no trainable response parameters (W_h, b_h, V): Δ-STN needs STN layers "
                "(hyperlit.nn.stn.StnLinear/StnConv2d, e.g. through convert_to_stn)"
            )
        self.linearize = bool(linearize)
        self.response_optimizer = response_optimizer
        self.response_lr_scheduler = response_lr_scheduler
        #: mean training loss of the response updates (logged as ``train/response_loss``)
        self.response_loss_metric = weighted_mean()

    # -- the centred response --------------------------------------------------------------------------
    @override
    def hnet_input(self, lam: Tensor) -> Tensor:
        """``ε = h(λ) − h(λ̂).detach()``: value ``h(λ) − h(λ̂)`` (zero at the current λ̂), gradient that of ``h(λ)``."""
        return self.space.hnet_input(lam) - self.space.hnet_input(self.space.unconstrained).detach()

    def response_parameters(self) -> list[nn.Parameter]:
        """Θ: the STN layers' ``W_h``, ``b_h`` and ``V`` (trained by the response optimizer)."""
        return [p for p in self.net.response_parameters() if p.requires_grad]

    @override
    def phi_parameters(self) -> list[nn.Parameter]:
        """w₀: every trainable parameter outside the hyperparameter space and Θ (trained by ``phi_optimizer``)."""
        response = {id(p) for p in self.net.response_parameters()}
        return [p for p in super().phi_parameters() if id(p) not in response]

    def _detached_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``net.<method>(*args, **kwargs)`` with the general weights detached (only Θ gets gradients) and on copies
        of the buffers (running statistics stay those of the general network)."""
        response = {id(p) for p in self.net.response_parameters()}
        tensors = {f"net.{n}": p.detach() for n, p in self.net.named_parameters() if id(p) not in response}
        tensors.update({f"net.{n}": b.clone() for n, b in self.net.named_buffers()})
        return functional_call(_Method(self.net, method), tensors, args, kwargs)

    def response_forward(
        self, x: Tensor, eps: Tensor, hparams: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> Tensor:
        """Outputs of step (b) at the centred input ``eps`` (B, H), general weights detached.

        With ``linearize``: ``f(x; 0) + J_ε f(x; 0) · ε``, one :func:`torch.func.jvp` (one forward pass: the dropout
        masks are shared by both terms); otherwise ``f(x; ε)``.
        """
        if not self.linearize:
            return self._detached_call("forward", x, eps, hparams, generator=generator)

        def at(h: Tensor) -> Tensor:
            return self._detached_call("forward", x, h, hparams, generator=generator)

        # a full (B, H) zero primal: the per-example path of the STN layers, so every row's tangent is kept
        out, tangent = jvp(at, (torch.zeros_like(eps),), (eps,))
        return out + tangent

    # -- the two training objectives ----------------------------------------------------------------------
    def general_loss(self, batch: Any) -> Tensor:
        """Step (a): the unperturbed training loss at λ̂ (augmentation and regularizers at λ̂, ``ε = 0``)."""
        x, y = self.unpack_batch(batch)
        lam = self.space.repeat(x.shape[0]).detach()
        hp = self.hparam_dict(lam)
        x = self.net.augment(x, hp, generator=self.rng)
        zero = self.hnet_input(lam[:1]).detach().expand(x.shape[0], -1)  # one shared row: W + diag(V·0) W_h = W
        out = self.net(x, zero, hp, generator=self.rng)
        loss = self._loss(out, y)
        penalty = self.net.penalty(zero, hp)
        if penalty is not None:
            loss = loss + penalty.mean()
        if self.loss_name == "cross_entropy" and self._trainer is not None:
            acc = self.stage_metrics("train")["acc"]
            acc.update(out.detach(), y)
            self.log("train/acc", acc, on_step=False, on_epoch=True)
        return loss

    def response_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Step (b): the training loss at the perturbed ``lam`` (B, H) (augmentation and regularizers at ``lam``)
        of :meth:`response_forward`; the penalty term (if any) is evaluated at ``ε``, not linearized."""
        x, y = self.unpack_batch(batch)
        lam = lam.detach()
        hp = self.hparam_dict(lam)
        x = self.net.augment(x, hp, generator=self.rng)
        eps = self.hnet_input(lam).detach()
        loss = self._loss(self.response_forward(x, eps, hp, generator=self.rng), y)
        penalty = self._detached_call("penalty", eps, hp)
        if penalty is not None:
            loss = loss + penalty.mean()
        return loss

    @override
    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """``L_a + L_b``: one backward gives w₀ the gradient of step (a) and Θ that of step (b) at ``lam``."""
        return self.general_loss(batch) + self.response_loss(batch, lam)

    # -- the loop ------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """BilevelModule's alternation with the two-update φ-step (a) + (b) of Δ-STN."""
        train_batch, hyper_batch = split_streams(batch)
        opt_general, opt_lam, opt_sigma, opt_response = self.optimizer_list()
        warm = self.in_warmup()
        if warm or self.train_steps > 0:
            self._delta_step(train_batch, opt_general, opt_response, warm)
        if warm:
            return
        if self.train_steps == 0:
            owed = self.hyper_steps
        else:
            post = int(self.phi_steps) - int(self.warmup_phi_steps)
            owed = (post * self.hyper_steps) // self.train_steps - int(self.hyper_steps_done)
        for _ in range(max(0, owed)):
            self._hyper_step(hyper_batch, opt_lam, opt_sigma)

    def _delta_step(self, batch: Any, opt_general: Any, opt_response: Any, warm: bool) -> None:
        n = self.batch_size(batch)
        loss_a = self.general_loss(batch)
        loss_b = self.response_loss(batch, self.sample_train_lambda(n))
        self.phi_steps += 1
        if warm:
            self.warmup_phi_steps += 1
        if not self._finite_or_handle(torch.stack([loss_a.detach(), loss_b.detach()]), "training"):
            return
        opt_general.zero_grad(set_to_none=True)
        opt_response.zero_grad(set_to_none=True)
        self.manual_backward(loss_a + loss_b)
        if self.grad_clip is not None:
            for opt in (opt_general, opt_response):
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt_general.step()
        opt_response.step()
        metric = self.stage_metrics("train")["loss"]
        metric(loss_a.detach(), n)
        self.log("train/loss", metric, prog_bar=True, on_step=True, on_epoch=True)
        self.response_loss_metric(loss_b.detach(), n)
        self.log("train/response_loss", self.response_loss_metric, on_step=True, on_epoch=True)

    @override
    def configure_optimizers(self) -> Any:
        """Optimizers ``[φ = w₀, λ, σ, Θ]``; the learning-rate schedules of φ and Θ if given."""
        config = super().configure_optimizers()
        optimizers, schedulers = config if isinstance(config, tuple) else (config, [])
        opt_response = self.build_optimizer(self.response_optimizer, self.response_parameters(), "response_optimizer")
        sched = self.build_scheduler(self.response_lr_scheduler, opt_response, "response_lr_scheduler")
        return self.optimizers_config([*optimizers, opt_response], [*schedulers, sched])
