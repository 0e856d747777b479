"""Pareto HyperNetworks (Navon et al. 2021): one hypernetwork for the whole Pareto front.

* :mod:`hyperlit.pareto.module` — :class:`ParetoHyperNetModule` (PHN-LS / PHN-EPO).
* :mod:`hyperlit.pareto.baselines` — :class:`ParetoBaselineModule`, one target network per ray (LS / EPO).
* :mod:`hyperlit.pareto.solvers` — linear scalarization and the EPO LP (Lightning-free).
* :mod:`hyperlit.pareto.objectives` — BCE, relaxed and hard FPR/FNR fairness gaps, multi-task CE.
* :mod:`hyperlit.pareto.metrics` — rays, hypervolume, uniformity.
"""

from hyperlit.pareto.baselines import ParetoBaselineModule
from hyperlit.pareto.metrics import FrontEvaluation, evaluate_front, evaluation_rays, hypervolume, uniformity
from hyperlit.pareto.module import ParetoHyperNetModule
from hyperlit.pareto.solvers import EPOSolver, LinearScalarizationSolver, epo_lp

__all__ = [
    "EPOSolver",
    "FrontEvaluation",
    "LinearScalarizationSolver",
    "ParetoBaselineModule",
    "ParetoHyperNetModule",
    "epo_lp",
    "evaluate_front",
    "evaluation_rays",
    "hypervolume",
    "uniformity",
]
