"""Pareto HyperNetworks (Navon et al. 2021): one hypernetwork for the whole Pareto front.

* :mod:`hyperlit.pareto.module` — :class:`~hyperlit.pareto.module.ParetoHyperNetModule` (PHN-LS / PHN-EPO).
* :mod:`hyperlit.pareto.baselines` — :class:`~hyperlit.pareto.baselines.ParetoBaselineModule`, one target network
  per ray (LS / EPO).
* :mod:`hyperlit.pareto.solvers` — linear scalarization and the EPO LP (Lightning-free).
* :mod:`hyperlit.pareto.objectives` — BCE, relaxed and hard FPR/FNR fairness gaps, multi-task CE.
* :mod:`hyperlit.pareto.metrics` — rays, hypervolume, uniformity (functional).
* :mod:`hyperlit.pareto.front_metric` — :class:`~hyperlit.pareto.front_metric.FrontStatistics`, the front of a
  whole split as a ``torchmetrics.Metric`` (summed over DDP ranks).
"""

from hyperlit.pareto.baselines import ParetoBaselineModule
from hyperlit.pareto.front_metric import FrontStatistics
from hyperlit.pareto.metrics import FrontEvaluation, evaluate_front, evaluation_rays, hypervolume, uniformity
from hyperlit.pareto.module import ParetoHyperNetModule, ParetoModuleBase
from hyperlit.pareto.solvers import EPOSolver, LinearScalarizationSolver, epo_lp

__all__ = [
    "EPOSolver",
    "FrontEvaluation",
    "FrontStatistics",
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
