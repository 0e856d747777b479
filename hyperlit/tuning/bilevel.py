"""The alternating bilevel loop shared by Self-Tuning Networks and best-response hypernetworks.

Bilevel problem (MacKay et al. 2019, Eq. 1; Lorraine & Duvenaud 2018, Eq. 1):
``λ* = argmin_λ L_val(λ, w*(λ))`` with ``w*(λ) = argmin_w L_train(λ, w)``. A best-response approximation
``ŵ_φ(λ)`` is trained on training batches at perturbed hyperparameters (φ-steps), and λ (and the perturbation
scale σ) descend the held-out loss through ``ŵ_φ`` (λ-steps):

* φ-step (STN Alg. 1 line 4; L&D Alg. 3): ``λ_b = λ + σ ⊙ ε_b`` per example, detached; ``φ ← φ − α ∇_φ L_train``.
* λ-step (STN Alg. 1 line 7): model in eval mode, ``λ, σ ← descend L_val(ŵ_φ(λ + σ ⊙ ε)) − τ · H[p(ε | σ)]``
  (the entropy term and the perturbation only when σ is tuned).

Each Lightning training batch is ``{"train": ..., "hyper": ...}`` (see :mod:`hyperlit.streams`; the module says
``uses_hyper_stream = True``). A batch always gives one φ-step (unless ``train_steps == 0`` after warm-up, i.e. φ
frozen: L&D's global mode, phase 2); after warm-up, λ-steps are interleaved so that there are ``hyper_steps``
λ-steps for every ``train_steps`` φ-steps, on the batch's ``hyper`` part (when ``hyper_steps > train_steps``
several λ-steps share that batch, each with a fresh perturbation). An epoch is therefore one pass over the training
stream; the hyper stream is cycled.

Optimizers (always three, in this order): ``[φ, λ, σ]``, built from the ``phi_optimizer``, ``hyper_optimizer`` and
``sigma_optimizer`` factories; σ's is stepped only when σ is tuned. Lightning's ``global_step`` counts every
optimizer step, so it advances by up to three per batch; the loop's own counters (``phi_steps``,
``hyper_steps_done``) drive warm-up and alternation.

Under DDP the hyperparameters are excluded from DDP's reducer (``_ddp_params_and_buffers_to_ignore``) and their
gradients are computed with ``torch.autograd.grad`` and averaged over ranks by hand, so neither phase leaves
parameters without gradients. Logged losses and accuracies are ``torchmetrics`` metrics: under DDP every rank
logs the value over the whole split.

Logged after every λ-step: ``hparam/<name>`` (the constrained value) and ``sigma_unconstrained/<name>`` (σ, the std of
the perturbation on the *unconstrained* scale — e.g. of the logit of a dropout rate, of log λ for a log-scaled
strength — not on the value's own scale); the schedule CSV has the columns ``<name>`` and ``sigma_unconstrained_<name>``.

The checks at fit start (:meth:`BilevelModule.on_train_start`): a ``hyper`` stream without batches raises
``ValueError``; a warm-up as long as the run (``warmup_epochs >= max_epochs``, ``warmup_steps >= max_steps`` or
``>=`` the run's training batches) warns that λ never moves.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.functional.classification import multiclass_accuracy
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.hparams import Hyperparameter, HyperparameterSpace
from hyperlit.optim import check_factories
from hyperlit.streams import split_streams
from hyperlit.tuning.batches import unpack_xy
from hyperlit.tuning.metrics import weighted_mean

__all__ = ["SIGMA_COLUMN", "SIGMA_KEY", "BilevelModule"]

#: prefix of the logged σ values, the perturbation std on the unconstrained scale (``sigma_unconstrained/<name>``)
SIGMA_KEY = "sigma_unconstrained/"
#: prefix of the σ columns of the schedule CSV (``sigma_unconstrained_<name>``)
SIGMA_COLUMN = "sigma_unconstrained_"


class BilevelModule(HyperlitModule):
    """Base LightningModule for hyperparameter tuning with a best-response approximation.

    Subclasses implement :meth:`train_loss` and :meth:`hyper_loss` (and usually :meth:`evaluate` and
    :meth:`configure_metrics`, for an accuracy). Every batch (training, hyper, validation, test) is taken apart by
    :meth:`unpack_batch`: tuples/lists ``(x, y, ...)`` and dicts with the keys ``x``/``y``, ``input``/``target``
    or ``image``/``label``; override it for another layout.

    Args:
        hyperparameters: The tuned hyperparameters; ``None`` uses :meth:`default_hyperparameters`.
        train_steps: φ-steps per cycle (STN's T_train; official default 2). ``0`` freezes φ after warm-up.
        hyper_steps: λ-steps per cycle (STN's T_val; official default 1).
        warmup_epochs: Epochs of φ-steps only (λ fixed but perturbed) before λ starts to move (official CNN: 5).
        warmup_steps: Alternatively (or additionally) a number of warm-up φ-steps (official LSTM: one epoch).
        entropy_weight: τ, the weight of the perturbation entropy in the λ-step objective.
        tune_sigma: Learn the perturbation scale σ (with the entropy term) in the λ-steps.
        hnet_input: What the hypernetwork sees: ``unconstrained`` (official CNN) or ``constrained`` values.
        phi_optimizer: Optimizer of the weights φ (first optimizer; official CNN: SGD lr 0.01, momentum 0.9).
        hyper_optimizer: Optimizer of the hyperparameters λ (second optimizer; official: Adam lr 3e-3).
        sigma_optimizer: Optimizer of σ's unconstrained scale (third optimizer, stepped only with ``tune_sigma``;
            official: Adam lr 3e-3).
        phi_lr_scheduler: Learning-rate schedule of φ's optimizer, stepped once per epoch (``None``: constant), e.g.
            ``lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [60, 120, 160], 0.1)``.
        grad_clip: Clip φ's gradient norm to this value (``None``: no clipping).
        nan_policy: On a non-finite loss or hyperparameter: ``raise`` (stop with the step and the value) or
            ``skip`` (skip that step with a warning and count it in ``skipped_steps``).
        seed: Seed of the module's generator (perturbations, dropout masks, augmentation); rank ``r`` of a DDP run
            draws from ``seed + 1_000_003·r``.
    """

    #: training batches are ``{"train": ..., "hyper": ...}`` (see :mod:`hyperlit.streams`)
    uses_hyper_stream: ClassVar[bool] = True
    #: step counters that ``--init_from`` (:func:`hyperlit.checkpoint.load_weights`) leaves at zero: a new run
    init_from_skip: tuple[str, ...] = ("phi_steps", "warmup_phi_steps", "hyper_steps_done", "skipped_steps")

    def __init__(
        self,
        hyperparameters: list[Hyperparameter] | None = None,
        train_steps: int = 2,
        hyper_steps: int = 1,
        warmup_epochs: int = 0,
        warmup_steps: int = 0,
        entropy_weight: float = 1e-3,
        tune_sigma: bool = True,
        hnet_input: Literal["unconstrained", "constrained"] = "unconstrained",
        phi_optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        hyper_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=3e-3),
        sigma_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=3e-3),
        phi_lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = None,
        nan_policy: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if train_steps < 0 or hyper_steps < 1:
            raise ValueError(f"need train_steps >= 0 and hyper_steps >= 1, got {train_steps}, {hyper_steps}")
        if warmup_epochs < 0 or warmup_steps < 0:
            raise ValueError(f"warm-up lengths must be >= 0, got {warmup_epochs} epochs, {warmup_steps} steps")
        if train_steps == 0 and warmup_epochs == 0 and warmup_steps == 0:
            raise ValueError("train_steps=0 freezes φ after warm-up, so it needs a warm-up (phase 1)")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.check_nan_policy(nan_policy)
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        check_factories(
            phi_optimizer=phi_optimizer,
            hyper_optimizer=hyper_optimizer,
            sigma_optimizer=sigma_optimizer,
            phi_lr_scheduler=phi_lr_scheduler,
        )
        self.train_steps = train_steps
        self.hyper_steps = hyper_steps
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.entropy_weight = entropy_weight
        self.tune_sigma = tune_sigma
        self.phi_optimizer = phi_optimizer
        self.hyper_optimizer = hyper_optimizer
        self.sigma_optimizer = sigma_optimizer
        self.phi_lr_scheduler = phi_lr_scheduler
        self.grad_clip = grad_clip
        self.nan_policy = nan_policy

        entries = list(hyperparameters) if hyperparameters is not None else self.default_hyperparameters()
        self.space = HyperparameterSpace(entries, hnet_input=hnet_input)
        # own counters (Lightning's global_step counts every optimizer's step)
        self.register_buffer("phi_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("warmup_phi_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("hyper_steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.schedule: list[dict[str, float]] = []
        #: mean held-out loss of the λ-steps (logged as ``hyper/loss``)
        self.hyper_loss_metric = weighted_mean()
        # λ and σ get their gradients by hand (see module docstring); DDP must not reduce them
        self._ddp_params_and_buffers_to_ignore = ["space.unconstrained", "space.scale"]

    # -- to be provided by subclasses -------------------------------------------------------------
    def default_hyperparameters(self) -> list[Hyperparameter]:
        """The hyperparameters tuned when none are given (model-specific)."""
        raise ValueError(f"{type(self).__name__} has no default hyperparameters: pass `hyperparameters`")

    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Training-set objective at per-example unconstrained hyperparameters ``lam`` (B, H), train mode."""
        raise NotImplementedError

    def hyper_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Held-out objective at ``lam`` (B, H), eval mode; differentiable w.r.t. ``lam`` via the hypernet."""
        raise NotImplementedError

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a training, hyper, validation or test batch: the one place a batch is taken apart.

        Accepts a tuple/list ``(x, y, ...)`` or a dict with the keys ``x``/``y``, ``input``/``target`` or
        ``image``/``label`` (see :func:`~hyperlit.tuning.batches.unpack_xy`); ``TypeError`` naming these forms
        otherwise. Override it for another layout.
        """
        return unpack_xy(batch, type(self).__name__)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The network's outputs at the current, unperturbed hyperparameters (eval mode) for the batch's inputs
        (a bare tensor batch is taken as the inputs)."""
        x = batch if isinstance(batch, Tensor) else self.unpack_batch(batch)[0]
        out = self(x)
        return out.logits if hasattr(out, "logits") else out

    def batch_size(self, batch: Any) -> int:
        """Number of examples in a batch: the leading dimension of :meth:`unpack_batch`'s ``x``."""
        return int(self.unpack_batch(batch)[0].shape[0])

    def evaluate(self, batch: Any) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Validation/test outputs at the current, unperturbed hyperparameters: the batch's mean loss and, for a
        classifier, ``(logits, labels)`` for the accuracy (``None`` otherwise)."""
        return self.hyper_loss(batch, self.space.repeat(self.batch_size(batch))), None

    def eval_metrics(self, batch: Any) -> dict[str, Tensor]:
        """The metrics of one batch (``loss`` and, for classifiers, ``acc``) without a Trainer."""
        loss, classes = self.evaluate(batch)
        metrics = {"loss": loss}
        if classes is not None:
            logits, labels = classes
            metrics["acc"] = multiclass_accuracy(logits, labels, num_classes=logits.shape[-1], average="micro")
        return metrics

    @override
    def configure_metrics(self) -> MetricCollection:
        """Batch-size-weighted mean loss (subclasses add an accuracy)."""
        return MetricCollection({"loss": weighted_mean()}, compute_groups=False)

    def phi_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in φ-steps: every parameter outside the hyperparameter space by default."""
        hyper = {id(p) for p in self.space.parameters()}
        return [p for p in self.parameters() if id(p) not in hyper and p.requires_grad]

    def sample_train_lambda(self, batch_size: int) -> Tensor:
        """Hyperparameters of a φ-step (detached): ``λ + σ ⊙ ε`` per example."""
        with torch.no_grad():
            return self.space.perturb(batch_size, generator=self.rng)

    def sample_hyper_lambda(self, batch_size: int) -> Tensor:
        """Hyperparameters of a λ-step: perturbed when σ is tuned, else λ repeated (both carry gradient)."""
        if self.tune_sigma:
            return self.space.perturb(batch_size, generator=self.rng)
        return self.space.repeat(batch_size)

    # -- generator and checkpoint state ---------------------------------------------------------------
    @override
    def generator_seed(self) -> int:
        """Per-rank streams: under DDP every rank perturbs its own shard with its own ε."""
        return self.seed + 1_000_003 * self.global_rank

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        """The tuned hyperparameters' names: a checkpoint of another search space cannot be resumed."""
        return {"hyperparameter_names": list(self.space.names)}

    @override
    def checkpoint_state(self) -> dict[str, Any]:
        return {"schedule": list(self.schedule)}

    @override
    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.schedule = list(state.get("schedule", []))

    # -- optimization ------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        """Optimizers in a fixed order: ``[φ, λ, σ]``; φ's learning-rate schedule if one is given."""
        phi = self.phi_parameters()
        if not phi:
            raise ValueError(f"{type(self).__name__} has no φ parameters to train")
        opt_phi = self.build_optimizer(self.phi_optimizer, phi, "phi_optimizer")
        opt_lam = self.build_optimizer(self.hyper_optimizer, [self.space.unconstrained], "hyper_optimizer")
        opt_sigma = self.build_optimizer(self.sigma_optimizer, [self.space.scale], "sigma_optimizer")
        sched = self.build_scheduler(self.phi_lr_scheduler, opt_phi, "phi_lr_scheduler")
        return self.optimizers_config([opt_phi, opt_lam, opt_sigma], [sched])

    @override
    def on_train_start(self) -> None:
        """Before the first step: an empty hyper stream is an error; a warm-up outlasting the run, a warning."""
        super().on_train_start()
        self.check_hyper_stream()
        self.warn_if_lambda_never_moves()

    def check_hyper_stream(self) -> None:
        """Raise ``ValueError`` when the training loaders' ``hyper`` stream has no batches.

        Lightning's ``max_size_cycle`` loader cannot cycle an empty stream and ends every epoch at once, so the run
        would take no step at all and still finish without an error. Unsized loaders are not checked.
        """
        loaders = self.trainer.train_dataloader
        if not isinstance(loaders, Mapping) or "hyper" not in loaders:
            return  # not a two-stream batch: the first training step says what is needed (split_streams)
        hyper = loaders["hyper"]
        if sized_len(hyper) != 0:
            return
        dataset = getattr(hyper, "dataset", None)
        examples = sized_len(dataset) if dataset is not None else None
        detail = (
            f" ({examples} held-out examples, batch_size={getattr(hyper, 'batch_size', None)}, "
            f"drop_last={getattr(hyper, 'drop_last', None)})"
            if examples is not None
            else ""
        )
        raise ValueError(
            f"the hyper stream (the held-out batches of the λ-steps) has no batches{detail}, so {type(self).__name__} "
            "could never tune its hyperparameters: give the hyper/validation split at least one full batch (e.g. a "
            "non-zero hyper/validation fraction in the DataModule's `fractions`, or a smaller batch_size)"
        )

    def warn_if_lambda_never_moves(self) -> None:
        """Warn when the warm-up (``warmup_epochs``/``warmup_steps``) lasts the whole run: no λ-step is taken."""
        trainer = self.trainer
        max_epochs = trainer.max_epochs
        epochs_known = max_epochs is not None and max_epochs >= 0
        if self.warmup_epochs > 0 and epochs_known and self.warmup_epochs >= max_epochs:  # type: ignore[operator]
            rank_zero_warn(
                f"warmup_epochs={self.warmup_epochs} >= the Trainer's max_epochs={max_epochs}: the warm-up lasts the "
                "whole run, so λ never moves (no λ-step is taken); lower warmup_epochs or raise max_epochs"
            )
        left = self.warmup_steps - int(self.phi_steps)  # warm-up φ-steps still to come, one per batch
        if self.warmup_steps <= 0 or left <= 0:
            return
        steps_left = trainer.max_steps - trainer.global_step  # a warm-up batch is one optimizer step
        per_epoch = trainer.num_training_batches
        if trainer.max_steps >= 0 and steps_left <= left:
            rank_zero_warn(
                f"warmup_steps={self.warmup_steps} >= the Trainer's max_steps={trainer.max_steps}: the warm-up lasts "
                "the whole run, so λ never moves (no λ-step is taken); lower warmup_steps or raise max_steps"
            )
        elif epochs_known and math.isfinite(per_epoch):
            total = int(per_epoch) * max(0, max_epochs - self.current_epoch)  # type: ignore[operator]
            if total <= left:
                rank_zero_warn(
                    f"warmup_steps={self.warmup_steps} >= the run's {total} training batches (max_epochs={max_epochs} "
                    f"× {int(per_epoch)} per epoch): the warm-up lasts the whole run, so λ never moves (no λ-step is "
                    "taken); lower warmup_steps or train for more batches"
                )

    def in_warmup(self) -> bool:
        """Whether λ is still held fixed (warm-up in epochs and/or φ-steps)."""
        return self.current_epoch < self.warmup_epochs or int(self.phi_steps) < self.warmup_steps

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        train_batch, hyper_batch = split_streams(batch)
        opt_phi, opt_lam, opt_sigma = self.optimizer_list()
        warm = self.in_warmup()
        if warm or self.train_steps > 0:
            self._phi_step(train_batch, opt_phi, warm)
        if warm:
            return
        if self.train_steps == 0:
            owed = self.hyper_steps
        else:
            post = int(self.phi_steps) - int(self.warmup_phi_steps)
            # λ-steps are never taken during warm-up, so every λ-step so far counts against post-warm-up φ-steps
            owed = (post * self.hyper_steps) // self.train_steps - int(self.hyper_steps_done)
        for _ in range(max(0, owed)):
            self._hyper_step(hyper_batch, opt_lam, opt_sigma)

    def _phi_step(self, batch: Any, opt: Any, warm: bool) -> None:
        lam = self.sample_train_lambda(self.batch_size(batch))
        loss = self.train_loss(batch, lam)
        self.phi_steps += 1
        if warm:
            self.warmup_phi_steps += 1
        if not self._finite_or_handle(loss, "training"):
            return
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        metric = self.stage_metrics("train")["loss"]
        metric(loss.detach(), self.batch_size(batch))
        self.log("train/loss", metric, prog_bar=True, on_step=True, on_epoch=True)

    def _hyper_step(self, batch: Any, opt_lam: Any, opt_sigma: Any) -> None:
        was_training = self.training
        self.eval()
        try:
            lam = self.sample_hyper_lambda(self.batch_size(batch))
            loss = self.hyper_loss(batch, lam)
            objective = loss - self.entropy_weight * self.space.entropy() if self.tune_sigma else loss
        finally:
            self.train(was_training)
        self.hyper_steps_done += 1
        if not self._finite_or_handle(loss, "hyper (validation)"):
            return
        params = [self.space.unconstrained, self.space.scale] if self.tune_sigma else [self.space.unconstrained]
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        opt_lam.zero_grad(set_to_none=True)
        opt_sigma.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self._reduce_hyper_grads(params)
        previous = [p.detach().clone() for p in params]
        opt_lam.step()
        if self.tune_sigma:
            opt_sigma.step()
        try:
            self.space.check_finite(step=int(self.hyper_steps_done))
        except FloatingPointError as err:
            if self.nan_policy == "raise":
                raise
            rank_zero_warn(f"{err}; restoring the previous values (nan_policy='skip')")
            with torch.no_grad():
                for p, old in zip(params, previous):
                    p.copy_(old)
            self.skipped_steps += 1
            return
        self.hyper_loss_metric(loss.detach(), self.batch_size(batch))
        self.log("hyper/loss", self.hyper_loss_metric, prog_bar=True, on_step=True, on_epoch=True)
        self._record_hyperparameters()

    def _reduce_hyper_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Average λ/σ gradients over DDP ranks (they bypass DDP's reducer)."""
        for p in params:
            if p.grad is not None:
                p.grad = self.reduce_mean(p.grad)

    def _finite_or_handle(self, loss: Tensor, what: str) -> bool:
        # every rank must take (or skip) the step together, or the gradient all-reduce would deadlock
        if self.all_ranks(torch.isfinite(loss).all()):
            return True
        msg = (
            f"non-finite {what} loss {loss.detach().cpu().tolist()} at φ-step {int(self.phi_steps)}, "
            f"λ-step {int(self.hyper_steps_done)} (epoch {self.current_epoch}); hyperparameters: "
            f"{self.hyperparameter_summary()}"
        )
        self.skip_or_raise(msg)
        return False

    # -- logging and the schedule --------------------------------------------------------------------
    def _record_hyperparameters(self) -> None:
        """Append a schedule row and log the values: ``hparam/<name>`` (constrained value) and
        ``sigma_unconstrained/<name>`` (σ, the std of the perturbation on the *unconstrained* scale, e.g. of the logit
        of a dropout rate); vector entries log their ``_mean``. The schedule's σ columns are
        ``sigma_unconstrained_<name>``."""
        values, sigmas = self.space.values(), self.space.sigmas()
        row: dict[str, float] = {
            "hyper_step": float(self.hyper_steps_done),
            "phi_step": float(self.phi_steps),
            "epoch": float(self.current_epoch),
        }
        logged: dict[str, float] = {}
        for name in self.space.names:
            v, s = values[name], sigmas[name]
            if isinstance(v, Tensor):
                row[f"{name}_mean"] = logged[f"hparam/{name}_mean"] = v.mean().item()
                row[f"{name}_min"], row[f"{name}_max"] = v.min().item(), v.max().item()
                sigma = s.mean().item()  # type: ignore[union-attr]
                row[f"{SIGMA_COLUMN}{name}_mean"] = logged[f"{SIGMA_KEY}{name}_mean"] = sigma
            else:
                row[name] = logged[f"hparam/{name}"] = v
                row[f"{SIGMA_COLUMN}{name}"] = logged[f"{SIGMA_KEY}{name}"] = float(s)  # type: ignore[arg-type]
        self.schedule.append(row)
        self.log_dict(logged, on_step=True, on_epoch=False)

    def hyperparameter_summary(self) -> str:
        """Current constrained values and σ (the perturbation std on the unconstrained scale) as one line of text,
        e.g. ``dropout0=0.2501 [σ (unconstrained scale)=0.5]``."""
        parts = []
        values, sigmas = self.space.values(), self.space.sigmas()
        for name in self.space.names:
            v, s = values[name], sigmas[name]
            if isinstance(v, Tensor):
                parts.append(
                    f"{name}=mean {v.mean().item():.4g} [{v.min().item():.4g}, {v.max().item():.4g}] "
                    f"[σ (unconstrained scale)=mean {s.mean().item():.3g}]"  # type: ignore[union-attr]
                )
            else:
                parts.append(f"{name}={v:.4g} [σ (unconstrained scale)={float(s):.3g}]")  # type: ignore[arg-type]
        return ", ".join(parts)

    def write_schedule_csv(self, path: str | Path) -> Path:
        """Write the hyperparameter schedule (one row per λ-step) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields: list[str] = []
        for row in self.schedule:
            fields += [k for k in row if k not in fields]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields or ["hyper_step"])
            writer.writeheader()
            writer.writerows(self.schedule)
        return path

    @override
    def on_train_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective: call on every rank; None without a logger
        if self.trainer.is_global_zero:
            if self.schedule and log_dir and self.trainer.logger is not None:
                path = self.write_schedule_csv(Path(log_dir) / "hparam_schedule.csv")
                self.info(f"hyperparameter schedule written to {path}")
            self.info(f"Tuned hyperparameters: {self.hyperparameter_summary()}")

    # -- evaluation ----------------------------------------------------------------------------------
    def _eval_step(self, batch: Any, stage: str) -> None:
        """Update the stage's loss (and accuracy) metrics; Lightning computes, syncs and resets them per epoch."""
        loss, classes = self.evaluate(batch)
        metrics = self.stage_metrics(stage)
        metrics["loss"].update(loss.detach(), self.batch_size(batch))
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=stage == "val", on_step=False, on_epoch=True)
        if classes is not None and "acc" in metrics:
            metrics["acc"].update(*classes)
            self.log(f"{stage}/acc", metrics["acc"], prog_bar=stage == "val", on_step=False, on_epoch=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")
