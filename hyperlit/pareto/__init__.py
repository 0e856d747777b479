"""Pareto HyperNetworks (Navon et al. 2021): one hypernetwork for the whole Pareto front.

* :mod:`hyperlit.pareto.module` — :class:`~hyperlit.pareto.module.ParetoHyperNetModule` (PHN-LS / PHN-EPO / PHN-HVI).
* :mod:`hyperlit.pareto.baselines` — :class:`~hyperlit.pareto.baselines.ParetoBaselineModule`, one target network
  per ray (LS / EPO).
* :mod:`hyperlit.pareto.cosmos` — :class:`~hyperlit.pareto.cosmos.CosmosModule` (COSMOS: the ray as an input of
  one network).
* :mod:`hyperlit.pareto.solvers` — linear scalarization, the EPO LP and PHN-HVI's HV-gradient weights
  (Lightning-free).
* :mod:`hyperlit.pareto.hv_gradient` — hypervolume gradients −∂HV/∂ℓ (face formula; m = 2 closed form).
* :mod:`hyperlit.pareto.objectives` — BCE, relaxed and hard FPR/FNR fairness gaps, multi-task CE.
* :mod:`hyperlit.pareto.metrics` — rays, hypervolume, uniformity (functional).
* :mod:`hyperlit.pareto.front_metric` — :class:`~hyperlit.pareto.front_metric.FrontStatistics`, the front of a
  whole split as a ``torchmetrics.Metric`` (summed over DDP ranks).
"""

from hyperlit.pareto.baselines import ParetoBaselineModule
from hyperlit.pareto.cosmos import CosmosModule
from hyperlit.pareto.front_metric import FrontStatistics
from hyperlit.pareto.metrics import FrontEvaluation, evaluate_front, evaluation_rays, hypervolume, uniformity
from hyperlit.pareto.module import ParetoHyperNetModule, ParetoModuleBase
from hyperlit.pareto.solvers import EPOSolver, HVISolver, LinearScalarizationSolver, epo_lp

__all__ = [
    "CosmosModule",
    "EPOSolver",
    "FrontEvaluation",
    "FrontStatistics",
    "HVISolver",
    "LinearScalarizationSolver",
    "ParetoBaselineModule",
    "ParetoHyperNetModule",
    "ParetoModuleBase",
    "epo_lp",
    "evaluate_front",
    "evaluation_rays",
    "hypervolume",
    "uniformity",
]
