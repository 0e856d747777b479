"""Self-Tuning Network layers: structured best-response approximations (MacKay, Vicol et al., ICLR 2019, §4.2).

An STN layer holds *general* weights ``W, b`` and *response* weights ``W_h, b_h`` plus a bottleneck ``V`` that maps
the per-example hypernetwork input ``λ̃_b`` (B, H) to output-unit gates::

    y_b = W x_b + b + (V λ̃_b)[:D] ⊙ (W_h x_b) + (V λ̃_b)[D:] ⊙ b_h              (STN eq. 9, Linear)

and the same per output channel for convolutions. Row-scaling commutes with the matmul/convolution, so the
per-example weights ``W + diag((Vλ̃_b)[:D]) W_h`` are never materialised: one extra matmul (or a single convolution
with twice the output channels) per layer.

Running a network made of STN layers
------------------------------------
Layers accept the hypernetwork input explicitly, ``layer(x, hnet_input)`` — which is what the models in
:mod:`hyperlit.models.stn_cnn` do. A *converted* plain network (:func:`convert_to_stn`) cannot pass the extra
argument through its own ``forward``, so it is wrapped in an :class:`StnModel` container whose
``forward(x, hnet_input, hparams, generator)`` installs the per-example context on every STN layer and
:class:`StnDropout` of the wrapped network for the duration of the call (and always clears it afterwards)::

    net = convert_to_stn(my_cnn, dropout_hparams={"classifier.0": "drop_fc"})
    logits = net(x, hnet_input=lam_tilde, hparams={"drop_fc": p}, generator=rng)

Differences from the official code: no learnable ``elem_scalar`` on the general path by default (pomonam's
cleaned-up layers drop it; ``elem_scalar=True`` restores the official behaviour), ``V`` is N(0, 0.01²) by default
(official) or zero (pomonam, ``v_init="zero"``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from hyperlit.hparams import Hyperparameter
from hyperlit.nn.regularizers import channel_dropout, per_example_dropout

__all__ = [
    "StnConv2d",
    "StnDropout",
    "StnLayer",
    "StnLinear",
    "StnModel",
    "StnNet",
    "convert_to_stn",
    "stn_context",
]

VInit = Literal["normal", "zero"]


class StnLayer(nn.Module):
    """Common part of STN layers: the bottleneck ``V`` (``hyper_bottleneck``), parameter groups and the context.

    Args:
        out_dim: Number of output units / channels ``D``.
        hdim: Size ``H`` of the hypernetwork input.
        bias: Whether the layer has biases (then ``V`` has ``2D`` rows, else ``D``).
        v_init: ``"normal"`` (N(0, v_std²), official code) or ``"zero"`` (pomonam).
        v_std: Standard deviation of the normal initialisation of ``V``.
        elem_scalar: Learnable scalar multiplying the general path (official code; off by default).
    """

    def __init__(
        self,
        out_dim: int,
        hdim: int,
        bias: bool,
        v_init: VInit = "normal",
        v_std: float = 0.01,
        elem_scalar: bool = False,
    ) -> None:
        super().__init__()
        if hdim < 1:
            raise ValueError(f"hdim (number of hypernetwork inputs) must be >= 1, got {hdim}")
        if v_init not in ("normal", "zero"):
            raise ValueError(f"v_init must be 'normal' or 'zero', got {v_init!r}")
        self.hdim = hdim
        self.out_dim = out_dim
        self.v_init = v_init
        self.v_std = v_std
        self.hyper_bottleneck = nn.Parameter(torch.empty((2 if bias else 1) * out_dim, hdim))
        self.elem_scalar = nn.Parameter(torch.ones(())) if elem_scalar else None
        self._hnet_context: Tensor | None = None

    def reset_bottleneck(self) -> None:
        """Initialise ``V`` according to ``v_init``."""
        if self.v_init == "zero":
            nn.init.zeros_(self.hyper_bottleneck)
        else:
            nn.init.normal_(self.hyper_bottleneck, 0.0, self.v_std)

    def set_hdim(self, hdim: int) -> None:
        """Replace ``V`` by a freshly initialised one for ``hdim`` hypernetwork inputs (before training only)."""
        if hdim < 1:
            raise ValueError(f"hdim must be >= 1, got {hdim}")
        old = self.hyper_bottleneck
        self.hyper_bottleneck = nn.Parameter(old.new_empty(old.shape[0], hdim))
        self.hdim = hdim
        self.reset_bottleneck()

    # -- parameter groups --------------------------------------------------------------------------
    _general_names: tuple[str, ...] = ("weight", "bias", "elem_scalar")
    _response_names: tuple[str, ...] = ("response_weight", "response_bias", "hyper_bottleneck")

    def general_parameters(self) -> Iterator[nn.Parameter]:
        """The elementary weights ``W, b`` (and ``elem_scalar``): the current best-response estimate."""
        for name in self._general_names:
            p = getattr(self, name, None)
            if isinstance(p, nn.Parameter):
                yield p

    def response_parameters(self) -> Iterator[nn.Parameter]:
        """``W_h, b_h`` and the bottleneck ``V``: how the weights respond to the hyperparameters."""
        for name in self._response_names:
            p = getattr(self, name, None)
            if isinstance(p, nn.Parameter):
                yield p

    # -- hypernet input --------------------------------------------------------------------------
    def _gates(self, hnet_input: Tensor | None, batch: int) -> Tensor:
        """``V λ̃`` (B, 2D or D), with shape checks and a clear error when no input was given."""
        return F.linear(self._hnet(hnet_input, batch), self.hyper_bottleneck)

    def _shared_gates(self, hnet_input: Tensor | None, batch: int) -> tuple[Tensor, bool]:
        """``(V λ̃, shared)``: ``shared`` when one row serves the whole batch (a single row, or rows that are a
        stride-0 expansion such as ``HyperparameterSpace.repeat``); then only that row's gates are returned."""
        h = self._hnet(hnet_input, batch)
        shared = h.shape[0] == 1 or h.stride(0) == 0
        return F.linear(h[:1] if shared else h, self.hyper_bottleneck), shared

    def _fold(self, s: Tensor) -> tuple[Tensor, Tensor | None]:
        """Effective weight and bias for one shared gate row ``s`` (1, 2D or D): ``W + diag(s[:D]) W_h``."""
        d = self.out_dim
        view = (d,) + (1,) * (self.weight.dim() - 1)
        es = self.elem_scalar
        weight = torch.addcmul(
            self.weight if es is None else self.weight * es, s[0, :d].view(view), self.response_weight
        )
        bias = None
        if self.bias is not None:
            b = self.bias if es is None else self.bias * es
            bias = torch.addcmul(b, s[0, d:], self.response_bias)  # type: ignore[arg-type]
        return weight, bias

    def _hnet(self, hnet_input: Tensor | None, batch: int) -> Tensor:
        h = hnet_input if hnet_input is not None else self._hnet_context
        if h is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the hypernetwork input: call layer(x, hnet_input) or run the network "
                "through StnModel.forward(x, hnet_input, ...) / stn_context(...)"
            )
        if h.dim() != 2 or h.shape[1] != self.hdim:
            raise ValueError(f"hnet_input must have shape (B, {self.hdim}), got {tuple(h.shape)}")
        if h.shape[0] not in (1, batch):
            raise ValueError(f"hnet_input has {h.shape[0]} rows but the input batch has {batch} examples")
        return h.to(self.hyper_bottleneck.dtype)


