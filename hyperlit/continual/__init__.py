"""Continual learning with task-conditioned hypernetworks (von Oswald et al., ICLR 2020) and baselines.

* :class:`~hyperlit.continual.module.HyperContinualModule` — hypernetwork + output regularizer (full or chunked
  hypernetwork).
* :class:`~hyperlit.continual.baselines.EWCContinualModule` — (online) EWC on a plain network (a multi-head MLP or
  your own ``nn.Module``), in the same harness.
* :class:`~hyperlit.continual.scores.TaskScores` — the per-task evaluation scores as a ``torchmetrics.Metric``
  (summed over DDP ranks).
* :mod:`hyperlit.continual.regularizer`, :mod:`hyperlit.continual.metrics`, :mod:`hyperlit.continual.ewc` —
  the Lightning-free math.
"""

from hyperlit.continual.base import ContinualModule
from hyperlit.continual.baselines import EWCContinualModule, hypernetwork_fine_tuning
from hyperlit.continual.module import HyperContinualModule
from hyperlit.continual.scores import TaskScores

__all__ = ["ContinualModule", "EWCContinualModule", "HyperContinualModule", "TaskScores", "hypernetwork_fine_tuning"]
