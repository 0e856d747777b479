"""Implicit- and unrolled-differentiation hyperparameter optimization as LightningModules.

The bilevel problem ``λ* = argmin_λ L_V(w*(λ), λ)``, ``w*(λ) = argmin_w L_T(w, λ)``, for hyperparameters that enter
the training loss differentiably (:class:`~hyperlit.tuning.training_hparams.TrainingHyperparameters`: weight decay
global / per layer / per weight, class weights, a reweighting network), with the hypergradient of
:mod:`hyperlit.tuning.hypergrad`:

* :class:`ImplicitDifferentiationModule` — the implicit function theorem (Lorraine, Vicol & Duvenaud, AISTATS 2020,
  Alg. 1–3): ``dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂w) H⁻¹ ∂L_V/∂w`` with a Neumann-series, conjugate-gradient, identity
  or exact inverse-HVP;
* :class:`UnrolledDifferentiationModule` — reverse mode through ``steps`` differentiable SGD steps (Franceschi et al.
  2017), truncated to the last ``truncate`` (Shaban et al. 2019).

The loop (:class:`HypergradientModule`): each Lightning training batch is ``{"train": ..., "hyper": ...}`` (see
:mod:`hyperlit.streams`). Batches ``1 … warmup_steps`` are plain inner steps on ``L_T`` (the IFT assumes
``∂L_T/∂w ≈ 0``, so w is trained before λ moves); after that, every ``hyper_every``-th batch is a *hyper batch*.
The module's own counters (buffers, checkpointed) drive this: ``inner_steps`` (training batches whose weight update
was taken), ``hyper_steps_done`` and ``skipped_steps``; Lightning's ``global_step`` counts every optimizer step.

Every w-dependent quantity of a hyper step is computed with ``torch.func.functional_call`` on the user's ``model``
at detached weights, **in eval mode** (dropout off, BatchNorm on its running statistics), so each of the solver's
Hessian-vector products differentiates the same function and no buffer is updated. ``L_V`` is the mean data loss on
the hyper batch (no penalty, no example weights); ``L_T`` is
:meth:`~hyperlit.tuning.training_hparams.TrainingHyperparameters.train_objective` on the batch's train part.

Optimizers: ``[w, λ]``. λ's gradient is written by hand (``p.grad = total``) and stepped by the ``hyper_optimizer``.
Under DDP λ is excluded from DDP's reducer; see the subclasses for how each keeps the ranks identical (equal
per-rank batch sizes assumed, as ``DistributedSampler`` gives).

Logged: ``train/loss`` (``L_T`` of the inner steps), ``hyper/loss`` (``L_V`` at the weights of the hyper step),
``val/loss``/``val/acc``/``test/…`` (mean data loss and accuracy, ``torchmetrics``: over the whole split under DDP),
``hparam/<name>_mean`` (means of the constrained values: ``weight_decay`` = ``e^λ``, ``class_weight``),
``hypergrad/norm``, ``hypergrad/direct_norm``, ``hypergrad/hvps``, ``hypergrad/terms`` and, where the solver knows
it, ``hypergrad/residual``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics import MetricCollection
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.optim import check_factories
from hyperlit.streams import split_streams
from hyperlit.tuning.batches import unpack_xy
from hyperlit.tuning.bilevel import BilevelModule
from hyperlit.tuning.hypergrad import (
    ConjugateGradientSolver,
    ExactSolver,
    HVPMode,
    Hypergradient,
    HypergradientError,
    IdentitySolver,
    InverseHVPSolver,
    NeumannSolver,
    Params,
    SolverInfo,
    implicit_hypergradient,
    unrolled_hypergradient,
)
from hyperlit.tuning.metrics import weighted_mean
from hyperlit.tuning.training_hparams import TrainingHyperparameters, WeightDecay

__all__ = ["HypergradientModule", "ImplicitDifferentiationModule", "UnrolledDifferentiationModule"]

Loss = Literal["cross_entropy", "mse"]


class HypergradientModule(HyperlitModule):
    """Base of the implicit/unrolled family: the alternating loop of inner steps and hand-computed hyper steps.

    Subclasses implement :meth:`hyper_batch_step` (the weights' update and λ's hypergradient of a hyper batch).

    Args:
        model: The trained network ``f_w`` (any ``nn.Module``; all its trainable parameters are w). It is saved
            in the checkpoint's weights, not in its hyperparameters: pass it again to ``load_from_checkpoint``.
        loss: ``cross_entropy`` (integer labels) or ``mse`` (one-hot targets for integer labels; plain regression
            for float targets, a ``(B, 1)`` output against ``(B,)`` targets).
        weight_decay: Tuned L2 penalty: ``none``, ``global``, ``per_layer`` (per parameter tensor) or
            ``per_weight`` (see :class:`~hyperlit.tuning.training_hparams.TrainingHyperparameters`).
        init_log_decay: Initial log of the decay strength (``e^λ``).
        class_weights: Tune one loss weight per class (needs ``num_classes``).
        num_classes: Number of classes (for ``class_weights``).
        reweighting_net: A network whose parameters are hyperparameters, giving each training example the weight
            ``sigmoid(r_θ(z))`` (mean-normalised).
        reweight_input: What the reweighting network sees: the inputs (``x``) or the detached per-example loss.
        warmup_steps: Inner steps before the first hyper batch (the IFT assumes ``∂L_T/∂w ≈ 0``).
        hyper_every: One hyper batch every so many batches after the warm-up (IHO's code: 9).
        optimizer: Optimizer of w (first optimizer). Default SGD lr 0.1, momentum 0.9 (IHO's code: the same lr and
            momentum, with Nesterov).
        hyper_optimizer: Optimizer of λ (second optimizer). Default Adam lr 0.01, as
            :class:`~hyperlit.tuning.best_response.BestResponseModule`'s, so the family compares like with like (IHO's code:
            RMSprop or SGD with momentum).
        lr_scheduler: Learning-rate schedule of w's optimizer, stepped once per epoch (``None``: constant).
        nan_policy: On a non-finite loss or hypergradient: ``raise`` or ``skip`` (the step, with a warning, counted
            in ``skipped_steps``).
        seed: Seed of the module's generator.
    """

    #: training batches are ``{"train": ..., "hyper": ...}`` (see :mod:`hyperlit.streams`)
    uses_hyper_stream: ClassVar[bool] = True
    #: step counters that ``--init_from`` leaves at zero: a new run
    init_from_skip: tuple[str, ...] = ("inner_steps", "hyper_steps_done", "skipped_steps")

    def __init__(
        self,
        model: nn.Module,
        loss: Loss = "cross_entropy",
        weight_decay: WeightDecay = "per_weight",
        init_log_decay: float = -7.6,
        class_weights: bool = False,
        num_classes: int | None = None,
        reweighting_net: nn.Module | None = None,
        reweight_input: Literal["x", "loss"] = "x",
        warmup_steps: int = 0,
        hyper_every: int = 1,
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        hyper_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=0.01),
        lr_scheduler: LRSchedulerCallable | None = None,
        nan_policy: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if isinstance(hyper_every, bool) or not isinstance(hyper_every, int) or hyper_every < 1:
            raise ValueError(f"hyper_every must be an int >= 1, got {hyper_every!r}")
        self.check_nan_policy(nan_policy)
        check_factories(optimizer=optimizer, hyper_optimizer=hyper_optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["model", "reweighting_net"])
        self.model = model
        self.hp = TrainingHyperparameters(
            model,
            weight_decay=weight_decay,
            init_log_decay=init_log_decay,
            class_weights=class_weights,
            num_classes=num_classes,
            reweighting_net=reweighting_net,
            reweight_input=reweight_input,
        )
        self.loss = loss
        self.warmup_steps = warmup_steps
        self.hyper_every = hyper_every
        self.optimizer = optimizer
        self.hyper_optimizer = hyper_optimizer
        self.lr_scheduler = lr_scheduler
        self.nan_policy = nan_policy
        self.register_buffer("inner_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("hyper_steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        #: the :class:`~hyperlit.tuning.hypergrad.Hypergradient` of the last hyper step (rank-local before the
        #: reduction of ``total``, which is what λ's optimizer received); ``None`` before the first
        self.last_hypergradient: Hypergradient | None = None
        self.hyper_loss_metric = weighted_mean()
        # λ gets its gradient by hand (averaged over ranks): DDP must not reduce it
        self._ddp_params_and_buffers_to_ignore = [f"hp.{n}" for n, _ in self.hp.named_parameters()]

    # -- model and losses ----------------------------------------------------------------------------------
    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a batch (see :func:`~hyperlit.tuning.batches.unpack_xy`); override for another layout."""
        return unpack_xy(batch, type(self).__name__)

    def per_example_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The data loss of every example, shape ``(B,)``."""
        if self.loss == "cross_entropy":
            if y.dtype.is_floating_point:
                raise ValueError(f"loss='cross_entropy' needs integer class labels, got {y.dtype} targets")
            return F.cross_entropy(out, y, reduction="none")
        if not y.dtype.is_floating_point:
            y = F.one_hot(y, out.shape[-1]).to(out.dtype)
        elif y.dim() == 1 and out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.shape != y.shape:
            raise ValueError(f"loss='mse': outputs of shape {tuple(out.shape)} against targets {tuple(y.shape)}")
        return (out - y).square().reshape(out.shape[0], -1).mean(1)

    def weight_params(self) -> dict[str, Tensor]:
        """The weights w by name (the model's trainable parameters)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def train_loss_fn(self, batch: Any) -> Callable[[Params, Params], Tensor]:
        """``(w, λ) ↦ L_T(w, λ)`` on ``batch`` through ``functional_call`` (the model's mode as it is)."""
        x, y = self.unpack_batch(batch)

        def train_loss(w: Params, lam: Params) -> Tensor:
            out = functional_call(self.model, w, (x,))
            return self.hp.train_objective(self.per_example_loss(out, y), x, y, w, lam)

        return train_loss

    def val_loss_fn(self, batch: Any) -> Callable[[Params, Params], Tensor]:
        """``(w, λ) ↦ L_V(w)``: the mean data loss on ``batch`` (λ does not enter it)."""
        x, y = self.unpack_batch(batch)

        def val_loss(w: Params, lam: Params) -> Tensor:
            return self.per_example_loss(functional_call(self.model, w, (x,)), y).mean()

        return val_loss

    def lam_detached(self) -> dict[str, Tensor]:
        """λ by name, detached."""
        return {k: v.detach() for k, v in self.hp.params().items()}

    # -- checkpoint identity ------------------------------------------------------------------------------------
    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        """The hyperparameters' names and shapes: a checkpoint of another search space cannot be resumed."""
        return {"hyperparameters": {k: list(s) for k, s in self.hp.shapes().items()}}

    # -- optimization ------------------------------------------------------------------------------------------
    def build_weight_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of w (first optimizer)."""
        return self.build_optimizer(self.optimizer, list(self.weight_params().values()), "optimizer")

    @override
    def configure_optimizers(self) -> Any:
        """Optimizers ``[w, λ]``; w's learning-rate schedule if one is given."""
        opt_w = self.build_weight_optimizer()
        opt_lam = self.build_optimizer(self.hyper_optimizer, self.hp.parameter_list(), "hyper_optimizer")
        sched = self.build_scheduler(self.lr_scheduler, opt_w, "lr_scheduler")
        return self.optimizers_config([opt_w, opt_lam], [sched])

    @override
    def on_train_start(self) -> None:
        """An empty hyper stream is an error; a warm-up as long as the run, a warning."""
        super().on_train_start()
        BilevelModule.check_hyper_stream(self)  # type: ignore[arg-type]
        shapes = ", ".join(f"{k} {tuple(s)}" for k, s in self.hp.shapes().items())
        self.info(f"{type(self).__name__} tunes {self.hp.numel()} hyperparameters: {shapes}")
        max_steps = self.trainer.max_steps
        if max_steps >= 0 and self.warmup_steps + self.hyper_every > max_steps:
            rank_zero_warn(
                f"warmup_steps={self.warmup_steps} + hyper_every={self.hyper_every} > the Trainer's max_steps="
                f"{max_steps}: no hyper step is taken, so λ never moves; lower warmup_steps or raise max_steps"
            )

    def is_hyper_batch(self) -> bool:
        """Whether the coming batch is a hyper batch: batches ``warmup_steps + k·hyper_every`` (``k >= 1``)."""
        post = int(self.inner_steps) - self.warmup_steps
        return post >= 0 and (post + 1) % self.hyper_every == 0

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        train_batch, hyper_batch = split_streams(batch)
        opt_w, opt_lam = self.optimizer_list()
        if self.is_hyper_batch():
            self.hyper_batch_step(train_batch, hyper_batch, opt_w, opt_lam)
        else:
            self.inner_step(train_batch, opt_w)

    def inner_step(self, batch: Any, opt_w: Any) -> None:
        """One step of w's optimizer on ``L_T(w, λ)`` (λ fixed), through the model's own forward (DDP reduces it)."""
        x, y = self.unpack_batch(batch)
        w = self.weight_params()
        loss = self.hp.train_objective(self.per_example_loss(self.model(x), y), x, y, w, self.lam_detached())
        self.inner_steps += 1
        if not self.finite_or_handle(loss, "training"):
            return
        opt_w.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_w.step()
        self.log_train_loss(loss, x.shape[0])

    def log_train_loss(self, loss: Tensor, batch_size: int) -> None:
        """Update and log ``train/loss``."""
        metric = self.stage_metrics("train")["loss"]
        metric(loss.detach(), batch_size)
        self.log("train/loss", metric, prog_bar=True, on_step=True, on_epoch=True)

    def hyper_batch_step(self, train_batch: Any, hyper_batch: Any, opt_w: Any, opt_lam: Any) -> None:
        """The weights' update and λ's step of a hyper batch (subclasses)."""
        raise NotImplementedError

    def apply_hypergradient(self, hg: Hypergradient, opt_lam: Any, batch_size: int) -> None:
        """Write ``λ.grad = total`` (averaged over ranks), step λ's optimizer, restore λ if it became non-finite."""
        self.hyper_steps_done += 1
        self.last_hypergradient = hg
        finite = torch.stack([torch.isfinite(t).all() for t in hg.total.values()]).all()
        if not self.all_ranks(finite & torch.isfinite(hg.val_loss)):
            self.skip_or_raise(
                f"non-finite hypergradient or held-out loss {float(hg.val_loss):.4g} at hyper step "
                f"{int(self.hyper_steps_done)} (inner step {int(self.inner_steps)})"
            )
            return
        params = self.hp.params()
        opt_lam.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.grad = self.reduce_mean(hg.total[name].to(p.dtype))
        previous = [p.detach().clone() for p in params.values()]
        opt_lam.step()
        if not self.all_ranks(torch.stack([torch.isfinite(p).all() for p in params.values()]).all()):
            with torch.no_grad():
                for p, old in zip(params.values(), previous):
                    p.copy_(old)
            self.skip_or_raise(f"a hyperparameter became non-finite at hyper step {int(self.hyper_steps_done)}")
            return
        self.hyper_loss_metric(hg.val_loss, batch_size)
        self.log("hyper/loss", self.hyper_loss_metric, prog_bar=True, on_step=True, on_epoch=True)
        if self.should_log_step():
            self.log_hypergradient(hg)

    def log_hypergradient(self, hg: Hypergradient) -> None:
        """Log ``hparam/<name>_mean`` and the hypergradient's norm and diagnostics."""
        logged = {f"hparam/{k}_mean": float(v.mean()) for k, v in self.hp.values().items()}
        sq = sum(float(t.square().sum()) for t in hg.total.values())
        logged["hypergrad/norm"] = math.sqrt(sq)
        logged["hypergrad/direct_norm"] = math.sqrt(sum(float(t.square().sum()) for t in hg.direct.values()))
        logged["hypergrad/hvps"] = float(hg.hvps)
        if hg.terms is not None:
            logged["hypergrad/terms"] = float(hg.terms)
        if hg.residual is not None:
            logged["hypergrad/residual"] = float(hg.residual)
        self.log_dict(logged, on_step=True, on_epoch=False)

    def finite_or_handle(self, loss: Tensor, what: str) -> bool:
        """Whether ``loss`` is finite on every rank; else :meth:`~hyperlit.base.HyperlitModule.skip_or_raise` and ``False``."""
        if self.all_ranks(torch.isfinite(loss).all()):
            return True
        self.skip_or_raise(
            f"non-finite {what} loss {loss.detach().cpu().tolist()} at inner step {int(self.inner_steps)}, hyper "
            f"step {int(self.hyper_steps_done)} (epoch {self.current_epoch})"
        )
        return False

    def hypergradient_or_handle(self, compute: Callable[[], Any]) -> Any:
        """``compute()``, or ``None`` after :meth:`~hyperlit.base.HyperlitModule.skip_or_raise` when it broke down (``HypergradientError``).

        Every rank must agree (collectives follow), so a breakdown on one rank skips the step on all.
        """
        try:
            hg = compute()
            error = ""
        except HypergradientError as err:
            hg, error = None, str(err)
        if self.all_ranks(hg is not None):
            return hg
        self.skip_or_raise(f"hypergradient breakdown at hyper step {int(self.hyper_steps_done) + 1}: {error}")
        self.hyper_steps_done += 1
        return None

    # -- evaluation ----------------------------------------------------------------------------------------------
    @override
    def configure_metrics(self) -> MetricCollection:
        """Batch-size-weighted mean loss and accuracy (a classifier's micro accuracy, the batch-weighted mean)."""
        metrics: dict[str, Any] = {"loss": weighted_mean()}
        if self.loss == "cross_entropy" or self.hp.num_classes is not None:
            metrics["acc"] = weighted_mean()
        return MetricCollection(metrics, compute_groups=False)

    def eval_batch(self, batch: Any) -> tuple[Tensor, Tensor | None, int]:
        """Mean data loss, accuracy (classifiers; ``None`` otherwise) and size of an evaluation batch."""
        x, y = self.unpack_batch(batch)
        out = self.model(x)
        loss = self.per_example_loss(out, y).mean()
        acc = None
        if not y.dtype.is_floating_point and out.dim() == 2:
            acc = (out.argmax(-1) == y).float().mean()
        return loss, acc, x.shape[0]

    def _eval_step(self, batch: Any, stage: str) -> None:
        loss, acc, n = self.eval_batch(batch)
        metrics = self.stage_metrics(stage)
        metrics["loss"].update(loss.detach(), n)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=stage == "val", on_step=False, on_epoch=True)
        if acc is not None and "acc" in metrics:
            metrics["acc"].update(acc, n)
            self.log(f"{stage}/acc", metrics["acc"], prog_bar=stage == "val", on_step=False, on_epoch=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The model's outputs for the batch's inputs (a bare tensor batch is taken as the inputs)."""
        x = batch if isinstance(batch, Tensor) else self.unpack_batch(batch)[0]
        return self.model(x)

    @override
    def on_train_end(self) -> None:
        values = ", ".join(
            f"{k}=mean {float(v.mean()):.4g} [{float(v.min()):.4g}, {float(v.max()):.4g}]"
            for k, v in self.hp.values().items()
        )
        self.info(f"{type(self).__name__}: {int(self.hyper_steps_done)} hyper steps; {values or 'no value to show'}")


class _ReducedSolver:
    """The user's solver on the rank-averaged system ``(H̄ + δI) x = b̄`` (``H̄``, ``b̄``: means over DDP ranks).

    With equal per-rank batch sizes the global batch's ``H`` and ``∂L_V/∂w`` are the rank means, so every rank solves
    the same system (the solvers are deterministic) and gets the same ``v``; the rank-local direct and mixed terms
    are linear in the batch, so the mean of the rank-local ``total`` is the global batch's hypergradient.
    """

    def __init__(self, solver: InverseHVPSolver, reduce: Callable[[Tensor], Tensor], damping: float) -> None:
        self.solver, self.reduce, self.damping = solver, reduce, damping

    def __repr__(self) -> str:
        return f"{self.solver!r} on H + {self.damping}·I"

    def __call__(self, hvp: Callable[[Params], Params], b: Params) -> tuple[Params, SolverInfo]:
        def reduced_hvp(v: Params) -> Params:
            hv = {k: self.reduce(t) for k, t in hvp(v).items()}
            return {k: hv[k] + self.damping * v[k] for k in hv} if self.damping else hv

        return self.solver(reduced_hvp, {k: self.reduce(t) for k, t in b.items()})


class ImplicitDifferentiationModule(HypergradientModule):
    """Hyperparameter optimization by implicit differentiation (Lorraine, Vicol & Duvenaud, AISTATS 2020).

    A hyper batch is one inner step on its train part, then the IFT hypergradient at the new weights on the same
    train batch (``H``, the mixed term) and the hyper batch (``∂L_V/∂w``) through
    :func:`~hyperlit.tuning.hypergrad.implicit_hypergradient`, and one step of λ's optimizer (Alg. 1 with
    ``hyper_every`` inner steps per hyper step).

    Under DDP every HVP and ``∂L_V/∂w`` are averaged over ranks inside the solve and the rank-local hypergradients
    are averaged before λ's step, which gives exactly the global batch's hypergradient on every rank.

    Args:
        model: See :class:`HypergradientModule`.
        solver: ``neumann`` (Alg. 3: ``α Σ_{j=0}^{i} (I − αH)^j b``, ``iterations`` = i, i + 1 terms), ``cg``
            (conjugate gradient, at most ``iterations``), ``identity`` (``α b``: one term, IHO's default
            ``num_neumann_terms=0``) or ``exact`` (dense Hessian, tiny models only).
        iterations: Neumann iterations ``i`` (>= 0) or CG iterations (>= 1).
        alpha: Neumann/identity step α, or ``"lr"``: the current learning rate of w's optimizer, as IHO's code
            does. Pitfall: tied to the lr, the estimator changes silently under a learning-rate schedule, and the
            series diverges once ``α >= 2/λ_max(H)`` (with momentum the inner step is larger than the lr; see
            :func:`~hyperlit.tuning.hypergrad.largest_hessian_eigenvalue`).
        damping: ``δ >= 0`` added to ``H`` for every solver (``(H + δI)⁻¹``; makes indefinite Hessians usable).
        tol: CG's relative-residual tolerance.
        hvp_mode: How Hessian-vector products are taken (see :func:`~hyperlit.tuning.hypergrad.make_hvp`):
            ``reverse-over-reverse`` (one stored graph reused by every product; the faster one on the CPU) or
            ``forward-over-reverse`` (no stored graph, less memory).
        **kwargs: The loop's settings: see :class:`HypergradientModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Literal["neumann", "cg", "identity", "exact"] = "neumann",
        iterations: int = 5,
        alpha: float | Literal["lr"] = 0.01,
        damping: float = 0.0,
        tol: float = 1e-10,
        hvp_mode: HVPMode = "reverse-over-reverse",
        **kwargs: Any,
    ) -> None:
        if hvp_mode not in ("reverse-over-reverse", "forward-over-reverse"):
            raise ValueError(f"hvp_mode must be 'reverse-over-reverse' or 'forward-over-reverse', got {hvp_mode!r}")
        if solver not in ("neumann", "cg", "identity", "exact"):
            raise ValueError(f"solver must be 'neumann', 'cg', 'identity' or 'exact', got {solver!r}")
        if alpha != "lr" and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a number > 0 or 'lr' (the inner learning rate), got {alpha!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be a number >= 0, got {damping!r}")
        minimum = 1 if solver == "cg" else 0
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < minimum:
            raise ValueError(f"iterations must be an int >= {minimum} for solver {solver!r}, got {iterations!r}")
        super().__init__(model, **kwargs)
        self.solver, self.iterations, self.alpha = solver, iterations, alpha
        self.damping, self.tol = float(damping), float(tol)
        self.hvp_mode = hvp_mode
        self.make_solver(0.1)  # bad settings fail here, not at the first hyper step

    def make_solver(self, lr: float) -> InverseHVPSolver:
        """The inverse-HVP solver of a hyper step (``lr``: the inner learning rate, for ``alpha="lr"``)."""
        alpha = float(lr) if self.alpha == "lr" else float(self.alpha)
        if self.solver == "neumann":
            return NeumannSolver(self.iterations, alpha)
        if self.solver == "identity":
            return IdentitySolver(alpha)
        if self.solver == "cg":
            return ConjugateGradientSolver(self.iterations, damping=self.damping, tol=self.tol)
        return ExactSolver(damping=self.damping)

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {**super().checkpoint_identity(), "solver": self.solver}

    @override
    def hyper_batch_step(self, train_batch: Any, hyper_batch: Any, opt_w: Any, opt_lam: Any) -> None:
        self.inner_step(train_batch, opt_w)
        # CG and the exact solver add δI themselves; the Neumann series gets it through the HVP
        shift = self.damping if self.solver in ("neumann", "identity") else 0.0
        solver = _ReducedSolver(self.make_solver(opt_w.param_groups[0]["lr"]), self.reduce_mean, shift)
        w = {k: v.detach() for k, v in self.weight_params().items()}
        was_training = self.training
        self.eval()
        try:
            hg = self.hypergradient_or_handle(
                lambda: implicit_hypergradient(
                    self.train_loss_fn(train_batch),
                    self.val_loss_fn(hyper_batch),
                    w,
                    self.lam_detached(),
                    solver,
                    hvp_mode=self.hvp_mode,
                )
            )
        finally:
            self.train(was_training)
        if hg is not None:
            self.apply_hypergradient(hg, opt_lam, self.unpack_batch(hyper_batch)[0].shape[0])


class UnrolledDifferentiationModule(HypergradientModule):
    """Hyperparameter optimization by (truncated) reverse-mode differentiation through inner SGD steps
    (Franceschi et al. 2017; Shaban et al. 2019 for ``truncate < steps``).

    Design: a hyper batch runs ``steps`` differentiable SGD steps on **its own** train part (the same batch every
    step) through :func:`~hyperlit.tuning.hypergrad.unrolled_hypergradient`, differentiating the last
    ``truncate``; the weights become ``w_T`` and λ takes one step on ``dL_V(w_T)/dλ`` from the hyper batch. So
    nothing but the weights and the optimizer state lives between Lightning batches (exact resume is free) and the
    graph of a hyper step is bounded by ``truncate`` steps on one batch. Spanning several batches would need the
    last batches and weights kept, and checkpointed, between Lightning steps.

    As every hyper step of the family, the unrolled steps run with the model in eval mode (dropout off), so a hyper
    batch's weight update differs from a plain inner step's for a network with dropout or BatchNorm.

    The inner optimizer *is* the differentiable heavy-ball SGD of ``unrolled_hypergradient``
    (``b ← μb + ∇L_T``, ``w ← w − ηb``): the first optimizer is ``torch.optim.SGD(lr=inner_lr, momentum=momentum)``
    (the same update), used for the warm-up and the batches between hyper batches, and its momentum buffer is the
    unrolled steps' starting velocity and receives their final one. (``optimizer`` cannot be set.)

    Under DDP a hyper batch gathers every rank's train and hyper parts, and every rank runs the same unrolled
    computation on the global batch (its inner steps cannot be averaged inside ``torch.func.grad``): the result is
    the single-process one, the hyper step itself is not parallel.

    Args:
        model: See :class:`HypergradientModule`.
        steps: Differentiable SGD steps per hyper batch ``T`` (>= 1).
        truncate: Differentiate only the last ``K`` of them (``None``: all, full reverse mode).
        inner_lr: SGD step size η of every inner step.
        momentum: Heavy-ball μ in ``[0, 1)``.
        **kwargs: The loop's settings: see :class:`HypergradientModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 5,
        truncate: int | None = None,
        inner_lr: float = 0.1,
        momentum: float = 0.9,
        **kwargs: Any,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if truncate is not None and (
            isinstance(truncate, bool) or not isinstance(truncate, int) or not 1 <= truncate <= steps
        ):
            raise ValueError(f"truncate must be None or an int in [1, steps={steps}], got {truncate!r}")
        if not (isinstance(inner_lr, (int, float)) and math.isfinite(inner_lr) and inner_lr > 0):
            raise ValueError(f"inner_lr must be a number > 0, got {inner_lr!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        default = inspect.signature(HypergradientModule.__init__).parameters["optimizer"].default
        if kwargs.pop("optimizer", default) is not default:  # the CLI passes the default through **kwargs
            raise ValueError(
                "UnrolledDifferentiationModule's inner optimizer is the differentiable SGD of its unrolled steps: set "
                "inner_lr and momentum instead of optimizer"
            )
        super().__init__(model, **kwargs)
        self.steps, self.truncate = steps, truncate
        self.inner_lr, self.momentum = float(inner_lr), float(momentum)

    @override
    def build_weight_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.weight_params().values())
        return torch.optim.SGD(params, lr=self.inner_lr, momentum=self.momentum)

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {**super().checkpoint_identity(), "steps": self.steps, "truncate": self.truncate}

    def _gathered(self, batch: Any) -> Any:
        """The global batch ``(x, y)`` (every rank's, rank-major) under DDP; the batch itself otherwise."""
        if not self.distributed:
            return batch
        x, y = self.unpack_batch(batch)
        return (self.all_gather(x).flatten(0, 1), self.all_gather(y).flatten(0, 1))

    @override
    def hyper_batch_step(self, train_batch: Any, hyper_batch: Any, opt_w: Any, opt_lam: Any) -> None:
        train_batch, hyper_batch = self._gathered(train_batch), self._gathered(hyper_batch)
        params = self.weight_params()
        lr = float(opt_w.param_groups[0]["lr"])  # follows a learning-rate schedule
        velocity = {}
        for name, p in params.items():
            buf = opt_w.state.get(p, {}).get("momentum_buffer")
            velocity[name] = torch.zeros_like(p) if buf is None else buf.detach()
        train_loss = self.train_loss_fn(train_batch)
        w0 = {k: v.detach() for k, v in params.items()}
        was_training = self.training
        self.eval()
        try:
            result = self.hypergradient_or_handle(lambda: self._unrolled(train_loss, hyper_batch, w0, lr, velocity))
        finally:
            self.train(was_training)
        self.inner_steps += 1
        if result is None:
            return
        hg, w_final = result
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(w_final[name])
                if self.momentum:
                    opt_w.state[p]["momentum_buffer"] = hg.velocity[name].clone()  # type: ignore[index]
        self.apply_hypergradient(hg, opt_lam, self.unpack_batch(hyper_batch)[0].shape[0])

    def _unrolled(
        self, train_loss: Callable[[Params, Params], Tensor], hyper_batch: Any, w0: Params, lr: float, velocity: Params
    ) -> tuple[Hypergradient, Params]:
        return unrolled_hypergradient(
            lambda w, lam, k: train_loss(w, lam),
            self.val_loss_fn(hyper_batch),
            w0,
            self.lam_detached(),
            self.steps,
            lr,
            self.momentum,
            self.truncate,
            velocity=velocity,
        )
