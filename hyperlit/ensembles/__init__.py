"""Ensembles from hypernetworks: BatchEnsemble, hyper-batch ensembles, deep and hyper-deep ensembles.

* :mod:`hyperlit.ensembles.base` — :class:`~hyperlit.ensembles.base.EnsembleModule`: K members evaluated at once,
  their probabilities averaged, ensemble metrics per stage.
* :mod:`hyperlit.ensembles.batch_ensemble` — :class:`~hyperlit.ensembles.batch_ensemble.BatchEnsembleModule`
  (Wen, Tran & Ba, ICLR 2020): rank-1 members sharing one network's weights.
* :mod:`hyperlit.ensembles.hyper_batch` — :class:`~hyperlit.ensembles.hyper_batch.HyperBatchEnsembleModule`
  (Wenzel, Snoek, Tran & Jenatton, NeurIPS 2020): BatchEnsemble members on STN layers, each member tuning its own
  hyperparameters.
* :mod:`hyperlit.ensembles.deep` — :class:`~hyperlit.ensembles.deep.DeepEnsembleModule`, K independent networks
  vectorised with ``torch.func``, and the hyper-deep ensemble (random search, then greedy selection).
* :mod:`hyperlit.ensembles.space` — :class:`~hyperlit.ensembles.space.MemberHyperparameterSpace`, λ_k and σ_k per member.
* :mod:`hyperlit.ensembles.metrics` — ensemble NLL, Gibbs NLL, accuracy, ECE, Brier score, disagreement
  (functional and ``torchmetrics`` metrics).
* :mod:`hyperlit.ensembles.selection` — greedy ensemble selection with replacement (Caruana et al. 2004), the
  random-search sampler.
"""

from hyperlit.ensembles.base import EnsembleModule
from hyperlit.ensembles.batch_ensemble import BatchEnsembleModule
from hyperlit.ensembles.deep import DeepEnsembleModule, hyper_deep_ensemble, random_search_hparams
from hyperlit.ensembles.hyper_batch import HyperBatchEnsembleModule
from hyperlit.ensembles.metrics import (
    EnsembleAccuracy,
    EnsembleBrierScore,
    EnsembleCalibrationError,
    EnsembleNLL,
    GibbsNLL,
    MemberDisagreement,
    MemberNLL,
    brier_score,
    ensemble_log_probs,
    ensemble_metrics,
    ensemble_nll,
    gibbs_nll,
    member_disagreement,
    member_nll,
)
from hyperlit.ensembles.selection import greedy_selection, sample_log_uniform
from hyperlit.ensembles.space import MemberHyperparameterSpace

__all__ = [
    "BatchEnsembleModule",
    "DeepEnsembleModule",
    "EnsembleAccuracy",
    "EnsembleBrierScore",
    "EnsembleCalibrationError",
    "EnsembleModule",
    "EnsembleNLL",
    "GibbsNLL",
    "HyperBatchEnsembleModule",
    "MemberDisagreement",
    "MemberHyperparameterSpace",
    "MemberNLL",
    "brier_score",
    "ensemble_log_probs",
    "ensemble_metrics",
    "ensemble_nll",
    "gibbs_nll",
    "greedy_selection",
    "hyper_deep_ensemble",
    "member_disagreement",
    "member_nll",
    "random_search_hparams",
    "sample_log_uniform",
]
