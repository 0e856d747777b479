"""Hyperparameter optimization with best-response approximations (the alternating bilevel loop and its methods)."""

from hyperlit.tuning.best_response import BestResponseModule
from hyperlit.tuning.bilevel import BilevelModule
from hyperlit.tuning.delta_stn import DeltaSelfTuningModule
from hyperlit.tuning.delta_stn_lm import DeltaStnLanguageModelModule
from hyperlit.tuning.fixed_hparams import FixedHyperparameterModule
from hyperlit.tuning.hypergrad import (
    ConjugateGradientSolver,
    ExactSolver,
    Hypergradient,
    HypergradientError,
    IdentitySolver,
    NeumannSolver,
    implicit_hypergradient,
    largest_hessian_eigenvalue,
    unrolled_hypergradient,
)
from hyperlit.tuning.implicit import HypergradientModule, ImplicitDifferentiationModule, UnrolledDifferentiationModule
from hyperlit.tuning.schedule_replay import LSTMLanguageModelModule
from hyperlit.tuning.stn import SelfTuningModule
from hyperlit.tuning.stn_lm import StnLanguageModelModule
from hyperlit.tuning.training_hparams import TrainingHyperparameters

__all__ = [
    "BestResponseModule",
    "BilevelModule",
    "ConjugateGradientSolver",
    "DeltaSelfTuningModule",
    "DeltaStnLanguageModelModule",
    "ExactSolver",
    "FixedHyperparameterModule",
    "Hypergradient",
    "HypergradientError",
    "HypergradientModule",
    "IdentitySolver",
    "ImplicitDifferentiationModule",
    "LSTMLanguageModelModule",
    "NeumannSolver",
    "SelfTuningModule",
    "StnLanguageModelModule",
    "TrainingHyperparameters",
    "UnrolledDifferentiationModule",
    "implicit_hypergradient",
    "largest_hessian_eigenvalue",
    "unrolled_hypergradient",
]
