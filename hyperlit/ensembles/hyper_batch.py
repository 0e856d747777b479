"""Hyper-batch ensembles as a LightningModule (Wenzel, Snoek, Tran & Jenatton, NeurIPS 2020, §4).

K BatchEnsemble members share the weights of one network whose layers are Self-Tuning-Network layers
(:class:`~hyperlit.nn.batch_ensemble.HyperBatchEnsembleLinear`/``Conv2d``): member k at hyperparameters λ computes

    y = x (W ⊙ r_k s_kᵀ) + b_k + e1(λ) ⊙ [x (W' ⊙ u_k v_kᵀ)] + e2(λ) ⊙ b'_k,      e(λ) = V λ̃ (STN eq. 9)

so one forward pass serves K members with K hyperparameter settings. Every member has its own λ_k and
perturbation scale σ_k (:class:`~hyperlit.ensembles.space.MemberHyperparameterSpace`), and the STN alternation of
:class:`~hyperlit.tuning.stn.SelfTuningModule` trains them (google/uncertainty-baselines' ``hyperbatchensemble.py``
has the same structure):

* weight step (every training batch): the N examples are tiled K times (member-major), every row draws its own
  ``λ_{k,i} = λ_k + σ_k ⊙ ε``, and the loss is the mean member cross-entropy (UB's Gibbs CE) plus the
  λ-dependent penalty ``Σ_layers λ_layer · ‖W + diag(e1) W'‖² / n_train`` of every row
  (:meth:`~hyperlit.nn.batch_ensemble.HyperBatchEnsembleModel.penalty`; divided by the training-set size as UB does);
* λ-step (``hyper_steps`` per ``train_steps`` weight steps, UB: one per three): eval mode, the held-out batch tiled
  K times at perturbed ``λ_k``, loss = the **ensemble** cross-entropy ``−log (1/K) Σ_k p_k(y | x)`` − τ·H[σ]; the
  gradient reaches λ_k only through the response path e(λ), never through the penalty;
* evaluation: member k at its unperturbed λ_k, probabilities averaged
  (:class:`~hyperlit.ensembles.base.EnsembleEvaluation`): ``nll``, ``acc``, ``ece``, ``brier``, ``gibbs_nll``,
  ``disagreement``.

Differences from UB, on purpose: λ_k lives in STN's Gaussian container (mean and learnable σ on the unconstrained,
here log, scale) instead of UB's learnable log-uniform bounds. The hypernetwork input follows UB's ``LogScaler``
(``hnet_scaling="log_range"``): ``(log λ − log min)/(log max − log min)`` over ``l2_range``.

Optimizers (as every bilevel module): ``[φ, λ, σ]``; φ's has two parameter groups ``[shared, fast]``, the fast
weights (r, s, u, v and the member biases) at ``fast_lr_multiplier`` × lr without weight decay (UB: 0.5).
Logged after every λ-step: ``hparam/<name>/m<k>`` for every member k (the schedule CSV has ``<name>_m<k>`` and
``sigma_unconstrained_<name>_m<k>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from typing_extensions import override

from hyperlit.ensembles.base import EnsembleEvaluation, check_ensemble_args
from hyperlit.ensembles.batch_ensemble import fast_weight_groups
from hyperlit.ensembles.metrics import ensemble_log_probs, ensemble_metrics, ensemble_nll
from hyperlit.ensembles.space import MemberHyperparameterSpace
from hyperlit.hparams import Hyperparameter
from hyperlit.nn.batch_ensemble import HyperBatchEnsembleModel, convert_to_hyper_batch_ensemble, tile_members
from hyperlit.tuning.bilevel import SIGMA_COLUMN, SIGMA_KEY
from hyperlit.tuning.metrics import weighted_mean
from hyperlit.tuning.stn import SelfTuningModule

__all__ = ["HyperBatchEnsembleModule"]


class HyperBatchEnsembleModule(EnsembleEvaluation, SelfTuningModule):
    """Hyper-batch ensemble of a user's classifier: K rank-1 members, each tuning its own hyperparameters (STN).

    Args:
        net: A plain classifier (converted with :func:`~hyperlit.nn.batch_ensemble.convert_to_hyper_batch_ensemble`:
            every ``nn.Linear``/``nn.Conv2d`` becomes a hyper-batch layer holding its weights, one L2 strength per
            layer unless ``l2_hparams`` groups them) or an already converted
            :class:`~hyperlit.nn.batch_ensemble.HyperBatchEnsembleModel`.
        ensemble_size: Number of members K (an already converted model keeps its own).
        num_classes: Number of classes.
        l2_hparams: Dotted layer paths → L2 hyperparameter names (layers may share one), for the conversion.
        dropout_hparams: ``nn.Dropout`` paths → dropout hyperparameter names, for the conversion.
        l2_range: Range of the default L2 strengths (UB: 0.1 to 100, before the division by the train-set size).
        hyperparameters: The search space (one entry per name, shared by all members); ``None``: the network's
            defaults.
        member_init: Optional K dicts name → initial value, one per member.
        init_spread: Standard deviation of a deterministic jitter of the members' initial (unconstrained) λ.
        train_size: Training-set size dividing the penalty; ``None``: the length of the training stream's
            dataset at fit start (saved in checkpoints).
        fast_lr_multiplier: Learning rate of the fast weights relative to the shared weights (UB: 0.5).
        tie_fast_weights: Share (r, s) between the general and the response path (UB default).
        hnet_scaling: ``log_range`` (UB's ``LogScaler``): the layers see each log-scaled strength as
            ``(log λ − log low) / (log high − log low)`` over ``l2_range``; ``none``: ``log λ`` (STN's input). With
            ``none`` the gates ``V λ̃`` scale with ``log λ`` itself.
        fast_init_scale: Standard deviation of the N(1, scale²) fast-weight initialisation (UB's HBE: 0.75).
        **kwargs: The STN loop's settings (``train_steps``, ``hyper_steps``, warm-up, ``entropy_weight``,
            ``tune_sigma``, the optimizers, ``phi_lr_scheduler``, ``grad_clip``, ``nan_policy``, ``seed``): see
            :class:`~hyperlit.tuning.bilevel.BilevelModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        ensemble_size: int = 4,
        num_classes: int = 10,
        l2_hparams: Mapping[str, str] | None = None,
        dropout_hparams: Mapping[str, str] | None = None,
        l2_range: tuple[float, float] = (0.1, 100.0),
        hyperparameters: list[Hyperparameter] | None = None,
        tune: list[str] | None = None,
        member_init: Sequence[Mapping[str, float]] | None = None,
        init_spread: float = 0.0,
        train_size: int | None = None,
        fast_lr_multiplier: float = 0.5,
        tie_fast_weights: bool = True,
        fast_init_scale: float = 0.75,
        plot_schedule: bool = False,
        train_steps: int = 3,
        hnet_scaling: Literal["log_range", "none"] = "log_range",
        **kwargs: Any,
    ) -> None:
        if not isinstance(net, HyperBatchEnsembleModel):
            check_ensemble_args(ensemble_size, num_classes)
            net = convert_to_hyper_batch_ensemble(
                net,
                ensemble_size,
                l2_hparams=l2_hparams,
                dropout_hparams=dropout_hparams,
                tie_fast_weights=tie_fast_weights,
                fast_init_scale=fast_init_scale,
                l2_range=tuple(l2_range),
                seed=int(kwargs.get("seed", 0)),
            )
        k, c = check_ensemble_args(net.ensemble_size, num_classes)
        if fast_lr_multiplier <= 0:
            raise ValueError(f"fast_lr_multiplier must be > 0, got {fast_lr_multiplier}")
        if hnet_scaling not in ("log_range", "none"):
            raise ValueError(f"hnet_scaling must be 'log_range' or 'none', got {hnet_scaling!r}")
        lo, hi = (float(v) for v in l2_range)
        if not 0 < lo < hi:
            raise ValueError(f"l2_range must satisfy 0 < low < high, got {tuple(l2_range)}")
        if train_size is not None and train_size < 1:
            raise ValueError(f"train_size must be >= 1 or None, got {train_size}")
        super().__init__(
            net,
            hyperparameters=hyperparameters,
            tune=tune,
            loss="cross_entropy",
            plot_schedule=plot_schedule,
            train_steps=train_steps,
            **kwargs,
        )
        self.ensemble_size, self.num_classes = k, c
        self.space = MemberHyperparameterSpace(
            self.space.entries,
            k,
            hnet_input=self.space.hnet_input_mode,
            member_init=member_init,
            init_spread=init_spread,
            seed=self.seed,
        )
        self.fast_lr_multiplier = float(fast_lr_multiplier)
        self.hnet_scaling = hnet_scaling
        self.log_l2_range = (math.log(lo), math.log(hi))
        # the columns the hypernetwork sees as (log λ − log low) / (log high − log low): log-scaled strengths
        log_columns = torch.zeros(self.space.dim, dtype=torch.bool)
        for h in self.space.entries:
            if h.transform == "log":
                log_columns[self.space.slice(h.name)] = True
        self.register_buffer("_log_columns", log_columns, persistent=False)
        self.register_buffer("train_size", torch.tensor(0 if train_size is None else int(train_size)))
        self.save_hyperparameters(ignore=["net"])

    # -- data sizes and the penalty scale ----------------------------------------------------------------------
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if int(self.train_size) == 0:
            self.train_size.fill_(self._infer_train_size())
            self.info(
                f"{type(self).__name__}: the λ-dependent L2 penalty is divided by n_train = {int(self.train_size)}"
            )

    def _infer_train_size(self) -> int:
        loaders = self.trainer.train_dataloader
        loader = loaders.get("train") if isinstance(loaders, Mapping) else loaders
        dataset = getattr(loader, "dataset", None)
        try:
            return len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"{type(self).__name__} divides its L2 penalty by the training-set size, which the training loader "
                "does not tell (an iterable dataset): pass train_size"
            ) from None

    def _penalty_scale(self) -> float:
        n = int(self.train_size)
        if n == 0:
            rank_zero_warn("train_size is not known yet (no fit started): the L2 penalty is not divided by it")
            return 1.0
        return 1.0 / n

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {**super().checkpoint_identity(), "ensemble_size": self.ensemble_size}

    @override
    def hnet_input(self, lam: Tensor) -> Tensor:
        """What the hyper-batch layers see: with ``hnet_scaling="log_range"`` (UB's ``LogScaler``) every log-scaled
        strength as ``(log λ − log low) / (log high − log low)`` over ``l2_range`` (0 to 1 inside the range), the
        other columns as the space gives them; ``"none"``: ``log λ`` itself (STN's unconstrained input)."""
        base = self.space.hnet_input(lam)
        if self.hnet_scaling == "none" or not bool(self._log_columns.any()):
            return base
        log_lam = lam if self.space.hnet_input_mode == "unconstrained" else base.clamp_min(1e-30).log()
        a, b = self.log_l2_range
        return torch.where(self._log_columns, (log_lam - a) / (b - a), base)

    # -- λ rows: K·N member-major ------------------------------------------------------------------------------
    @override
    def sample_train_lambda(self, batch_size: int) -> Tensor:
        """``λ_k + σ_k ⊙ ε`` for every row of the tiled batch (K·N rows, member-major), detached."""
        with torch.no_grad():
            return self.space.perturb(self.ensemble_size * batch_size, generator=self.rng)

    @override
    def sample_hyper_lambda(self, batch_size: int) -> Tensor:
        rows = self.ensemble_size * batch_size
        if self.tune_sigma:
            return self.space.perturb(rows, generator=self.rng)
        return self.space.repeat(rows)

    def _member_forward(self, x: Tensor, lam: Tensor, train: bool) -> Tensor:
        """Outputs ``(K·N, C)`` of the tiled batch at the rows' unconstrained λ ``(K·N, H)``."""
        hp = self.hparam_dict(lam)
        xt = tile_members(x, self.ensemble_size)
        if train:
            xt = self.net.augment(xt, hp, generator=self.rng)
        return self.net(xt, self.hnet_input(lam), hp, generator=self.rng if train else None)

    @override
    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Mean member cross-entropy (Gibbs CE) on the tiled batch + the rows' mean λ-dependent penalty."""
        x, y = self.unpack_batch(batch)
        out = self._member_forward(x, lam, train=True)
        loss = F.cross_entropy(out, y.repeat(self.ensemble_size))
        penalty = self.net.penalty(self.hnet_input(lam), self.hparam_dict(lam))
        if penalty is not None:
            loss = loss + self._penalty_scale() * penalty.mean()
        return loss

    @override
    def hyper_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Ensemble cross-entropy of the held-out batch (eval mode); λ's gradient flows through e(λ) only."""
        x, y = self.unpack_batch(batch)
        out = self._member_forward(x, lam, train=False)
        return ensemble_nll(out.view(self.ensemble_size, x.shape[0], -1), y).mean()

    @override
    def member_logits(self, x: Tensor) -> Tensor:
        """Member k's logits at its unperturbed λ_k, ``(K, N, C)``."""
        lam = self.space.repeat(self.ensemble_size * x.shape[0])
        return self._member_forward(x, lam, train=False).view(self.ensemble_size, x.shape[0], -1)

    @override
    def forward(self, x: Tensor, lam: Tensor | None = None) -> Tensor:
        """Member logits ``(K, N, C)`` at the current λ_k (or at the given ``(K·N, H)`` rows)."""
        if lam is None:
            return self.member_logits(x)
        return self._member_forward(x, lam, train=False).view(self.ensemble_size, x.shape[0], -1)

    @override
    def evaluate(self, batch: Any) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Ensemble NLL of the batch and ``(ensemble log-probabilities, labels)`` at the current λ_k."""
        x, y = self.unpack_batch(batch)
        logits = self.member_logits(x)
        return ensemble_nll(logits, y).mean(), (ensemble_log_probs(logits), y)

    @override
    def configure_metrics(self) -> MetricCollection:
        """The ensemble metrics of :class:`~hyperlit.ensembles.base.EnsembleEvaluation` plus the training loss."""
        metrics = ensemble_metrics(self.num_classes, self.ensemble_size)
        metrics.add_metrics({"loss": weighted_mean()})
        return metrics

    @override
    def configure_optimizers(self) -> Any:
        """``[φ, λ, σ]``; φ's groups ``[shared, fast]`` (fast: ``fast_lr_multiplier`` × lr, no weight decay)."""
        fast_ids = {id(p) for p in self.net.fast_parameters()}
        phi = self.phi_parameters()
        slow = [p for p in phi if id(p) not in fast_ids]
        fast = [p for p in phi if id(p) in fast_ids]
        opt_phi = self.build_optimizer(self.phi_optimizer, [{"params": slow}, {"params": fast}], "phi_optimizer")
        fast_weight_groups(opt_phi, self.fast_lr_multiplier)
        opt_lam = self.build_optimizer(self.hyper_optimizer, [self.space.unconstrained], "hyper_optimizer")
        opt_sigma = self.build_optimizer(self.sigma_optimizer, [self.space.scale], "sigma_optimizer")
        sched = self.build_scheduler(self.phi_lr_scheduler, opt_phi, "phi_lr_scheduler")
        return self.optimizers_config([opt_phi, opt_lam, opt_sigma], [sched])

    # -- the per-member schedule -------------------------------------------------------------------------------
    @override
    def _record_hyperparameters(self) -> None:
        """One schedule row per λ-step with every member's values: ``<name>_m<k>`` (constrained) and
        ``sigma_unconstrained_<name>_m<k>``; logged as ``hparam/<name>/m<k>`` and ``sigma_unconstrained/<name>/m<k>``
        (vector entries: their mean)."""
        values, sigmas = self.space.values(), self.space.sigmas()
        row: dict[str, float] = {
            "hyper_step": float(self.hyper_steps_done),
            "phi_step": float(self.phi_steps),
            "epoch": float(self.current_epoch),
        }
        logged: dict[str, float] = {}
        for name in self.space.names:
            v, s = values[name], sigmas[name]
            v = v.mean(dim=-1) if v.dim() > 1 else v  # (K,)
            s = s.mean(dim=-1) if s.dim() > 1 else s
            for k in range(self.ensemble_size):  # logging K scalars, outside the computation
                row[f"{name}_m{k}"] = logged[f"hparam/{name}/m{k}"] = float(v[k])
                row[f"{SIGMA_COLUMN}{name}_m{k}"] = logged[f"{SIGMA_KEY}{name}/m{k}"] = float(s[k])
        self.schedule.append(row)
        if self.should_log_step():
            self.log_dict(logged, on_step=True, on_epoch=False)
