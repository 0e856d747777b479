"""Wide residual networks for 32×32 images (Zagoruyko & Komodakis, BMVC 2016), the WRN-28-10 of the ensemble papers.

The pre-activation ordering of google/uncertainty-baselines' ``wide_resnet.py`` (``version=2``), on which its
BatchEnsemble and hyper-batch-ensemble WRNs are built::

    conv 3×3, 3 → 16
    3 groups of (depth − 4) / 6 blocks, widths 16·w, 32·w, 64·w, strides 1, 2, 2; a block is
        y = conv3×3(dropout(relu(bn(conv3×3(a))))) with a = relu(bn(x)), s = x or conv1×1(a)
        out = s + y      (1×1 shortcut where the shape changes: first blocks, except group 0's at w = 1)
    relu(bn(·)) → global average pool (8×8) → linear → logits

Convolutions have no bias and He-normal (fan-in) kernels, as UB's ``he_normal``; BatchNorm starts at γ = 1, β = 0.
The layers are plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``, so
:func:`~hyperlit.nn.batch_ensemble.convert_to_batch_ensemble` and
:func:`~hyperlit.nn.batch_ensemble.convert_to_hyper_batch_ensemble` turn it into a BatchEnsemble or hyper-batch
ensemble with BatchNorm shared by the members (UB ``wide_resnet_batchensemble.py``). Images come in as [0, 1]
tensors and are normalised inside the network (per-channel CIFAR-10 mean and std), like the other hyperlit CNNs.
``dropout`` between the two convolutions of a block is the original paper's option (UB uses none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperlit.models.stn_cnn import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["WideResNet", "WideResNetBlock"]


class WideResNetBlock(nn.Module):
    """A pre-activation basic block: ``s + conv(relu(bn(conv(relu(bn(x))))))``, ``s`` the identity or a 1×1 conv.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
        dropout: Dropout rate between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        y = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))
        return (x if self.shortcut is None else self.shortcut(a)) + y


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for 32×32 inputs (pre-activation, UB ``version=2``); WRN-28-10 by default.

    Args:
        depth: Total depth, ``6·n + 4`` for ``n`` blocks per group (28: 4 blocks per group).
        width: Width multiplier ``w`` of the groups' 16, 32, 64 channels.
        num_classes: Output classes.
        dropout: Dropout rate between the two convolutions of every block (UB: 0).
        in_channels: Input channels.
        mean: Per-channel normalisation mean of the [0, 1] inputs.
        std: Per-channel normalisation standard deviation.

    Module paths (e.g. for ``l2_hparams`` of the hyper-batch converter): ``conv`` (input conv),
    ``groups.<g>.<b>.conv1`` / ``conv2`` / ``shortcut`` (group ``g`` in 0..2, block ``b``), ``bn``, ``fc``.
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6·n + 4 with n >= 1 blocks per group (10, 16, 22, 28, …), got {depth}")
        if width < 1 or num_classes < 2 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"need width >= 1, num_classes >= 2, 0 <= dropout < 1; got {width}, {num_classes}, {dropout}"
            )
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} entries, got {len(mean)}/{len(std)}")
        blocks = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, chans = [], 16
        for w, stride in zip(widths, (1, 2, 2)):
            group = [
                WideResNetBlock(chans if b == 0 else w, w, stride if b == 0 else 1, dropout) for b in range(blocks)
            ]
            groups.append(nn.Sequential(*group))
            chans = w
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(chans)
        self.fc = nn.Linear(chans, num_classes)
        self.depth, self.width, self.num_classes = depth, width, num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal (fan-in) kernels, zero linear bias, BatchNorm γ = 1, β = 0 (UB's initialisers)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(self.conv((x - self.mean.to(x)) / self.std.to(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
