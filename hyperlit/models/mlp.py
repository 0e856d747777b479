"""Plain multilayer perceptrons used as target networks (PHN fairness MLPs, continual-learning MLPs)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """``in_dim → hidden[0] → … → out_dim`` with an activation between layers (none after the last).

    Args:
        in_dim: Input features (inputs with more dimensions are flattened).
        hidden: Hidden layer sizes (``()`` gives a linear model).
        out_dim: Output features.
        activation: ``relu``, ``elu``, ``tanh`` or ``sigmoid``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (100,), out_dim: int = 1, activation: str = "relu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
        if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer sizes must be >= 1, got in={in_dim}, hidden={list(hidden)}, out={out_dim}")
        sizes = [in_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1) if x.dim() > 2 else x)
