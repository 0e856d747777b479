"""Lightning-free building blocks: hypernetworks, functional target calls, STN and BatchEnsemble layers,
regularizers."""

from hyperlit.nn.batch_ensemble import (
    BatchEnsembleConv2d,
    BatchEnsembleLinear,
    HyperBatchEnsembleConv2d,
    HyperBatchEnsembleLinear,
    convert_to_batch_ensemble,
    convert_to_hyper_batch_ensemble,
    tile_members,
    untile_members,
)
from hyperlit.nn.functional import batched_call, call_with_weights, materialize
from hyperlit.nn.hypernet import HyperNetwork, target_shapes
from hyperlit.nn.stn import StnConv2d, StnLinear, StnNet, convert_to_stn

__all__ = [
    "BatchEnsembleConv2d",
    "BatchEnsembleLinear",
    "HyperBatchEnsembleConv2d",
    "HyperBatchEnsembleLinear",
    "HyperNetwork",
    "StnConv2d",
    "StnLinear",
    "StnNet",
    "batched_call",
    "call_with_weights",
    "convert_to_batch_ensemble",
    "convert_to_hyper_batch_ensemble",
    "convert_to_stn",
    "materialize",
    "target_shapes",
    "tile_members",
    "untile_members",
]
