"""STN image classifiers: the paper's AlexNet-style CIFAR-10 CNN, a small CNN and an MLP (STN §5, official
``cnn/hypermodels/{alexnet,small}.py``).

Every network follows the :class:`~hyperlit.nn.stn.StnNet` contract: ``forward(x, hnet_input, hparams, generator)``
with images in [0, 1] (normalised inside the network), per-example regularizers in train mode, and
``augment(x, hparams, generator)`` for the data augmentation the training step applies. Hyperparameters the space
does not tune take their value from ``fixed`` (default: off). ``default_hyperparameters()`` (also available as the
module-level functions ``alexnet_hyperparameters`` …) gives each network's default search space, so configs can
stay short.

Official bugs not ported: the cutout condition that was always true (here cutout runs only when its length and
hole count are tuned or fixed to non-zero values), the cut-length initialisation range 25 vs projection range 24
(both are (0, 24) here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperlit.hparams import Hyperparameter
from hyperlit.nn.augment import color_jitter, cutout, input_scale_noise
from hyperlit.nn.regularizers import channel_dropout, input_dropout, per_example_dropout
from hyperlit.nn.stn import StnConv2d, StnLinear, StnNet, VInit

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "AlexNetCNN",
    "StnAlexNet",
    "StnMLP",
    "StnSmallCNN",
    "alexnet_hyperparameters",
    "image_hyperparameters",
    "mlp_hyperparameters",
    "small_cnn_hyperparameters",
]

CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # the Cutout code base's constants (official STN code)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

_JITTER = ("hue", "contrast", "sat", "bright")
_IMAGE_NAMES = (*_JITTER, "indropout", "inscale", "cutlength", "cutholes")


def _dropout(name: str) -> Hyperparameter:
    return Hyperparameter(name, 0.0, 0.9, init=0.05, init_sigma=0.5)  # (0, 0.9) "improves stability" (official)


def image_hyperparameters() -> list[Hyperparameter]:
    """Colour jitter, input dropout/scaling and cutout with the official ranges and initial values, official order."""
    return [
        Hyperparameter("hue", 0.0, 0.5, init=0.05, init_sigma=0.5),
        Hyperparameter("contrast", 0.0, 1.0, init=0.05, init_sigma=0.5),
        Hyperparameter("sat", 0.0, 1.0, init=0.05, init_sigma=0.5),
        Hyperparameter("bright", 0.0, 1.0, init=0.05, init_sigma=0.5),
        Hyperparameter("indropout", 0.0, 1.0, init=0.05, init_sigma=0.5),
        Hyperparameter("inscale", 0.0, 0.3, init=0.05, init_sigma=0.5),
        Hyperparameter("cutlength", 0.0, 24.0, init=4.0, init_sigma=0.5, discrete=True),
        Hyperparameter("cutholes", 0.0, 4.0, init=1.0, init_sigma=0.5, discrete=True),
    ]


def alexnet_hyperparameters() -> list[Hyperparameter]:
    """The paper's 15 CIFAR-10 hyperparameters in the official order (``--tune_all``)."""
    return [
        *(_dropout(f"dropout{i}") for i in range(5)),
        *image_hyperparameters(),
        _dropout("fcdropout0"),
        _dropout("fcdropout1"),
    ]


def small_cnn_hyperparameters() -> list[Hyperparameter]:
    """Per-layer dropouts of the small CNN plus the image hyperparameters (11)."""
    return [*(_dropout(f"dropout{i}") for i in range(3)), *image_hyperparameters()]


def mlp_hyperparameters(num_hidden: int = 1) -> list[Hyperparameter]:
    """One dropout rate per hidden layer (``dropout0`` …)."""
    return [_dropout(f"dropout{i}") for i in range(num_hidden)]


