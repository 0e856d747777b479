"""Running a target network with generated weights (``torch.func.functional_call`` and ``vmap``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["batched_call", "call_with_weights", "materialize"]


def call_with_weights(target: nn.Module, weights: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """``target(*args)`` with the tensors in ``weights`` replacing its parameters of the same name.

    Parameters absent from ``weights`` (e.g. per-task heads kept as ordinary parameters) and buffers are taken
    from ``target`` itself.
    """
    unknown = set(weights) - {n for n, _ in target.named_parameters()} - {n for n, _ in target.named_buffers()}
    if unknown:
        raise KeyError(f"weights name tensors the target does not have: {sorted(unknown)}")
    return functional_call(target, dict(weights), args, kwargs, strict=False)


def batched_call(
    target: nn.Module,
    weights: Mapping[str, Tensor],
    x: Tensor,
    shared_input: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Run ``target`` for K weight sets at once with ``vmap``.

    Args:
        target: The target module (stateless apart from ``weights``; batch-norm running stats are not updated).
        weights: name → ``(K, *shape)`` tensors.
        x: The input, shared by all K weight sets (``shared_input``) or (K, …) with one input per weight set.
        chunk_size: Passed to ``vmap`` to bound memory.

    Returns:
        (K, …) outputs (a tuple of such for targets returning tuples, e.g. ``nn.LSTM``). Targets whose kernels
        have no ``vmap`` batching rule (``nn.LSTM``) fall back to K sequential calls with the same result.
    """

    def one(w: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(target, w, (inp,), strict=False)

    in_dims = (0, None if shared_input else 0)
    try:
        return torch.func.vmap(one, in_dims=in_dims, chunk_size=chunk_size)(dict(weights), x)
    except RuntimeError as err:
        # Some fused kernels (e.g. ``nn.LSTM``'s ``aten::lstm``) have no vmap batching rule: run the K weight
        # sets one after another instead (same result, K calls) rather than failing.
        if "Batching rule not implemented" not in str(err):
            raise
    k = next(iter(weights.values())).shape[0]
    outs = [one({n: w[i] for n, w in weights.items()}, x if shared_input else x[i]) for i in range(k)]
    return _stack(outs)


def _stack(outs: list[Any]) -> Any:
    """Stack a list of equally structured outputs (tensors, tuples/lists of them) along a new dim 0."""
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.stack(outs)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[j] for o in outs]) for j in range(len(first)))
    raise TypeError(f"cannot stack target outputs of type {type(first).__name__}")


def materialize(target: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``target`` whose parameters hold ``weights`` (detached): a plain module for inference."""
    import copy

    module = copy.deepcopy(target)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise KeyError(f"target has no parameter {name!r}")
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != target's {tuple(params[name].shape)}")
            params[name].copy_(value.detach())
    return module
