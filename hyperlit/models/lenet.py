"""The LeNet target of Pareto HyperNetworks' Multi-MNIST experiments (Navon et al. 2021, ``LeNetTarget``).

Layer list of the official ``experiments/multimnist/models.py`` (a hypernetwork generates every weight)::

    conv 9×9, 1 → 10   → ReLU → max-pool 2      36×36 → 28×28 → 14×14
    conv 5×5, 10 → 20  → ReLU → max-pool 2      14×14 → 10×10 → 5×5
    flatten (20·5·5 = 500) → linear 50          no ReLU: a linear bottleneck
    one linear 50 → 10 head per task            outputs (B, T, 10)

Unlike the PMTL/EPO LeNet there is **no ReLU after the 50-unit layer**. With two tasks the network has 31,910
parameters, the official count. The layers are PyTorch's ``nn.Conv2d`` / ``nn.Linear`` and nothing is updated in
place, so it runs under ``torch.func.functional_call`` and ``vmap`` with generated weights (e.g. as the ``target``
of :class:`~hyperlit.pareto.module.ParetoHyperNetModule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PHNLeNet"]


class PHNLeNet(nn.Module):
    """PHN's Multi-MNIST LeNet: two conv/pool blocks, a linear 50-unit layer, one 10-way head per task.

    Args:
        num_tasks: Number of task heads (Multi-MNIST: 2).
        num_classes: Classes per task.
        in_channels: Input channels.
        image_size: Height and width of the inputs (36 for Multi-MNIST; the FC input is ``20·s²`` with
            ``s = ((size − 8) // 2 − 4) // 2``).
    """

    def __init__(self, num_tasks: int = 2, num_classes: int = 10, in_channels: int = 1, image_size: int = 36) -> None:
        super().__init__()
        if num_tasks < 1 or num_classes < 2 or in_channels < 1:
            raise ValueError(
                f"need num_tasks >= 1, num_classes >= 2, in_channels >= 1; got {num_tasks}, {num_classes}, {in_channels}"
            )
        side = ((image_size - 8) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for the 9×9 and 5×5 conv/pool blocks (need >= 18)")
        self.num_tasks, self.num_classes = num_tasks, num_classes
        self.in_channels, self.image_size = in_channels, image_size
        self.conv0 = nn.Conv2d(in_channels, 10, 9)
        self.conv1 = nn.Conv2d(10, 20, 5)
        self.hidden0 = nn.Linear(20 * side * side, 50)
        self.heads = nn.ModuleList(nn.Linear(50, num_classes) for _ in range(num_tasks))

    def features(self, x: Tensor) -> Tensor:
        """The 50-unit shared representation (linear, no ReLU) of images ``(B, C, H, W)``."""
        shape = (self.in_channels, self.image_size, self.image_size)
        if x.dim() == 2 and x.shape[1] == shape[0] * shape[1] * shape[2]:
            x = x.reshape(len(x), *shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"PHNLeNet expects inputs (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv0(x)), 2)
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)
        return self.hidden0(h.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_tasks, num_classes)`` of images ``(B, C, H, W)`` (or flattened ``(B, C·H·W)``)."""
        z = self.features(x)
        return torch.stack([head(z) for head in self.heads], dim=1)