class _StnImageNet(StnNet):
    """Shared parts: fixed values, normalisation, augmentation and input regularizers of the CNNs."""

    def _setup_common(
        self, hdim: int | None, fixed: Mapping[str, float] | None, mean: Sequence[float], std: Sequence[float]
    ) -> int:
        self._hdim_auto = hdim is None
        self.hdim = len(self.default_hyperparameters()) if hdim is None else hdim
        unknown = sorted(set(fixed or {}) - set(self.hparam_names))
        if unknown:
            raise KeyError(
                f"fixed names unknown hyperparameters {unknown}; {type(self).__name__} knows {list(self.hparam_names)}"
            )
        self.fixed = dict(fixed or {})
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        return self.hdim

    def _value(self, hparams: Mapping[str, Tensor] | None, name: str) -> Tensor | float:
        if hparams is not None and name in hparams:
            return hparams[name]
        return float(self.fixed.get(name, 0.0))

    @staticmethod
    def _active(v: Tensor | float) -> bool:
        return isinstance(v, Tensor) or v > 0

    def augment(self, x: Tensor, hparams: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Per-example colour jitter (on [0, 1] images), then cutout filled with the data mean (0 after normalising)."""
        hue, con, sat, bri = (self._value(hparams, n) for n in _JITTER)
        if any(self._active(v) for v in (hue, con, sat, bri)):
            if x.shape[1] != 3:
                raise ValueError(f"colour jitter (hue/contrast/sat/bright) needs RGB images, got {x.shape[1]} channels")
            x = color_jitter(x, bri, con, sat, hue, generator=generator)
        length, holes = self._value(hparams, "cutlength"), self._value(hparams, "cutholes")
        if self._active(length) and self._active(holes):
            x = cutout(x, length, holes, generator=generator, fill=self.mean.flatten())
        return x

    def _inputs(self, x: Tensor, hparams: Mapping[str, Tensor] | None, generator: torch.Generator | None) -> Tensor:
        x = (x - self.mean) / self.std
        if self.training:
            p = self._value(hparams, "indropout")
            if self._active(p):
                x = input_dropout(x, p, generator=generator)
            s = self._value(hparams, "inscale")
            if self._active(s):
                x = input_scale_noise(x, s, generator=generator)
        return x

    def _drop(
        self, x: Tensor, hparams: Mapping[str, Tensor] | None, name: str, generator: torch.Generator | None
    ) -> Tensor:
        p = self._value(hparams, name)
        if not self.training or not self._active(p):
            return x
        fn = channel_dropout if x.dim() == 4 else per_example_dropout
        return fn(x, p, generator=generator)


class StnAlexNet(_StnImageNet):
    """The paper's AlexNet-style STN CNN for CIFAR-10 (official ``hypermodels/alexnet.py``).

    Five 3×3 STN convolutions with 64-192-384-256-256 filters (strides 2,1,1,1,1, max-pool after convs 0, 1, 4),
    per-example channel dropout after each convolution, per-example dropout before fc1 and fc2, STN linear layers
    1024-4096-4096-10. No batch-norm (as the original). Tunes the 15 hyperparameters of
    :func:`alexnet_hyperparameters`.

    Args:
        num_classes: Output classes.
        hdim: Hypernetwork input size; ``None`` = the number of tuned hyperparameters (set by the module).
        width: Multiplier on every layer width (1.0 = the paper's network; smaller for CPU runs).
        fixed: Values of hyperparameters that are not tuned (default 0 = off).
        v_init: Initialisation of the bottlenecks ``V`` (``normal`` official, ``zero`` pomonam).
        mean: Per-channel normalisation mean (images arrive in [0, 1]).
        std: Per-channel normalisation standard deviation.
    """

    hparam_names = tuple(h.name for h in alexnet_hyperparameters())

    def __init__(
        self,
        num_classes: int = 10,
        hdim: int | None = None,
        width: float = 1.0,
        fixed: dict[str, float] | None = None,
        v_init: VInit = "normal",
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        h = self._setup_common(hdim, fixed, mean, std)
        filters = [3, *(max(1, round(f * width)) for f in (64, 192, 384, 256, 256))]
        strides = [2, 1, 1, 1, 1]
        self.convs = nn.ModuleList(
            StnConv2d(filters[i], filters[i + 1], 3, h, stride=strides[i], padding=1, v_init=v_init) for i in range(5)
        )
        fc = max(1, round(4096 * width))
        self.fc1 = StnLinear(filters[-1] * 2 * 2, fc, h, v_init=v_init)
        self.fc2 = StnLinear(fc, fc, h, v_init=v_init)
        self.fc3 = StnLinear(fc, num_classes, h, v_init=v_init)

    def default_hyperparameters(self) -> list[Hyperparameter]:
        return alexnet_hyperparameters()

    def forward(
        self,
        x: Tensor,
        hnet_input: Tensor,
        hparams: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        x = self._inputs(x, hparams, generator)
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x, hnet_input))
            if i in (0, 1, 4):
                x = F.max_pool2d(x, 2)
            x = self._drop(x, hparams, f"dropout{i}", generator)
        x = x.flatten(1)
        x = self._drop(x, hparams, "fcdropout0", generator)
        x = F.relu(self.fc1(x, hnet_input))
        x = self._drop(x, hparams, "fcdropout1", generator)
        x = F.relu(self.fc2(x, hnet_input))
        return self.fc3(x, hnet_input)


class AlexNetCNN(nn.Module):
    """The plain counterpart of :class:`StnAlexNet` (same layers, fixed dropout rates; baseline and benchmarks).

    ``convert_to_stn(AlexNetCNN(), dropout_hparams={...})`` gives an STN network with the same computation.
    """

    def __init__(
        self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.05, fc_dropout: float = 0.05
    ) -> None:
        super().__init__()
        filters = [3, *(max(1, round(f * width)) for f in (64, 192, 384, 256, 256))]
        strides = [2, 1, 1, 1, 1]
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv2d(filters[i], filters[i + 1], 3, stride=strides[i], padding=1), nn.ReLU()]
            if i in (0, 1, 4):
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.Dropout2d(dropout))
        fc = max(1, round(4096 * width))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(fc_dropout),
            nn.Linear(filters[-1] * 4, fc),
            nn.ReLU(),
            nn.Dropout(fc_dropout),
            nn.Linear(fc, fc),
            nn.ReLU(),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class StnSmallCNN(_StnImageNet):
    """The official small STN CNN: 3×3 STN convolutions 3→10→20→40 (max-pool after each, per-example channel
    dropout after each) and a plain linear classifier.

    Args:
        num_classes: Output classes.
        hdim: Hypernetwork input size; ``None`` = the number of tuned hyperparameters (set by the module).
        filters: Filters of the three convolutions.
        image_size: Input height/width (divisible by 8).
        in_channels: Input channels (colour jitter needs 3).
        fixed: Values of hyperparameters that are not tuned (default 0 = off).
        v_init: Initialisation of the bottlenecks ``V``.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
    """

    hparam_names = tuple(h.name for h in small_cnn_hyperparameters())

    def __init__(
        self,
        num_classes: int = 10,
        hdim: int | None = None,
        filters: tuple[int, int, int] = (10, 20, 40),
        image_size: int = 32,
        in_channels: int = 3,
        fixed: dict[str, float] | None = None,
        v_init: VInit = "normal",
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} entries, got {len(mean)}/{len(std)}")
        h = self._setup_common(hdim, fixed, mean, std)
        chans = [in_channels, *filters]
        self.convs = nn.ModuleList(StnConv2d(chans[i], chans[i + 1], 3, h, padding=1, v_init=v_init) for i in range(3))
        self.fc = nn.Linear(chans[-1] * (image_size // 8) ** 2, num_classes)

    def default_hyperparameters(self) -> list[Hyperparameter]:
        return small_cnn_hyperparameters()

    def forward(
        self,
        x: Tensor,
        hnet_input: Tensor,
        hparams: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        x = self._inputs(x, hparams, generator)
        for i, conv in enumerate(self.convs):
            x = F.max_pool2d(F.relu(conv(x, hnet_input)), 2)
            x = self._drop(x, hparams, f"dropout{i}", generator)
        return self.fc(x.flatten(1))


class StnMLP(StnNet):
    """An STN multilayer perceptron: STN linear layers with per-example dropout after every hidden layer.

    Hyperparameters: ``dropout{i}`` after hidden layer ``i`` (default search space) and ``indropout`` on the inputs.

    Args:
        in_features: Input features (inputs are flattened).
        hidden: Hidden layer sizes.
        num_classes: Outputs.
        hdim: Hypernetwork input size; ``None`` = the number of tuned hyperparameters (set by the module).
        fixed: Values of hyperparameters that are not tuned (default 0 = off).
        v_init: Initialisation of the bottlenecks ``V``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] = (128,),
        num_classes: int = 10,
        hdim: int | None = None,
        fixed: dict[str, float] | None = None,
        v_init: VInit = "normal",
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("StnMLP needs at least one hidden layer (dropout acts on hidden units)")
        self.hidden = tuple(hidden)
        self.hparam_names = ("indropout", *(f"dropout{i}" for i in range(len(hidden))))
        unknown = sorted(set(fixed or {}) - set(self.hparam_names))
        if unknown:
            raise KeyError(f"fixed names unknown hyperparameters {unknown}; StnMLP knows {list(self.hparam_names)}")
        self.fixed = dict(fixed or {})
        self._hdim_auto = hdim is None
        self.hdim = len(self.hidden) if hdim is None else hdim
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(
            StnLinear(sizes[i], sizes[i + 1], self.hdim, v_init=v_init) for i in range(len(sizes) - 1)
        )

    def default_hyperparameters(self) -> list[Hyperparameter]:
        return mlp_hyperparameters(len(self.hidden))

    def _rate(self, hparams: Mapping[str, Tensor] | None, name: str) -> Tensor | float:
        if hparams is not None and name in hparams:
            return hparams[name]
        return float(self.fixed.get(name, 0.0))

    def forward(
        self,
        x: Tensor,
        hnet_input: Tensor,
        hparams: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        x = x.flatten(1)
        p = self._rate(hparams, "indropout")
        if self.training and (isinstance(p, Tensor) or p > 0):
            x = input_dropout(x, p, generator=generator)
        for i, layer in enumerate(self.layers[:-1]):
            x = F.relu(layer(x, hnet_input))
            p = self._rate(hparams, f"dropout{i}")
            if self.training and (isinstance(p, Tensor) or p > 0):
                x = per_example_dropout(x, p, generator=generator)
        return self.layers[-1](x, hnet_input)
