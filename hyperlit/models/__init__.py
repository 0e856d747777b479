"""Target architectures of the papers (plain and STN variants)."""

from hyperlit.models.lenet import PHNLeNet
from hyperlit.models.mlp import MLP
from hyperlit.models.stn_cnn import AlexNetCNN, StnAlexNet, StnMLP, StnSmallCNN
from hyperlit.models.stn_lstm_lm import StnLSTMLanguageModel
from hyperlit.models.zenkenet import ZenkeNet

__all__ = ["MLP", "AlexNetCNN", "PHNLeNet", "StnAlexNet", "StnLSTMLanguageModel", "StnMLP", "StnSmallCNN", "ZenkeNet"]
