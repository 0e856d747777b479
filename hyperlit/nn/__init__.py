"""Lightning-free building blocks: hypernetworks, functional target calls, STN layers, regularizers."""

from hyperlit.nn.functional import batched_call, call_with_weights, materialize
from hyperlit.nn.hypernet import HyperNetwork, target_shapes
from hyperlit.nn.stn import StnConv2d, StnLinear, StnNet, convert_to_stn

__all__ = [
    "HyperNetwork",
    "StnConv2d",
    "StnLinear",
    "StnNet",
    "batched_call",
    "call_with_weights",
    "convert_to_stn",
    "materialize",
    "target_shapes",
]
