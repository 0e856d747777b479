"""The convolutional network of Zenke et al. 2017 for SplitCIFAR, as in the official HNET code.

"Continual Learning Through Synaptic Intelligence" (Zenke, Poole & Ganguli, ICML 2017) used it for split
CIFAR-10/100; von Oswald et al. 2020 use the same network as the target of their SplitCIFAR hypernetwork runs. The
layer list, padding and dropout follow ``chrhenning/hypercl`` ``mnets/zenkenet.py`` (architecture ``cifar``)::

    conv 3×3, 32, padding 1 ('SAME')  → ReLU
    conv 3×3, 32, padding 0 ('VALID') → ReLU → max-pool 2 → Dropout2d(p)
    conv 3×3, 64, padding 1 ('SAME')  → ReLU
    conv 3×3, 64, padding 0 ('VALID') → ReLU → max-pool 2 → Dropout2d(p)
    flatten (64·6·6 = 2,304) → linear 512 → ReLU → Dropout(2p)
    linear ``num_outputs`` (the output head)

Dropout on the convolutional blocks is channel-wise (``nn.Dropout2d``) and is applied after pooling; the
fully-connected dropout rate is twice ``dropout_rate`` (official: 0.25 and 0.5), so ``dropout_rate`` must be at most
0.5. The layers are PyTorch's ``nn.Conv2d`` / ``nn.Linear`` with their default initialisation (the official
``init_params`` is the same Kaiming-uniform init). Nothing is updated in place, so the network runs under
``torch.func.functional_call`` and ``vmap`` with generated weights (in eval mode under ``vmap``: dropout draws
random numbers in training mode).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ZenkeNet"]


class ZenkeNet(nn.Module):
    """Zenke et al.'s CIFAR network: 4 convolutions (32, 32, 64, 64 channels), FC 512, a linear output head.

    The output head is the last layer with parameters (an ``nn.Linear``), so the continual learners can widen it to
    one slice per task (``heads="multihead"``). With 60 outputs (6 heads × 10, the paper's SplitCIFAR-10/100) it
    has 1,276,508 weights, the official count.

    Args:
        num_outputs: Outputs of the head (classes; a multi-head learner widens it to ``num_tasks · num_outputs``).
        in_channels: Input channels (3 for CIFAR).
        dropout_rate: Dropout after each convolutional block; the FC layer uses twice this rate (0: no dropout).
        image_size: Height and width of the inputs (32 for CIFAR; the FC input is 64 · s², s = ((size − 2) // 2
            − 2) // 2).
    """

    def __init__(
        self, num_outputs: int = 10, in_channels: int = 3, dropout_rate: float = 0.25, image_size: int = 32
    ) -> None:
        super().__init__()
        if num_outputs < 1 or in_channels < 1:
            raise ValueError(f"num_outputs and in_channels must be >= 1, got {num_outputs}, {in_channels}")
        if not 0.0 <= dropout_rate <= 0.5:
            raise ValueError(f"dropout_rate must be in [0, 0.5] (the FC layer uses twice the rate), got {dropout_rate}")
        side = ((image_size - 2) // 2 - 2) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for two conv/pool blocks (need >= 10)")
        self.in_channels, self.image_size = in_channels, image_size
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3)
        self.drop_conv = nn.Dropout2d(dropout_rate)
        self.fc = nn.Linear(64 * side * side, 512)
        self.drop_fc = nn.Dropout(2 * dropout_rate)
        self.head = nn.Linear(512, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_outputs)`` of images ``(B, C, H, W)`` (or flattened ``(B, C·H·W)``, channel planes)."""
        shape = (self.in_channels, self.image_size, self.image_size)
        if x.dim() == 2 and x.shape[1] == shape[0] * shape[1] * shape[2]:
            x = x.reshape(len(x), *shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"ZenkeNet expects inputs (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = self.drop_conv(F.max_pool2d(h, 2))
        h = F.relu(self.conv4(F.relu(self.conv3(h))))
        h = self.drop_conv(F.max_pool2d(h, 2))
        h = self.drop_fc(F.relu(self.fc(h.flatten(1))))
        return self.head(h)
