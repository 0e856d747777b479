"""Pareto HyperNetworks (Navon et al., "Learning the Pareto Front with Hypernetworks", ICLR 2021).

A hypernetwork ``h(r; φ)`` maps a preference ray r on the simplex to all weights of a target network, which
runs functionally with them (``torch.func``). Each training step draws K rays (``r ~ Dir(α)``, or PHN-HVI's
stratified angles for m = 2) and descends the linear scalarization (PHN-LS), the EPO-weighted loss (PHN-EPO) or
the HV-gradient-weighted loss with a cosine penalty (PHN-HVI, Hoang et al. 2023) of the m objectives, see
:mod:`hyperlit.pareto.solvers`. Validation evaluates the whole front at fixed test rays with
:class:`~hyperlit.pareto.front_metric.FrontStatistics` (summed over DDP ranks) and logs ``val/hv`` (hypervolume,
minimization, reference point ``ref_point``), ``val/uniformity`` and ``val/<name>_mean`` (named by
``objective_set.eval_names``: ``bce``, ``fpr_gap``, …; ``err_0`` for a hard multi-task error rate); configure
``ModelCheckpoint(monitor="val/hv", mode="max")`` to keep the best-validation-HV model (the examples do).

Objectives: built-in names or any :class:`~hyperlit.pareto.objectives.ObjectiveSet` (its docstring gives the batch
contract). Every training step checks its batch (``check_batch``: e.g. fairness labels and groups in {0, 1}) and
that inputs and losses are finite, all ranks agreeing: a bad batch raises at the step, with ``nan_policy="skip"``
non-finite steps are skipped (counted in ``skipped_steps``).

Optimizers (fixed order): ``[optimizer(hypernetwork φ)]`` (default ``Adam(lr=1e-4)``), with an optional
``lr_scheduler`` stepped once per epoch. Own counters (persistent buffers): ``ray_step`` (rays are drawn from a
generator seeded by ``(seed, ray_step)``, identical on all DDP ranks), ``epo_fallbacks``, ``epo_solves``;
``skipped_steps`` is checkpointed with the module's state.

Prediction: ``predict_step`` returns ``{"ray": (m,), "predictions": (B, …)}`` (``predict_ray``) or ``{"rays": (R, m),
"predictions": (R, B, …)}`` (``predict_rays``); :meth:`ParetoModuleBase.gather_predictions` joins the batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.models.mlp import MLP
from hyperlit.nn import HyperNetwork, batched_call, materialize
from hyperlit.optim import check_factories
from hyperlit.pareto.front_metric import FrontStatistics
from hyperlit.pareto.metrics import (
    FrontEvaluation,
    evaluation_rays,
    ray_scales,
    sample_rays,
    stratified_rays,
    validate_ray,
)
from hyperlit.pareto.objectives import ObjectiveSet, resolve_objectives
from hyperlit.pareto.solvers import HVISolver, SolverOutput, make_solver, objective_gradients

__all__ = ["ParetoHyperNetModule", "ParetoModuleBase", "RayConditionedModule"]


def _batch_inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class ParetoModuleBase(HyperlitModule):
    """What PHN and the per-ray baselines share: objectives, the target network, front evaluation, logging.

    Subclasses implement ``_build_weights`` (create trainable parameters once the target exists),
    ``_trainable_parameters`` (what the optimizer updates), ``front_rays``/``eval_weights`` (the (R, …) weight sets
    evaluated at the fixed rays) and ``training_step``.
    """

    # counters that `--init_from` (fine-tuning) must not copy: a new run starts them afresh
    init_from_skip = ("ray_step", "epo_solves", "epo_fallbacks")
    #: ``ReduceLROnPlateau`` follows the validation hypervolume (give it ``mode="max"``)
    scheduler_monitor = "val/hv"

    def _init_common(
        self,
        objectives: Sequence[str] | ObjectiveSet,
        solver: str,
        epo_eps: float,
        target: nn.Module | None,
        in_dim: int | None,
        target_hidden: Sequence[int],
        out_dim: int,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        gradient_clip_val: float | None,
        ref_point: Sequence[float] | None,
        eval_metric: str,
        nan_policy: str = "raise",
    ) -> None:
        self.objective_set: ObjectiveSet = resolve_objectives(objectives)
        self.num_objectives = self.objective_set.num_objectives
        if isinstance(objectives, ObjectiveSet) and "objectives" not in self.hparams:
            # an instance is no weights-only hyperparameter: record what to give again to load_from_checkpoint
            cls = type(objectives)
            self.hparams["objectives"] = {
                "objective_set": f"{cls.__module__}.{cls.__qualname__}",
                "names": list(self.objective_set.names),
            }
        self.solver = make_solver(solver, epo_eps)
        check_factories(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {gradient_clip_val}")
        self.gradient_clip_val = gradient_clip_val
        if eval_metric not in ("hard", "relaxed"):
            raise ValueError(f"eval_metric must be 'hard' or 'relaxed', got {eval_metric!r}")
        self.eval_metric = eval_metric
        self.check_nan_policy(nan_policy)
        self.nan_policy = nan_policy
        self.ref_point = tuple(float(v) for v in ref_point) if ref_point is not None else (1.0,) * self.num_objectives
        if len(self.ref_point) != self.num_objectives:
            raise ValueError(
                f"ref_point {list(self.ref_point)} needs {self.num_objectives} entries (one per objective)"
            )
        self.target_hidden = tuple(target_hidden)
        self.out_dim = out_dim
        self.in_dim = in_dim
        self.target: nn.Module | None = None
        #: the front of the latest validation/test epoch (drawn by :class:`~hyperlit.callbacks.pareto_front.ParetoFrontPlot`)
        self.last_front: FrontEvaluation | None = None
        self.register_buffer("epo_fallbacks", torch.zeros((), dtype=torch.long))
        self.register_buffer("epo_solves", torch.zeros((), dtype=torch.long))
        #: training steps skipped under ``nan_policy="skip"`` (saved in checkpoints; equal on every rank)
        self.skipped_steps = 0
        if target is not None or in_dim is not None:
            self._build(target)

    # -- construction -------------------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.target is not None

    def _default_target(self) -> nn.Module:
        if self.in_dim is None:
            raise ValueError(
                "the target MLP needs in_dim: set model.in_dim, pass a target module, or use a DataModule with an "
                "`input_dim` attribute"
            )
        return MLP(self.in_dim, self.target_hidden, self.out_dim)

    def _build(self, target: nn.Module | None = None) -> None:
        target = target if target is not None else self._default_target()
        tracked = [
            name or type(m).__name__
            for name, m in target.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        ]
        if tracked:
            raise ValueError(
                f"the target's normalisation layers {tracked} track running statistics, which the weight sets of "
                "several rays (run through torch.func.vmap) cannot update: build them with "
                "track_running_stats=False (batch statistics) or use nn.LayerNorm"
            )
        self._build_weights(target)
        target.requires_grad_(False)  # run functionally; its own parameters are only a template
        self.target = target

    def _build_weights(self, target: nn.Module) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _trainable_parameters(self) -> Iterable[nn.Parameter]:  # pragma: no cover - interface
        raise NotImplementedError

    @override
    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        in_dim = getattr(dm, "input_dim", None)
        if self.built:
            if in_dim is not None and self.in_dim is not None and int(in_dim) != self.in_dim:
                raise ValueError(f"model.in_dim={self.in_dim} but the DataModule's input_dim is {in_dim}")
            return
        if in_dim is None:
            raise ValueError(
                "cannot infer the target's in_dim: set model.in_dim or use a DataModule with an `input_dim` attribute"
            )
        self.in_dim = int(in_dim)
        self.hparams["in_dim"] = self.in_dim  # so checkpoints rebuild the same architecture
        self._build()

    # -- checkpoints ----------------------------------------------------------------------------------------
    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {"objectives": list(self.objective_set.names)}

    @override
    def checkpoint_state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    @override
    def prepare_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Build the parameters the state dict fills when ``in_dim`` was inferred in the run that saved it."""
        if self.built:
            return
        in_dim = checkpoint.get("hyper_parameters", {}).get("in_dim")
        if in_dim is not None:
            self.in_dim = int(in_dim)
            self.hparams["in_dim"] = self.in_dim
            self._build()

    # -- shared pieces -----------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if not self.built:
            raise RuntimeError("the module is not built yet: give in_dim/target or run it under a Trainer first")

    def _outputs(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        assert self.target is not None
        return batched_call(self.target, weights, x)

    @override
    def configure_optimizers(self) -> Any:
        """``[optimizer(trainable parameters)]`` and the optional ``lr_scheduler`` of it."""
        self._require_built()
        opt = self.build_optimizer(self.optimizer_factory, self._trainable_parameters(), "optimizer")
        sched = self.build_scheduler(self.lr_scheduler_factory, opt, "lr_scheduler")
        return self.optimizers_config([opt], [sched])

    def _check_losses_shape(self, losses: Tensor, num_sets: int) -> None:
        m = self.num_objectives
        if tuple(losses.shape) != (num_sets, m):
            raise ValueError(
                f"{type(self.objective_set).__name__}.losses returned shape {tuple(losses.shape)}; it must be "
                f"(K, m) = ({num_sets}, {m}): one loss per weight set and objective {list(self.objective_set.names)}"
            )

    def _check_step(self, batch: Any, batch_idx: int, losses: Tensor, rays: Tensor) -> bool:
        """Whether every rank may take this training step (one all-reduce of one flag per step).

        Batches the objectives refuse (:meth:`~hyperlit.pareto.objectives.ObjectiveSet.check_batch`, e.g.
        labels outside {0, 1}) raise ``ValueError``; NaN/inf input features or training losses raise
        ``FloatingPointError`` (``nan_policy="raise"``) or skip the step on every rank (``"skip"``, counted in
        ``skipped_steps``).
        """
        self._check_losses_shape(losses, len(rays))
        batch_error: ValueError | None = None
        try:
            self.objective_set.check_batch(batch)
        except ValueError as err:
            batch_error = err
        x = _batch_inputs(batch)
        finite_x = torch.isfinite(x).all() if isinstance(x, Tensor) and x.is_floating_point() else torch.tensor(True)
        finite_losses = torch.isfinite(losses.detach()).all()
        ok = finite_x.to(finite_losses.device) & finite_losses
        if self.all_ranks(ok & (batch_error is None)):
            return True
        # every rank is here: agree on the kind of failure before raising or skipping together
        if not self.all_ranks(batch_error is None):
            if batch_error is not None:
                raise batch_error
            raise ValueError("another rank's training batch was refused by the objectives (see that rank's error)")
        where = f"training step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if not bool(finite_x):
            assert isinstance(x, Tensor)
            bad = int((~torch.isfinite(x)).sum())
            msg = (
                f"non-finite input features at {where}: {bad} NaN/inf of {x.numel()} values in batch[0] of shape "
                f"{tuple(x.shape)} — clean or impute the data (drop the rows, or torch.nan_to_num in the DataModule)"
            )
        elif not bool(finite_losses):
            values = {n: losses[:, j].detach().cpu().tolist() for j, n in enumerate(self.objective_set.names)}
            msg = (
                f"non-finite training losses {values} at {where}, rays {rays.cpu().tolist()} — the network diverged: "
                "lower the learning rate or set gradient_clip_val"
            )
        else:
            msg = f"another rank had non-finite input features or training losses at {where} (see its error)"
        self.skip_or_raise(msg)
        return False

    def _apply_step(self, out: SolverOutput, losses: Tensor, batch_size: int) -> None:
        """Backward, clip, step; count EPO fallbacks and log the step's losses."""
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(out.loss)
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        if self.solver.name == "epo":
            self.epo_solves += len(out.modes)
            if out.fallbacks:
                before = int(self.epo_fallbacks)
                self.epo_fallbacks += out.fallbacks
                after = int(self.epo_fallbacks)
                # warn at the 1st, 10th, 100th, … fallback; the running count is logged as train/epo_fallbacks
                if math.floor(math.log10(after)) > (math.floor(math.log10(before)) if before else -1):
                    rank_zero_warn(f"EPO LP fell back to r/Σr ({after} times so far); last reason: {out.reasons[-1]}")
        if not self.should_log_step():
            return
        # this rank's losses of the step (the split-level values are the val/test front metrics)
        logs = {f"train/{n}": losses[:, j].mean().detach() for j, n in enumerate(self.objective_set.names)}
        if self.solver.name == "epo":
            logs["train/epo_fallbacks"] = self.epo_fallbacks.float()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        # the progress bar shows the scalarized loss of the step (this rank's, like the values above)
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=False, batch_size=batch_size, prog_bar=True)

    def all_reduce_for_epo(self, losses: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """DDP hook for EPO: the mean over ranks of the (K, m) losses and (K, m, P) per-objective gradients.

        ``torch.autograd.grad`` bypasses DDP's gradient hooks, so without this every rank would solve its own LP
        from local gradients; with it every rank solves the same LP (identical β, then one synced backward).
        :meth:`~hyperlit.base.HyperlitModule.reduce_mean` reduces copies: the rank's own losses, which it logs and
        backpropagates, stay local.
        """
        return self.reduce_mean(losses), self.reduce_mean(grads)

    def all_reduce_for_hvi(self, losses: Tensor) -> Tensor:
        """DDP hook for PHN-HVI: the mean over ranks of the (K, m) losses (a detached copy), from which every rank
        computes the same HV weights (and the same cosine penalty, see :meth:`ParetoHyperNetModule.training_step`)."""
        return self.reduce_mean(losses.detach())

    # -- evaluation ----------------------------------------------------------------------------------------
    @property
    def front_rays(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_weights(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def front_metric(self, rays: Tensor | None = None, **kwargs: Any) -> FrontStatistics:
        """A fresh :class:`~hyperlit.pareto.front_metric.FrontStatistics` of this module's objectives at ``rays`` (default: ``front_rays``)."""
        rays = self.front_rays if rays is None else rays
        return FrontStatistics(self.objective_set, rays, self.ref_point, hard=self.eval_metric == "hard", **kwargs)

    @override
    def configure_metrics(self) -> MetricCollection:
        """``front``: the front at ``front_rays`` over the split (``val/…``, ``test/…``)."""
        return MetricCollection({"front": self.front_metric()})

    def _stage_front(self, stage: str) -> FrontStatistics:
        metric = self.stage_metrics(stage)["front"]
        assert isinstance(metric, FrontStatistics)
        return metric

    def _check_eval_batch(self, batch: Any, stage: str) -> None:
        """Refused batches raise ``ValueError``, NaN/inf input features ``FloatingPointError`` (whatever
        ``nan_policy``: skipping evaluation batches would change the split)."""
        self.objective_set.check_batch(batch)
        x = _batch_inputs(batch)
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"non-finite input features in a {stage} batch: {int((~torch.isfinite(x)).sum())} NaN/inf of "
                f"{x.numel()} values in batch[0] of shape {tuple(x.shape)} — clean or impute the data (drop the rows, "
                "or torch.nan_to_num in the DataModule)"
            )

    def _eval_step(
        self, batch: Any, metric: FrontStatistics, weights: dict[str, Tensor] | None = None, stage: str = "evaluation"
    ) -> None:
        self._require_built()
        self._check_eval_batch(batch, stage)
        outputs = self._outputs(self.eval_weights() if weights is None else weights, _batch_inputs(batch))
        metric.update(outputs, batch)

    def _eval_end(self, stage: str) -> FrontEvaluation | None:
        """Compute the front of the whole split (``compute`` sums the statistics over ranks), log it, reset."""
        metric = self._stage_front(stage)
        if self.all_ranks(metric.update_count == 0):
            return None
        front = metric.compute()
        metric.reset()
        logs = {f"{stage}/{k}": v for k, v in front.scalars().items()}
        # the values are already the whole split's and equal on every rank; a max "sync" of equal values returns
        # them bit for bit (a mean might not) and tells Lightning they are reduced
        hv = logs.pop(f"{stage}/hv")
        self.log_dict(logs, prog_bar=False, sync_dist=True, reduce_fx="max")
        self.log(f"{stage}/hv", hv, prog_bar=True, sync_dist=True, reduce_fx="max")  # shown on the progress bar
        self.last_front = front
        return front

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self._eval_step(batch, self._stage_front("val"), stage="validation")

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self._eval_step(batch, self._stage_front("test"), stage="test")

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    @staticmethod
    def gather_predictions(outputs: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Join the per-batch outputs of ``trainer.predict`` (dicts of :meth:`~RayConditionedModule.predict_step`) along the batch axis.

        ``{"ray": (m,), "predictions": (N, …)}`` or ``{"rays": (R, m), "predictions": (R, N, …)}``.
        """
        if not outputs:
            raise ValueError("no predictions to gather (an empty predict dataloader?)")
        key = "rays" if "rays" in outputs[0] else "ray"
        dim = 1 if key == "rays" else 0
        preds = torch.cat([o["predictions"].cpu() for o in outputs], dim=dim)
        return {key: outputs[0][key].cpu(), "predictions": preds}

    def weights_for_rays(self, rays: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has fixed rays; evaluate it at its own rays")

    @torch.no_grad()
    def evaluate(
        self, dataloader: Iterable[Any], rays: Tensor | Sequence[Sequence[float]] | None = None
    ) -> FrontEvaluation:
        """Front on every batch of ``dataloader`` at ``rays`` (default: the evaluation rays); no Trainer needed.

        The same :class:`~hyperlit.pareto.front_metric.FrontStatistics` as validation, in this process only (``sync_on_compute=False``): under
        DDP use the Trainer's ``validate``/``test``, which sum the statistics over ranks.
        """
        self._require_built()
        ray_t = None if rays is None else torch.stack([validate_ray(r, self.num_objectives) for r in rays])
        metric = self.front_metric(ray_t, sync_on_compute=False).to(self.device)
        was_training = self.training
        self.eval()
        try:
            weights = None if ray_t is None else self.weights_for_rays(ray_t.to(self.device))
            for batch in dataloader:
                self._eval_step([b.to(self.device) if isinstance(b, Tensor) else b for b in batch], metric, weights)
        finally:
            self.train(was_training)
        if metric.update_count == 0:
            raise ValueError("evaluate() got an empty dataloader")
        return metric.compute()


class RayConditionedModule(ParetoModuleBase):
    """What the modules that answer at *any* preference ray share (PHN, COSMOS): the fixed evaluation rays and the
    prediction ray(s) of ``predict_step``.

    Subclasses call ``_init_rays`` in ``__init__`` and implement ``weights_for_rays`` (what ``_outputs`` runs
    for (R, m) rays).
    """

    def _init_rays(
        self,
        eval_rays: list[list[float]] | None,
        num_test_rays: int,
        test_ray_partitions: int,
        predict_ray: list[float] | None,
        predict_rays: list[list[float]] | None,
    ) -> None:
        m = self.num_objectives
        if eval_rays is not None:
            rays = torch.stack([validate_ray(r, m) for r in eval_rays])
        else:
            rays = evaluation_rays(m, num_test_rays, test_ray_partitions)
        self.register_buffer("_front_rays", rays, persistent=False)
        if predict_ray is not None and predict_rays is not None:
            raise ValueError("give predict_ray (one ray) or predict_rays (several), not both")
        self._predict_ray: Tensor | None = None
        self._predict_rays: Tensor | None = None
        self.predict_ray = predict_ray
        self.predict_rays = predict_rays

    @property
    def predict_ray(self) -> list[float] | None:
        return None if self._predict_ray is None else self._predict_ray.tolist()

    @predict_ray.setter
    def predict_ray(self, ray: Sequence[float] | Tensor | None) -> None:
        self._predict_ray = None if ray is None else validate_ray(ray, self.num_objectives)

    @property
    def predict_rays(self) -> list[list[float]] | None:
        return None if self._predict_rays is None else self._predict_rays.tolist()

    @predict_rays.setter
    def predict_rays(self, rays: Sequence[Sequence[float]] | Tensor | None) -> None:
        if rays is not None and len(rays) == 0:
            raise ValueError("predict_rays is empty: give at least one ray, or None")
        self._predict_rays = None if rays is None else torch.stack([validate_ray(r, self.num_objectives) for r in rays])

    @property
    @override
    def front_rays(self) -> Tensor:
        return self._front_rays

    # -- prediction --------------------------------------------------------------------------------------------
    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Predictions (``objective_set.predict``, e.g. probabilities) of the networks of the prediction ray(s).

        Returns ``{"ray": (m,), "predictions": (B, …)}`` for ``predict_ray``, or ``{"rays": (R, m),
        "predictions": (R, B, …)}`` for ``predict_rays``; :meth:`~ParetoModuleBase.gather_predictions` joins the batches of
        ``trainer.predict``.
        """
        if self._predict_ray is not None and self._predict_rays is not None:
            raise ValueError("both predict_ray and predict_rays are set: set one of them to None")
        rays = self._predict_rays if self._predict_rays is not None else self._predict_ray
        if rays is None:
            raise ValueError(
                "predict needs a preference ray: pass --model.predict_ray '[r1, ..., rm]' (or several with "
                f"--model.predict_rays '[[...], [...]]'; {self.num_objectives} non-negative entries summing to 1) or "
                "set module.predict_ray"
            )
        with torch.no_grad():
            rays_2d = rays if rays.dim() == 2 else rays[None]
            preds = self.objective_set.predict(self._outputs(self.weights_for_rays(rays_2d), _batch_inputs(batch)))
        if rays.dim() == 2:
            return {"rays": rays.clone(), "predictions": preds}
        return {"ray": rays.clone(), "predictions": preds[0]}


class ParetoHyperNetModule(RayConditionedModule):
    """PHN-LS / PHN-EPO / PHN-HVI over any target ``nn.Module`` (default: an MLP ``in_dim → target_hidden → out_dim``).

    Args:
        objectives: Objective names — fairness ``bce``, ``fpr_gap``, ``fnr_gap`` (batches ``(x, y, group)``) or
            multi-task ``ce_0``, ``ce_1``, … (batches ``(x, targets)``, outputs (B, T, C)) — or an
            :class:`~hyperlit.pareto.objectives.ObjectiveSet` instance of your own (CLI: ``--model.objectives
            '{class_path: my_pkg.MyObjectives, init_args: {...}}'``). An instance given in Python is not saved in
            checkpoints' hyperparameters: give it again to ``load_from_checkpoint(path, objectives=...)``.
        solver: ``ls`` (linear scalarization), ``epo`` (exact Pareto optimal LP) or ``hvi`` (PHN-HVI: HV-gradient
            weights of the K rays' losses minus ``hvi_penalty``·cosine(ℓ, r); give it ``rays_per_step`` > 1, HVI
            uses 16). Conventions differ: EPO aims at ``r⊙ℓ`` equal (``ℓ ∝ r⁻¹``), HVI's cosine at ``ℓ ∝ r``.
        epo_gradients: Gradients the EPO LP sees: w.r.t. the hypernetwork parameters φ (``hypernet``, as in
            the paper) or w.r.t. the generated target weights θ(r) (``target``; a cheaper variant — m instead of
            K·m backward passes through a much smaller vector, but ignores how φ couples the rays). ``hypernet``
            stays the default: at the same training CPU time the ``target`` variant takes more steps, but its
            test hypervolume on Adult, Default and Bank (3 seeds) was within seed noise of ``hypernet``'s (higher
            on Default, lower on Adult and Bank); PHN-LS reached the highest hypervolume per CPU second of the three
            (``docs/benchmarks.md`` §2, ``examples/benchmarks/pareto_epo_variants.py``).
        epo_eps: Non-uniformity threshold between EPO's balance and dominance LPs.
        alpha: Dirichlet concentration of the training rays (paper: 0.2).
        rays_per_step: K rays drawn per step (paper: 1); the losses of all K are averaged.
        target: Target module whose parameters are generated (``None``: the MLP below).
        in_dim: Input features of the default MLP (``None``: taken from the DataModule's ``input_dim``).
        target_hidden: Hidden sizes of the default MLP (COSMOS's reconstruction of PHN's fairness MLP: 60, 25).
        out_dim: Outputs of the default MLP (1 logit for the fairness objectives).
        hnet_hidden: Ray-MLP hidden sizes. The official ``m→100→100→100`` MLP with a linear last layer followed
            by linear per-tensor heads is the same function class as ``(100, 100)`` here, whose output layer
            holds all heads (two consecutive linear maps fold into one).
        chunk_size: Generate the weights in chunks of this size (chunked hypernet for large targets).
        chunk_emb_dim: Chunk-embedding size of the chunked hypernet.
        out_init_std: Std of the hypernet output layer's weights (``None``: PyTorch default, as the official code).
        init_bias_from_target: Start the hypernet at the target's own initialisation (output bias = its weights).
        optimizer: Optimizer of the hypernetwork parameters φ (paper: ``Adam(lr=1e-4)``, the default), e.g.
            ``--model.optimizer torch.optim.AdamW --model.optimizer.lr 3e-4``.
        lr_scheduler: Optional learning-rate schedule of ``optimizer``, stepped once per epoch
            (``ReduceLROnPlateau`` follows ``val/hv``; give it ``mode="max"``).
        gradient_clip_val: Clip the hypernet gradient norm to this value (``None``: no clipping).
        num_test_rays: Number of test rays for m = 2.
        test_ray_partitions: Das–Dennis partitions of the test rays for m ≥ 3 (interior points only).
        eval_rays: Explicit evaluation rays (overrides the two settings above).
        ref_point: Hypervolume reference point (default: all ones).
        eval_metric: Evaluate the front on ``hard`` metrics (BCE and hard FPR/FNR gaps; error rates ``err_t`` for
            multi-task) or on the ``relaxed`` training losses.
        nan_policy: On NaN/inf input features or training losses: ``raise`` (``FloatingPointError`` at that step)
            or ``skip`` the step on every rank, with a warning, counted in ``skipped_steps``.
        predict_ray: Preference ray used by ``predict_step`` (``hyperlit predict --model.predict_ray [..]``);
            not stored in checkpoints, so it can be chosen at prediction time.
        predict_rays: Several rays at once (``--model.predict_rays '[[..], [..]]'``): predictions (R, B, …);
            not stored in checkpoints either.
        seed: Seed of the training-ray generator (combined with the step counter).
        hvi_penalty: λ of PHN-HVI's cosine term (``solver="hvi"``). HVI uses 5 on Multi-MNIST and 4 on
            Multi-Fashion(+MNIST), where both objectives are cross-entropies of one scale. On the fairness sets
            (a BCE next to FPR/FNR gaps of another scale) a strong pull towards ``ℓ ∝ r`` fights the objectives'
            scales; use a small λ such as 0.01, COSMOS's cosine penalty on Adult/Compas (HVI did not run the
            fairness sets).
        hvi_weighting: ``intended`` (``Σ_j w_kj ℓ_kj``, the paper's objective) or ``as_coded``
            (``(Σ_j w_kj)(Σ_j ℓ_kj)/m``, what the HVI code computes), see
            :class:`~hyperlit.pareto.solvers.HVISolver`.
        hvi_warmup_epochs: Epochs trained on ``−mean_k cos(ℓ_k, r_k)`` only before the HV weights join (HVI's
            phase 1, 1 epoch there with its own ``Adam(lr=1e-4)``; here the same optimizer). Default 0.
        ray_sampling: ``dirichlet`` (``Dir(alpha)``, PHN) or ``stratified`` (m = 2 only: ray k's angle uniform in
            the k-th of ``rays_per_step`` equal bins of ``[0.1, π/2 − 0.1]``, HVI's ``partition=True``).
        ray_scale: HVI's ray rescaling trick, off by default: the hypernetwork gets ``r·randint(1, 5)·|N(1, 0.2)|``
            (one factor per ray) instead of r during training ("to help the hypernet generalise"); losses,
            weights and the cosine still use r, evaluation feeds the plain rays.
    """

    def __init__(
        self,
        objectives: tuple[str, ...] | ObjectiveSet = ("bce", "fpr_gap", "fnr_gap"),
        solver: Literal["ls", "epo", "hvi"] = "epo",
        epo_gradients: Literal["hypernet", "target"] = "hypernet",
        epo_eps: float = 1e-4,
        alpha: float = 0.2,
        rays_per_step: int = 1,
        target: nn.Module | None = None,
        in_dim: int | None = None,
        target_hidden: tuple[int, ...] = (60, 25),
        out_dim: int = 1,
        hnet_hidden: tuple[int, ...] = (100, 100),
        chunk_size: int | None = None,
        chunk_emb_dim: int = 8,
        out_init_std: float | None = None,
        init_bias_from_target: bool = False,
        optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-4, weight_decay=0.0),
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        num_test_rays: int = 25,
        test_ray_partitions: int = 12,
        eval_rays: list[list[float]] | None = None,
        ref_point: tuple[float, ...] | None = None,
        eval_metric: Literal["hard", "relaxed"] = "hard",
        nan_policy: Literal["raise", "skip"] = "raise",
        predict_ray: list[float] | None = None,
        predict_rays: list[list[float]] | None = None,
        seed: int = 0,
        hvi_penalty: float = 5.0,
        hvi_weighting: Literal["intended", "as_coded"] = "intended",
        hvi_warmup_epochs: int = 0,
        ray_sampling: Literal["dirichlet", "stratified"] = "dirichlet",
        ray_scale: bool = False,
    ) -> None:
        super().__init__(seed=seed)
        ignore = ["predict_ray", "predict_rays"] + (["target"] if isinstance(target, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if rays_per_step < 1:
            raise ValueError(f"rays_per_step must be >= 1, got {rays_per_step}")
        if epo_gradients not in ("hypernet", "target"):
            raise ValueError(f"epo_gradients must be 'hypernet' or 'target', got {epo_gradients!r}")
        if ray_sampling not in ("dirichlet", "stratified"):
            raise ValueError(f"ray_sampling must be 'dirichlet' or 'stratified', got {ray_sampling!r}")
        if hvi_warmup_epochs < 0:
            raise ValueError(f"hvi_warmup_epochs must be >= 0, got {hvi_warmup_epochs}")
        if hvi_warmup_epochs and solver != "hvi":
            raise ValueError(f"hvi_warmup_epochs={hvi_warmup_epochs} needs solver='hvi', got solver={solver!r}")
        self.register_buffer("ray_step", torch.zeros((), dtype=torch.long))
        self.hnet: HyperNetwork | None = None
        self._init_common(
            objectives,
            "ls" if solver == "hvi" else solver,
            epo_eps,
            target,
            in_dim,
            target_hidden,
            out_dim,
            optimizer,
            lr_scheduler,
            gradient_clip_val,
            ref_point,
            eval_metric,
            nan_policy,
        )
        m = self.num_objectives
        if solver == "hvi":
            self.solver = HVISolver(self.ref_point, penalty=hvi_penalty, weighting=hvi_weighting)
        if ray_sampling == "stratified" and m != 2:
            raise ValueError(
                f"ray_sampling='stratified' draws angles on the quarter circle and needs m = 2 objectives, got m={m} "
                f"{list(self.objective_set.names)}: use ray_sampling='dirichlet'"
            )
        self._init_rays(eval_rays, num_test_rays, test_ray_partitions, predict_ray, predict_rays)

    @override
    def _build_weights(self, target: nn.Module) -> None:
        hp = self.hparams
        self.hnet = HyperNetwork(
            target,
            self.num_objectives,
            hidden=tuple(hp["hnet_hidden"]),
            chunk_size=hp["chunk_size"],
            chunk_emb_dim=hp["chunk_emb_dim"],
            out_init_std=hp["out_init_std"],
            init_bias_from_target=hp["init_bias_from_target"],
        )

    # -- rays ----------------------------------------------------------------------------------------------
    def training_rays(self) -> Tensor:
        """The K rays of the current step, from ``(seed, ray_step)``: the same on every rank, no broadcast."""
        hp = self.hparams
        k, step = hp["rays_per_step"], int(self.ray_step)
        if hp.get("ray_sampling", "dirichlet") == "stratified":
            return stratified_rays(k, hp["seed"], step)
        return sample_rays(k, self.num_objectives, hp["alpha"], hp["seed"], step)

    def hypernet_rays(self, rays: Tensor) -> Tensor:
        """What the hypernetwork gets for the training rays: the rays, or with ``ray_scale`` HVI's rescaled rays."""
        if not self.hparams.get("ray_scale", False):
            return rays
        scales = ray_scales(len(rays), self.hparams["seed"], int(self.ray_step)).to(rays)
        return rays * scales[:, None]

    # -- weights for rays ------------------------------------------------------------------------------------
    @override
    def weights_for_rays(self, rays: Tensor) -> dict[str, Tensor]:
        """Generated target weights, name → ``(K, *shape)``, for (K, m) rays."""
        self._require_built()
        assert self.hnet is not None
        return self.hnet(rays.to(self.device, torch.float32))

    @override
    def eval_weights(self) -> dict[str, Tensor]:
        return self.weights_for_rays(self.front_rays)

    @override
    def forward(self, x: Tensor, ray: Sequence[float] | Tensor) -> Tensor:
        """Target outputs for one preference ray."""
        r = validate_ray(ray, self.num_objectives)
        return self._outputs(self.weights_for_rays(r[None]), x)[0]

    def network_for_ray(self, ray: Sequence[float] | Tensor) -> nn.Module:
        """A plain ``nn.Module`` (a copy of the target) holding the weights generated for ``ray``."""
        self._require_built()
        assert self.hnet is not None and self.target is not None
        r = validate_ray(ray, self.num_objectives)
        with torch.no_grad():
            weights = {n: w[0] for n, w in self.weights_for_rays(r[None]).items()}
        net = materialize(self.target, weights).requires_grad_(True)
        return net.eval()

    # -- training ----------------------------------------------------------------------------------------------
    @override
    def _trainable_parameters(self) -> Iterable[nn.Parameter]:
        assert self.hnet is not None
        return self.hnet.parameters()

    def _epo_gradients(self, losses: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        assert self.hnet is not None
        if self.hparams["epo_gradients"] == "target":
            grads = objective_gradients(losses, [flat], separable=True)
        else:
            grads = objective_gradients(losses, [p for p in self.hnet.parameters() if p.requires_grad])
        return self.all_reduce_for_epo(losses, grads)

    def _hvi_step(self, losses: Tensor, rays: Tensor) -> SolverOutput:
        """PHN-HVI on the rank-mean losses: the same HV weights on every rank, and the cosine of the rank-mean
        losses, whose gradient flows through this rank's losses (``ℓ + (ℓ̄ − ℓ).detach()``: DDP's gradient mean then
        gives the single-process gradient of the global batch when the losses are batch means)."""
        assert isinstance(self.solver, HVISolver)
        reduced = self.all_reduce_for_hvi(losses)
        shared = losses + (reduced - losses).detach() if self.distributed else losses
        warmup = self.current_epoch < self.hparams.get("hvi_warmup_epochs", 0)
        return self.solver(shared, rays, weight_losses=reduced, cosine_only=warmup)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """One step on the K rays of :meth:`training_rays` (PHN-LS: Σ r_j ℓ_j; PHN-EPO: the EPO LP's weights;
        PHN-HVI: HV-gradient weights and the cosine penalty). The K target passes run batched."""
        self._require_built()
        assert self.hnet is not None
        rays = self.training_rays().to(self.device)
        flat = self.hnet.flat(self.hypernet_rays(rays))
        x = _batch_inputs(batch)
        outputs = self._outputs(self.hnet.unflatten(flat), x)
        losses = self.objective_set.losses(outputs, batch)  # (K, m)
        if not self._check_step(batch, batch_idx, losses, rays):
            self.ray_step += 1  # a skipped step still moves on to the next rays
            return None
        if self.solver.name == "hvi":
            out = self._hvi_step(losses, rays)
        else:
            out = self.solver(losses, rays, lambda ls: self._epo_gradients(ls, flat))
        self._apply_step(out, losses, x.shape[0])
        self.ray_step += 1
        return out.loss.detach()
