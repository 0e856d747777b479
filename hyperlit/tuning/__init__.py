"""Hyperparameter optimization with best-response approximations (the alternating bilevel loop and its methods)."""

from hyperlit.tuning.best_response import BestResponseModule
from hyperlit.tuning.bilevel import BilevelModule
from hyperlit.tuning.fixed_hparams import FixedHyperparameterModule
from hyperlit.tuning.schedule_replay import LSTMLanguageModelModule
from hyperlit.tuning.stn import SelfTuningModule
from hyperlit.tuning.stn_lm import StnLanguageModelModule

__all__ = [
    "BestResponseModule",
    "BilevelModule",
    "FixedHyperparameterModule",
    "LSTMLanguageModelModule",
    "SelfTuningModule",
    "StnLanguageModelModule",
]