class StnLinear(StnLayer):
    """``nn.Linear`` with a structured best response (STN eq. 9).

    Input ``x`` of shape ``(B, *, in_features)``; hypernetwork input (B, hdim). Parameter names ``weight``/``bias``
    match ``nn.Linear``, so a plain layer's ``state_dict`` loads with ``strict=False``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hdim: int,
        bias: bool = True,
        v_init: VInit = "normal",
        v_std: float = 0.01,
        elem_scalar: bool = False,
    ) -> None:
        super().__init__(out_features, hdim, bias, v_init, v_std, elem_scalar)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.response_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.response_bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation for both weight sets, then ``V``."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        for w, b in ((self.weight, self.bias), (self.response_weight, self.response_bias)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        self.reset_bottleneck()

    def forward(self, x: Tensor, hnet_input: Tensor | None = None) -> Tensor:
        s, shared = self._shared_gates(hnet_input, x.shape[0])
        if shared:  # one λ̃ for the whole batch (evaluation): fold into a single matmul, exact
            return F.linear(x, *self._fold(s))
        d = self.out_features
        shape = (s.shape[0],) + (1,) * (x.dim() - 2) + (d,)
        out = F.linear(x, self.weight, self.bias)
        if self.elem_scalar is not None:
            out = out * self.elem_scalar
        out = torch.addcmul(out, F.linear(x, self.response_weight), s[:, :d].reshape(shape))
        if self.response_bias is not None:
            out = torch.addcmul(out, self.response_bias, s[:, d:].reshape(shape))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, hdim={self.hdim}, bias={self.bias is not None}"


class StnConv2d(StnLayer):
    """``nn.Conv2d`` (groups, stride, padding, dilation, padding modes) with a per-output-channel best response.

    The general and response filters are two ordinary convolutions of the same input (on CPU this is faster than one
    convolution with ``2·out_channels`` filters); the response output is gated by ``(Vλ̃_b)[:D]`` per example and
    channel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        hdim: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        v_init: VInit = "normal",
        v_std: float = 0.01,
        elem_scalar: bool = False,
    ) -> None:
        super().__init__(out_channels, hdim, bias, v_init, v_std, elem_scalar)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        if padding_mode != "zeros" and isinstance(padding, str):
            raise ValueError("string padding with a non-zeros padding_mode is not supported")
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.response_weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.response_bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation for both weight sets, then ``V``."""
        fan_in = self.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        for w, b in ((self.weight, self.bias), (self.response_weight, self.response_bias)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        self.reset_bottleneck()

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            ph, pw = self.padding  # type: ignore[misc]
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, weight, None, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor, hnet_input: Tensor | None = None) -> Tensor:
        s, shared = self._shared_gates(hnet_input, x.shape[0])
        if shared:  # one λ̃ for the whole batch (evaluation): fold into a single convolution, exact
            weight, bias = self._fold(s)
            out = self._conv(x, weight)
            return out if bias is None else out + bias.view(1, -1, 1, 1)
        d = self.out_channels
        general = self._conv(x, self.weight)
        if self.elem_scalar is not None:
            general = general * self.elem_scalar
        if self.bias is not None:
            bias = self.bias * self.elem_scalar if self.elem_scalar is not None else self.bias
            offset = torch.addcmul(bias, self.response_bias, s[:, d:])  # type: ignore[arg-type]
            general = general + offset[:, :, None, None]
        return torch.addcmul(general, self._conv(x, self.response_weight), s[:, :d, None, None])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, hdim={self.hdim}, "
            f"bias={self.bias is not None}"
        )


class StnDropout(nn.Module):
    """Dropout whose per-example rate is the hyperparameter ``hparam`` of the current :func:`stn_context`.

    Elementwise (``channelwise=False``) or whole channels (``channelwise=True``, like ``nn.Dropout2d``). When the
    context has no value for ``hparam`` the fixed rate ``p`` is used. Identity in eval mode.
    """

    def __init__(self, hparam: str, channelwise: bool = False, p: float = 0.0) -> None:
        super().__init__()
        self.hparam = hparam
        self.channelwise = channelwise
        self.p = p
        self._hparams_context: Mapping[str, Tensor] | None = None
        self._generator_context: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        hp = self._hparams_context or {}
        rate: Tensor | float = hp.get(self.hparam, self.p)
        fn = channel_dropout if self.channelwise else per_example_dropout
        return fn(x, rate, training=True, generator=self._generator_context)

    def extra_repr(self) -> str:
        return f"hparam={self.hparam!r}, channelwise={self.channelwise}, p={self.p}"


@contextlib.contextmanager
def stn_context(
    module: nn.Module,
    hnet_input: Tensor,
    hparams: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Install the per-example hypernet input (and regularizer strengths/RNG) on every STN layer of ``module``."""
    layers = [m for m in module.modules() if isinstance(m, (StnLayer, StnDropout))]
    try:
        for m in layers:
            if isinstance(m, StnLayer):
                m._hnet_context = hnet_input
            else:
                m._hparams_context = hparams
                m._generator_context = generator
        yield
    finally:
        for m in layers:
            if isinstance(m, StnLayer):
                m._hnet_context = None
            else:
                m._hparams_context = None
                m._generator_context = None


