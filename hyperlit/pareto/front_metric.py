"""The quality of a Pareto front on a whole split as a ``torchmetrics.Metric`` (the modular half of
:mod:`hyperlit.pareto.metrics`, whose functions do the math).

:class:`FrontStatistics` sums, for each of R evaluation rays, the additive statistics of an
:class:`~hyperlit.pareto.objectives.ObjectiveSet` over batches (BCE sum and the (group, label) counts, Σp, Σŷ of the
fairness objectives; CE and error sums of the multi-task ones). The sum state has shape (R, S) and
``dist_reduce_fx="sum"``, so ``compute()`` first sums it over DDP ranks and every rank gets the losses of the whole
split, then the hypervolume and uniformity of those losses (:func:`~hyperlit.pareto.metrics.evaluate_front`). The
fairness gaps are ratios of split-level counts, not batch means: summing statistics is what makes them exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from hyperlit.pareto.metrics import FrontEvaluation, evaluate_front
from hyperlit.pareto.objectives import ObjectiveSet

__all__ = ["FrontStatistics"]


class FrontStatistics(Metric):
    """Losses of a front at fixed rays over a whole split, with its hypervolume and uniformity.

    ``update(outputs, batch)`` takes the target outputs (R, B, …) of the R weight sets evaluated at ``rays`` and
    the batch they were computed on; ``compute()`` returns a :class:`~hyperlit.pareto.metrics.FrontEvaluation`
    (losses (R, m), hypervolume at ``ref_point``, uniformity ``1 − mean_k μ_{r_k}(ℓ_k)`` — Mahapatra & Rajan 2020,
    eq. 3 — and the mean of each evaluation value over the rays, named by the objective set's ``eval_names(hard)``,
    e.g. ``err_0`` for a hard multi-task error rate).

    Args:
        objective_set: The m objectives and their additive statistics.
        rays: (R, m) rays at which the evaluated weights were obtained.
        ref_point: Hypervolume reference point (default all ones).
        hard: Evaluate hard metrics (BCE and hard FPR/FNR gaps; error rates) or the relaxed training losses.
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, …).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    stats: Tensor

    def __init__(
        self,
        objective_set: ObjectiveSet,
        rays: Tensor,
        ref_point: Sequence[float] | None = None,
        hard: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        rays = torch.as_tensor(rays, dtype=torch.float32).detach().cpu()
        if rays.dim() != 2 or rays.shape[1] != objective_set.num_objectives:
            raise ValueError(
                f"rays must be (R, {objective_set.num_objectives}) for {list(objective_set.names)}, got shape "
                f"{tuple(rays.shape)}"
            )
        self.objective_set = objective_set
        self.rays = rays
        self.ref_point = tuple(float(v) for v in ref_point) if ref_point is not None else None
        self.hard = bool(hard)
        shape = (len(rays), objective_set.num_statistics)
        self.add_state("stats", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def num_rays(self) -> int:
        return len(self.rays)

    @override
    def update(self, outputs: Tensor, batch: Sequence[Any]) -> None:
        """Add the statistics of one batch: ``outputs`` (R, B, …) of the R weight sets on ``batch``'s inputs."""
        if outputs.shape[0] != self.num_rays:
            raise ValueError(f"outputs have {outputs.shape[0]} weight sets, the front has {self.num_rays} rays")
        stats = self.objective_set.statistics(outputs, batch)
        if tuple(stats.shape) != tuple(self.stats.shape):
            raise ValueError(
                f"{type(self.objective_set).__name__}.statistics returned shape {tuple(stats.shape)}; it must be "
                f"(R, num_statistics) = {tuple(self.stats.shape)}: one row of additive statistics per weight set"
            )
        self.stats += stats.to(self.stats)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the evaluation values (``err_0``, … for hard multi-task errors; see ``eval_names``)."""
        return tuple(self.objective_set.eval_names(self.hard))

    @override
    def compute(self) -> FrontEvaluation:
        """The front on everything seen (on every rank: the states were summed over ranks first).

        Raises ``FloatingPointError`` naming the rays whose evaluation values are NaN/inf.
        """
        losses = self.objective_set.from_statistics(self.stats, hard=self.hard)
        m = self.objective_set.num_objectives
        if tuple(losses.shape) != (self.num_rays, m):
            raise ValueError(
                f"{type(self.objective_set).__name__}.from_statistics returned shape {tuple(losses.shape)}; it must "
                f"be (R, m) = ({self.num_rays}, {m})"
            )
        bad = ~torch.isfinite(losses).all(-1)
        if bad.any():
            k = int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"non-finite evaluation values at {int(bad.sum())} of {self.num_rays} rays (first: ray "
                f"{self.rays[k].tolist()}, {dict(zip(self.names, losses[k].tolist()))}): the network's outputs are "
                "NaN/inf — it diverged; lower the learning rate or set gradient_clip_val"
            )
        return evaluate_front(losses, self.rays, self.ref_point, self.names)
