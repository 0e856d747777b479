"""Lightning callbacks: plots of hyperparameter schedules, Pareto fronts and accuracy matrices (rank 0 only)."""

from hyperlit.callbacks.accuracy_matrix import AccuracyMatrixCallback
from hyperlit.callbacks.hparam_schedule import HyperparameterSchedule
from hyperlit.callbacks.pareto_front import ParetoFrontPlot
from hyperlit.callbacks.prediction_writer import PredictionWriter

__all__ = ["AccuracyMatrixCallback", "HyperparameterSchedule", "ParetoFrontPlot", "PredictionWriter"]