class StnNet(nn.Module):
    """Base class of networks that :class:`~hyperlit.tuning.stn.SelfTuningModule` tunes.

    Contract: ``forward(x, hnet_input, hparams, generator=None)`` returns the outputs; ``hnet_input`` is (B, hdim);
    ``hparams`` maps hyperparameter names to constrained per-example values (B,) that drive the regularizers in
    train mode (identity in eval mode); ``augment(x, hparams, generator)`` applies the data augmentation (called by
    the training step only); ``hparam_names`` lists every name the network understands and
    ``default_hyperparameters()`` gives its default search space.
    """

    hdim: int
    hparam_names: tuple[str, ...] = ()

    def default_hyperparameters(self) -> list[Hyperparameter]:
        """The network's default search space (override)."""
        raise NotImplementedError(f"{type(self).__name__} defines no default hyperparameters; pass them explicitly")

    def augment(self, x: Tensor, hparams: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Per-example data augmentation (identity unless overridden)."""
        return x

    def penalty(self, hnet_input: Tensor, hparams: Mapping[str, Tensor]) -> Tensor | None:
        """Extra training-loss term driven by the hyperparameters (e.g. a tuned weight decay); none by default.

        Returns a scalar or a per-example (B,) tensor (averaged by the training step).
        """
        return None

    def set_hdim(self, hdim: int) -> None:
        """Resize every STN layer's bottleneck to ``hdim`` inputs (re-initialised; call before training)."""
        for layer in self.stn_layers():
            layer.set_hdim(hdim)
        self.hdim = hdim

    def stn_layers(self) -> list[StnLayer]:
        return [m for m in self.modules() if isinstance(m, StnLayer)]

    def general_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not a response parameter (STN layers' W, b and all plain layers)."""
        response = {id(p) for p in self.response_parameters()}
        return [p for p in self.parameters() if id(p) not in response]

    def response_parameters(self) -> list[nn.Parameter]:
        """Response weights/biases and bottlenecks of all STN layers."""
        return [p for layer in self.stn_layers() for p in layer.response_parameters()]


class StnModel(StnNet):
    """Container running a network converted by :func:`convert_to_stn` with a per-example hypernet input.

    Args:
        module: The converted network (its ``forward`` takes the ordinary inputs only).
        hdim: Size of the hypernetwork input.
        hyperparameters: Default search space of the network (one entry per :class:`StnDropout` name).
    """

    def __init__(self, module: nn.Module, hdim: int, hyperparameters: Sequence[Hyperparameter] = ()) -> None:
        super().__init__()
        self.module = module
        self.hdim = hdim
        self._defaults = list(hyperparameters)
        self.hparam_names = tuple(sorted({m.hparam for m in module.modules() if isinstance(m, StnDropout)}))

    def default_hyperparameters(self) -> list[Hyperparameter]:
        if not self._defaults:
            return super().default_hyperparameters()
        return copy.deepcopy(self._defaults)

    def forward(
        self,
        x: Tensor,
        hnet_input: Tensor,
        hparams: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Tensor:
        with stn_context(self.module, hnet_input, hparams, generator):
            return self.module(x, **kwargs)


def convert_to_stn(
    model: nn.Module,
    hdim: int | None = None,
    dropout_hparams: Mapping[str, str] | None = None,
    dropout_range: tuple[float, float] = (0.0, 0.9),
    v_init: VInit = "normal",
    v_std: float = 0.01,
    skip: Sequence[str] = (),
) -> StnModel:
    """Copy ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` replaced by an STN layer holding the same weights.

    Args:
        model: A plain network (left untouched).
        hdim: Size of the hypernetwork input; defaults to the number of distinct names in ``dropout_hparams``.
        dropout_hparams: Maps the dotted module names of ``nn.Dropout`` / ``nn.Dropout2d`` layers to hyperparameter
            names; those layers become per-example :class:`StnDropout` layers tuned under that name.
        dropout_range: Range of the default dropout hyperparameters (official code: (0, 0.9)).
        v_init: Initialisation of the new bottlenecks ``V``.
        v_std: Standard deviation of ``V`` for ``v_init="normal"``.
        skip: Dotted names of Linear/Conv2d layers to keep plain (e.g. the classifier head).

    Returns:
        An :class:`StnModel`: call it as ``net(x, hnet_input, hparams, generator)``. With zero response weights it
        computes exactly what ``model`` computes.
    """
    dropout_hparams = dict(dropout_hparams or {})
    names = dict(model.named_modules())
    for path in list(dropout_hparams) + list(skip):
        if path not in names:
            raise KeyError(
                f"{path!r} is not a submodule of {type(model).__name__}; known: {sorted(n for n in names if n)}"
            )
    for path in dropout_hparams:
        if type(names[path]) not in (nn.Dropout, nn.Dropout2d):
            raise TypeError(f"{path!r} is a {type(names[path]).__name__}, not nn.Dropout / nn.Dropout2d")
    hnames = list(dict.fromkeys(dropout_hparams.values()))
    if hdim is None:
        if not hnames:
            raise ValueError("pass hdim (the hypernetwork input size) or dropout_hparams to tune")
        hdim = len(hnames)
    net = copy.deepcopy(model)

    def replace(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            path = f"{prefix}{child_name}"
            new: nn.Module | None = None
            if path in skip:
                continue
            if type(child) is nn.Linear:
                new = StnLinear(child.in_features, child.out_features, hdim, child.bias is not None, v_init, v_std)
            elif type(child) is nn.Conv2d:
                new = StnConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]
                    hdim,
                    child.stride,  # type: ignore[arg-type]
                    child.padding,  # type: ignore[arg-type]
                    child.dilation,  # type: ignore[arg-type]
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                    v_init,
                    v_std,
                )
            elif path in dropout_hparams:
                new = StnDropout(dropout_hparams[path], channelwise=type(child) is nn.Dropout2d, p=child.p)  # type: ignore[attr-defined]
            if new is None:
                replace(child, path + ".")
                continue
            if isinstance(new, StnLayer):
                new.to(device=child.weight.device, dtype=child.weight.dtype)  # type: ignore[arg-type]
                with torch.no_grad():
                    new.weight.copy_(child.weight)  # type: ignore[arg-type]
                    if child.bias is not None:  # type: ignore[union-attr]
                        new.bias.copy_(child.bias)  # type: ignore[union-attr,arg-type]
            new.train(child.training)
            setattr(parent, child_name, new)

    replace(net, "")
    lo, hi = dropout_range
    defaults = []
    for name in hnames:
        ps = [names[path].p for path, n in dropout_hparams.items() if n == name]  # type: ignore[attr-defined]
        init = min(max(float(ps[0]), lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
        defaults.append(Hyperparameter(name, lo, hi, init=init))
    return StnModel(net, hdim, defaults)
