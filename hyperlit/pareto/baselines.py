"""Per-ray baselines in the PHN harness: one target network per preference ray, trained with LS or EPO.

This is the comparison of Navon et al. 2021 (Tables 1–2: "LS" and "EPO" train one model per ray). The R models
are held as one (R, P) parameter and run with ``vmap``, so R = 1 reproduces a single per-ray run and R = 10
trains the ten models side by side in one process (each model only sees its own ray and its own gradient: the
losses of different rows never mix). Evaluation uses the same objectives, statistics, hypervolume and
uniformity code as :class:`~hyperlit.pareto.module.ParetoHyperNetModule`, at the models' own rays.

Optimizers (fixed order): ``[optimizer(weights)]`` over the one (R, P) weight tensor (default ``Adam(lr=1e-4)``,
PHN's baselines; Adam's state is per entry, so the R rows are still R independent Adams), with an optional
``lr_scheduler`` stepped once per epoch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from hyperlit.nn import materialize, target_shapes
from hyperlit.pareto.metrics import evaluation_rays, validate_ray
from hyperlit.pareto.module import ParetoModuleBase, _batch_inputs
from hyperlit.pareto.objectives import ObjectiveSet, resolve_objectives
from hyperlit.pareto.solvers import objective_gradients

__all__ = ["ParetoBaselineModule", "default_baseline_rays"]


def default_baseline_rays(num_objectives: int, num_rays: int = 10) -> Tensor:
    """``num_rays`` evenly spread strictly positive rays: circle rays for m = 2; for m = 3 and 10 rays the
    interior Das–Dennis points with 6 partitions (exactly 10)."""
    if num_objectives == 2:
        return evaluation_rays(2, n=num_rays)
    for p in range(num_objectives, 64):
        rays = evaluation_rays(num_objectives, n_partitions=p)
        if len(rays) >= num_rays:
            if len(rays) != num_rays:
                raise ValueError(
                    f"no interior Das–Dennis grid has exactly {num_rays} rays for m={num_objectives}; pass rays"
                )
            return rays
    raise ValueError(f"cannot build {num_rays} default rays for m={num_objectives}; pass rays")


class ParetoBaselineModule(ParetoModuleBase):
    """R independent target networks, network k trained at fixed ray r_k with LS or EPO.

    Args:
        objectives: As for :class:`~hyperlit.pareto.module.ParetoHyperNetModule`.
        solver: ``ls`` or ``epo`` (EPO uses each model's gradients w.r.t. its own weights, as the EPO paper).
        rays: The R preference rays (``None``: ``num_rays`` default rays, see :func:`default_baseline_rays`).
        num_rays: Number of default rays when ``rays`` is not given.
        epo_eps: EPO balance/dominance threshold.
        target: Target module (``None``: an MLP ``in_dim → target_hidden → out_dim``).
        in_dim: Input features of the default MLP (``None``: the DataModule's ``input_dim``).
        target_hidden: Hidden sizes of the default MLP.
        out_dim: Outputs of the default MLP.
        optimizer: Optimizer of the (R, P) weights of the R models (PHN's baselines: ``Adam(lr=1e-4)``, the
            default); an optimizer whose state is per entry (Adam, SGD, …) keeps the models independent.
        lr_scheduler: Optional learning-rate schedule of ``optimizer``, stepped once per epoch.
        gradient_clip_val: Gradient-norm clipping (``None``: off).
        ref_point: Hypervolume reference point (default all ones).
        eval_metric: ``hard`` or ``relaxed`` evaluation losses.
        nan_policy: On NaN/inf input features or training losses: ``raise`` (``FloatingPointError`` at that step)
            or ``skip`` the step on every rank (counted in ``skipped_steps``).
        seed: Seed of the R models' initialisations (model k uses ``seed + k``).
    """

    def __init__(
        self,
        objectives: tuple[str, ...] | ObjectiveSet = ("bce", "fpr_gap", "fnr_gap"),
        solver: Literal["ls", "epo"] = "ls",
        rays: list[list[float]] | None = None,
        num_rays: int = 10,
        epo_eps: float = 1e-4,
        target: nn.Module | None = None,
        in_dim: int | None = None,
        target_hidden: tuple[int, ...] = (60, 25),
        out_dim: int = 1,
        optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-4, weight_decay=0.0),
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        ref_point: tuple[float, ...] | None = None,
        eval_metric: Literal["hard", "relaxed"] = "hard",
        nan_policy: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.save_hyperparameters(ignore=["target"] if isinstance(target, nn.Module) else [])
        objective_set = resolve_objectives(objectives)
        m = objective_set.num_objectives
        ray_t = (
            torch.stack([validate_ray(r, m) for r in rays]) if rays is not None else default_baseline_rays(m, num_rays)
        )
        if (ray_t <= 0).any() and solver == "epo":
            raise ValueError("EPO baselines need strictly positive rays (r_j ℓ_j is compared across objectives)")
        self.register_buffer("_rays", ray_t, persistent=False)
        self.weights: nn.Parameter | None = None
        self._init_common(
            objective_set,
            solver,
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

    @property
    def num_models(self) -> int:
        return len(self._rays)

    @property
    @override
    def front_rays(self) -> Tensor:
        return self._rays

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {**super().checkpoint_identity(), "rays": self._rays.tolist()}

    @override
    def _build_weights(self, target: nn.Module) -> None:
        self.shapes = target_shapes(target)
        self.names = list(self.shapes)
        self.numels = [math.prod(s) for s in self.shapes.values()]
        rows = []
        for k in range(self.num_models):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.hparams["seed"]) + k)
                model = copy.deepcopy(target)
                for mod in model.modules():
                    if mod is not model and hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
                params = dict(model.named_parameters())
                rows.append(torch.cat([params[n].detach().reshape(-1) for n in self.names]))
        self.weights = nn.Parameter(torch.stack(rows))

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, self.numels, dim=-1)
        return {n: p.reshape(flat.shape[0], *s) for n, p, s in zip(self.names, parts, self.shapes.values())}

    @override
    def eval_weights(self) -> dict[str, Tensor]:
        self._require_built()
        assert self.weights is not None
        return self._unflatten(self.weights)

    def network(self, index: int) -> nn.Module:
        """Model ``index`` (trained at ``front_rays[index]``) as a plain ``nn.Module``."""
        self._require_built()
        assert self.weights is not None and self.target is not None
        if not 0 <= index < self.num_models:
            raise IndexError(f"model index {index} outside [0, {self.num_models})")
        weights = {n: w[index] for n, w in self.eval_weights().items()}
        return materialize(self.target, weights).requires_grad_(True).eval()

    @override
    def _trainable_parameters(self) -> Iterable[nn.Parameter]:
        assert self.weights is not None
        return [self.weights]

    def _epo_gradients(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        assert self.weights is not None
        grads = objective_gradients(losses, [self.weights], separable=True)
        return self.all_reduce_for_epo(losses, grads)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """Model k descends its own LS or EPO loss at r_k (the losses are summed, so the gradients never mix)."""
        self._require_built()
        x = _batch_inputs(batch)
        outputs = self._outputs(self.eval_weights(), x)
        losses = self.objective_set.losses(outputs, batch)  # (R, m)
        if not self._check_step(batch, batch_idx, losses, self._rays):
            return None
        out = self.solver(losses, self._rays, self._epo_gradients)
        out.loss = out.loss * self.num_models  # a sum over models: each model gets exactly its own gradient
        self._apply_step(out, losses, x.shape[0])
        return out.loss.detach()

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"rays": (R, m), "predictions": (R, B, …)}``: the predictions of all R models at their rays."""
        with torch.no_grad():
            preds = self.objective_set.predict(self._outputs(self.eval_weights(), _batch_inputs(batch)))
        return {"rays": self.front_rays.detach().cpu().clone(), "predictions": preds}
