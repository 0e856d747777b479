"""Lightning-free building blocks: hypernetworks, functional target calls, STN layers, regularizers."""

from hyperlit.nn.functional import batched_call, call_with_weights, materialize
from hyperlit.nn.hypernet import HyperNetwork, target_shapes

__all__ = ["HyperNetwork", "batched_call", "call_with_weights", "materialize", "target_shapes"]
