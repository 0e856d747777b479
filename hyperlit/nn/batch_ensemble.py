"""BatchEnsemble and hyper-batch-ensemble layers (Wen, Tran & Ba, ICLR 2020; Wenzel, Snoek, Tran & Jenatton, 2020).

**BatchEnsemble.** Member ``k`` of ``K`` (``ensemble_size``) uses the kernel ``W_k = W ⊙ (s_k r_kᵀ)``: a shared slow
weight ``W`` and rank-1 fast weights ``r_k`` (input scale) and ``s_k`` (output scale), plus a member bias ``b_k``.
Because the rank-1 factors only scale rows and columns, ``W_k`` is never formed (edward2 ``DenseBatchEnsemble``)::

    y = ((x ⊙ r_k) Wᵀ) ⊙ s_k + b_k                               (rank > 1: Σ_i over the rank factors)

**Member-major batches.** All members run in one call on a batch of ``K·N`` rows
``[member 0's N rows; member 1's N rows; …]`` = ``torch.cat([x] * K)`` (:func:`tile_members`); outputs are viewed as
``(K, N, …)`` with :func:`untile_members`. A row count that is not a multiple of ``K`` raises ``ValueError``.

**Hyper-batch ensembles** (edward2 ``DenseHyperBatchEnsemble``) add the STN response path of
:mod:`hyperlit.nn.stn`, with BatchEnsemble factors on both kernels, conditioned on each row's hypernetwork input
``λ̃_i`` through the bottleneck ``e = V λ̃_i = [e1, e2]``::

    y = BE(W, r, s)(x) + b_k + e1 ⊙ BE(W', u, v)(x) + e2 ⊙ b'_k            (tied: (u, v) = (r, s))

with the λ-dependent L2 penalty ``h_i (‖W + diag(e1_i) W'‖² + ‖b_k + e2_i ⊙ b'_k‖²)`` (UB
``regularize_fast_weights=False``), computed in closed form.

Pitfall (members that never diverge): with ``r = s = 1`` for every member (``fast_init="ones"``) the members differ
only by their biases — not at all after a conversion, which copies the plain bias into every member — and on tiled
identical data they then receive identical gradients and stay identical. The default ``fast_init="normal"`` draws
``r, s ~ N(1, fast_init_scale²)`` (UB WRN: 0.5 for BatchEnsemble, 0.75 for hyper-batch ensembles).

Fast weights (``r, s`` and the member biases) get no L2 in edward2/UB; :meth:`BatchEnsembleLayer.fast_parameters`
yields them so that an optimizer can give them their own group (LR multiplier, no weight decay).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from hyperlit.hparams import Hyperparameter
from hyperlit.nn.stn import StnDropout, StnLayer, StnNet, VInit, stn_context

__all__ = [
    "BatchEnsembleConv2d",
    "BatchEnsembleLayer",
    "BatchEnsembleLinear",
    "BatchEnsembleModel",
    "HyperBatchEnsembleConv2d",
    "HyperBatchEnsembleLayer",
    "HyperBatchEnsembleLinear",
    "HyperBatchEnsembleModel",
    "convert_to_batch_ensemble",
    "convert_to_hyper_batch_ensemble",
    "tile_members",
    "untile_members",
]

FastInit = Literal["normal", "random_sign", "ones"]
_FAST_NAMES = ("input_scale", "output_scale", "bias", "response_input_scale", "response_output_scale", "response_bias")


def tile_members(x: Tensor, ensemble_size: int) -> Tensor:
    """Member-major tiling: ``(N, …)`` → ``(K·N, …)`` = ``torch.cat([x] * K)`` (labels: ``y.repeat(K)``)."""
    if ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
    return x.repeat(ensemble_size, *[1] * (x.dim() - 1))


def untile_members(out: Tensor, ensemble_size: int) -> Tensor:
    """View member-major outputs ``(K·N, …)`` as ``(K, N, …)`` (a view; no copy when ``out`` is contiguous)."""
    _check_rows(out.shape[0], ensemble_size, "untile_members")
    return out.unflatten(0, (ensemble_size, out.shape[0] // ensemble_size))


def _check_rows(rows: int, k: int, who: str) -> int:
    if rows % k:
        raise ValueError(
            f"{who} got a batch of {rows} rows, which is not a multiple of ensemble_size={k}: feed K·N member-major "
            f"rows (tile the N examples with tile_members(x, {k}))"
        )
    return rows // k


def _check_fast_init(fast_init: str, scale: float) -> None:
    if fast_init not in ("normal", "random_sign", "ones"):
        raise ValueError(f"fast_init must be 'normal', 'random_sign' or 'ones', got {fast_init!r}")
    if fast_init == "random_sign" and not 0.0 <= scale <= 1.0:
        raise ValueError(f"fast_init='random_sign' needs fast_init_scale = P(+1) in [0, 1], got {scale}")
    if fast_init == "normal" and not scale >= 0.0:
        raise ValueError(f"fast_init='normal' needs fast_init_scale (the std) >= 0, got {scale}")


def _init_fast(t: Tensor, fast_init: str, scale: float, generator: torch.Generator | None) -> None:
    """``normal``: N(1, scale²); ``random_sign``: ±1 with P(+1) = scale (edward2 ``RandomSign``); ``ones``."""
    with torch.no_grad():
        if fast_init == "normal":
            nn.init.normal_(t, 1.0, scale, generator=generator)
        elif fast_init == "random_sign":
            p = torch.full(t.shape, scale, dtype=torch.float64)
            t.copy_(2.0 * torch.bernoulli(p, generator=generator) - 1.0)
        else:
            nn.init.ones_(t)


def _init_kernel(w: Tensor, generator: torch.Generator | None) -> None:
    """``nn.Linear`` / ``nn.Conv2d``'s kernel initialisation (Kaiming uniform, ``a = √5``)."""
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)


def _conv2d(
    x: Tensor, weight: Tensor, stride: Any, padding: Any, dilation: Any, groups: int, padding_mode: str
) -> Tensor:
    """``F.conv2d`` without bias; non-zero padding modes pad explicitly first (as :class:`~hyperlit.nn.stn.StnConv2d`)."""
    if padding_mode != "zeros":
        ph, pw = padding
        x = F.pad(x, (pw, pw, ph, ph), mode=padding_mode)
        return F.conv2d(x, weight, None, stride, 0, dilation, groups)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


class _ConvOptions:
    """Validation and storage of the ``nn.Conv2d`` options shared by the convolutional layers."""

    def _set_conv_options(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] | str,
        dilation: int | tuple[int, int],
        groups: int,
        padding_mode: str,
    ) -> tuple[int, ...]:
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        if padding_mode != "zeros" and isinstance(padding, str):
            raise ValueError("string padding with a non-zeros padding_mode is not supported")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        return (out_channels, in_channels // groups, *self.kernel_size)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return _conv2d(x, weight, self.stride, self.padding, self.dilation, self.groups, self.padding_mode)

    def _conv_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
        )

    def _input_scale_matrix(self, r: Tensor) -> Tensor:
        """Input-channel scales ``(…, C_in)`` laid out as the kernel's ``(…, C_out, C_in/groups)``."""
        g = self.groups
        per_group = r.unflatten(-1, (g, self.in_channels // g))  # (…, g, C_in/g)
        return per_group.repeat_interleave(self.out_channels // g, dim=-2)  # (…, C_out, C_in/g)


class BatchEnsembleLayer(nn.Module):
    """Base of the BatchEnsemble layers: the fast weights ``r, s``, member biases, initialisation, parameter groups.

    Parameters: ``weight`` (shared, slow), ``input_scale`` r ``(K, in)`` and ``output_scale`` s ``(K, out)``
    (``(rank, K, ·)`` when ``rank > 1``), ``bias`` ``(K, out)``.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _setup_fast(
        self, in_dim: int, out_dim: int, ensemble_size: int, bias: bool, rank: int, fast_init: str, scale: float
    ) -> None:
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        _check_fast_init(fast_init, scale)
        self.ensemble_size, self.rank = ensemble_size, rank
        self.fast_init, self.fast_init_scale = fast_init, scale
        lead = (ensemble_size,) if rank == 1 else (rank, ensemble_size)
        self.input_scale = nn.Parameter(torch.empty(*lead, in_dim))
        self.output_scale = nn.Parameter(torch.empty(*lead, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble_size, out_dim)) if bias else None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``W``: the plain layer's init; ``r, s`` per ``fast_init``; member biases: zeros (edward2)."""
        _init_kernel(self.weight, generator)
        _init_fast(self.input_scale, self.fast_init, self.fast_init_scale, generator)
        _init_fast(self.output_scale, self.fast_init, self.fast_init_scale, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """``r, s`` with a leading rank axis: ``(rank, K, in)``, ``(rank, K, out)``."""
        if self.rank == 1:
            return self.input_scale.unsqueeze(0), self.output_scale.unsqueeze(0)
        return self.input_scale, self.output_scale

    def fast_parameters(self) -> Iterator[nn.Parameter]:
        """The per-member fast weights ``r``, ``s`` and the member biases."""
        for p in (self.input_scale, self.output_scale, self.bias):
            if p is not None:
                yield p

    def slow_parameters(self) -> Iterator[nn.Parameter]:
        """The shared kernel ``W``."""
        yield self.weight

    def _check_member(self, k: int) -> None:
        if not 0 <= k < self.ensemble_size:
            raise IndexError(f"member {k} out of range for ensemble_size={self.ensemble_size}")


class BatchEnsembleLinear(BatchEnsembleLayer):
    """``nn.Linear`` with ``K`` rank-1 members ``W ⊙ (s_k r_kᵀ)`` (Wen et al. 2020, §3; edward2 ``DenseBatchEnsemble``).

    Args:
        in_features: Input size.
        out_features: Output size.
        ensemble_size: Number of members ``K``.
        bias: Learn a bias per member (``(K, out)``, zeros init).
        rank: Number of rank-1 terms per member (``r``, ``s`` get shape ``(rank, K, ·)``).
        fast_init: ``"normal"`` (N(1, scale²)), ``"random_sign"`` (±1, P(+1) = scale) or ``"ones"``.
        fast_init_scale: The std of ``"normal"`` or P(+1) of ``"random_sign"``.

    Input ``(K·N, *, in_features)`` member-major; ``weight`` has ``nn.Linear``'s name, shape and init.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ensemble_size: int,
        bias: bool = True,
        rank: int = 1,
        fast_init: FastInit = "normal",
        fast_init_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._setup_fast(in_features, out_features, ensemble_size, bias, rank, fast_init, fast_init_scale)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        k = self.ensemble_size
        n = _check_rows(x.shape[0], k, type(self).__name__)
        xv = x.unflatten(0, (k, n))  # (K, N, *, in)
        r, s = self._factors()
        shape = (r.shape[0], k, 1) + (1,) * (x.dim() - 2) + (-1,)
        if self.rank == 1:
            out = F.linear(xv * r.view(shape[1:]), self.weight) * s.view(shape[1:])
        else:  # one matmul over all rank terms, then Σ_i
            out = (F.linear(xv.unsqueeze(0) * r.view(shape), self.weight) * s.view(shape)).sum(0)
        if self.bias is not None:
            out = out + self.bias.view(shape[1:])
        return out.flatten(0, 1)

    def member_weight(self, k: int) -> Tensor:
        """The explicit kernel of member ``k``: ``Σ_i W ⊙ (s_{k,i} r_{k,i}ᵀ)`` (out, in) — for tests and export."""
        self._check_member(k)
        r, s = self._factors()
        return self.weight * torch.einsum("io,ij->oj", s[:, k], r[:, k])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, ensemble_size={self.ensemble_size}, "
            f"rank={self.rank}, bias={self.bias is not None}, fast_init={self.fast_init!r}"
        )


class BatchEnsembleConv2d(_ConvOptions, BatchEnsembleLayer):
    """``nn.Conv2d`` with ``K`` rank-1 members (edward2 ``Conv2DBatchEnsemble``).

    ``r`` scales input channels ``(K, C_in)``, ``s`` output channels ``(K, C_out)``, member bias ``(K, C_out)``, all
    broadcast over ``H×W``; one ``F.conv2d`` runs the whole ``K·N`` batch. Options as ``nn.Conv2d`` (stride, padding
    incl. ``"same"``, dilation, groups, padding modes) plus those of :class:`BatchEnsembleLinear`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ensemble_size: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        rank: int = 1,
        fast_init: FastInit = "normal",
        fast_init_scale: float = 0.5,
    ) -> None:
        super().__init__()
        shape = self._set_conv_options(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.weight = nn.Parameter(torch.empty(shape))
        self._setup_fast(in_channels, out_channels, ensemble_size, bias, rank, fast_init, fast_init_scale)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        k = self.ensemble_size
        n = _check_rows(x.shape[0], k, type(self).__name__)
        r, s = self._factors()
        rank = r.shape[0]
        xs = x.unflatten(0, (k, n)).unsqueeze(0) * r[:, :, None, :, None, None]  # (rank, K, N, C, H, W)
        out = self._conv(xs.flatten(0, 2), self.weight).unflatten(0, (rank, k, n))
        out = (out * s[:, :, None, :, None, None]).sum(0)  # (K, N, C_out, H', W')
        if self.bias is not None:
            out = out + self.bias[:, None, :, None, None]
        return out.flatten(0, 1)

    def member_weight(self, k: int) -> Tensor:
        """The explicit kernel of member ``k``: ``Σ_i W ⊙ (s_{k,i} r_{k,i}ᵀ)`` over channels, ``W``'s shape."""
        self._check_member(k)
        r, s = self._factors()
        scale = (s[:, k, :, None] * self._input_scale_matrix(r[:, k])).sum(0)  # (C_out, C_in/g)
        return self.weight * scale[:, :, None, None]

    def extra_repr(self) -> str:
        return (
            f"{self._conv_repr()}, ensemble_size={self.ensemble_size}, rank={self.rank}, "
            f"bias={self.bias is not None}, fast_init={self.fast_init!r}"
        )


# -- hyper-batch ensembles -------------------------------------------------------------------------------------------


class HyperBatchEnsembleLayer(StnLayer):
    """Base of the hyper-batch layers (an :class:`~hyperlit.nn.stn.StnLayer`): fast weights, init, the λ-dependent L2.

    Parameters: general ``weight`` W, ``input_scale`` r ``(K, in)``, ``output_scale`` s ``(K, out)``, ``bias`` b
    ``(K, out)``; response ``response_weight`` W', ``response_bias`` b' ``(K, out)``, ``hyper_bottleneck`` V and,
    untied, ``response_input_scale`` u / ``response_output_scale`` v.
    """

    weight: nn.Parameter
    response_weight: nn.Parameter
    bias: nn.Parameter | None
    response_bias: nn.Parameter | None
    _general_names = ("weight", "bias", "input_scale", "output_scale")
    _response_names = (
        "response_weight",
        "response_bias",
        "response_input_scale",
        "response_output_scale",
        "hyper_bottleneck",
    )

    def _setup(
        self,
        in_dim: int,
        out_dim: int,
        kernel_shape: tuple[int, ...],
        ensemble_size: int,
        bias: bool,
        tie_fast_weights: bool,
        fast_init: str,
        scale: float,
    ) -> None:
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        _check_fast_init(fast_init, scale)
        self.ensemble_size, self.tie_fast_weights = ensemble_size, tie_fast_weights
        self.fast_init, self.fast_init_scale = fast_init, scale
        k = ensemble_size
        self.weight = nn.Parameter(torch.empty(kernel_shape))
        self.response_weight = nn.Parameter(torch.empty(kernel_shape))
        self.input_scale = nn.Parameter(torch.empty(k, in_dim))
        self.output_scale = nn.Parameter(torch.empty(k, out_dim))
        self.response_input_scale = None if tie_fast_weights else nn.Parameter(torch.empty(k, in_dim))
        self.response_output_scale = None if tie_fast_weights else nn.Parameter(torch.empty(k, out_dim))
        self.bias = nn.Parameter(torch.empty(k, out_dim)) if bias else None
        self.response_bias = nn.Parameter(torch.empty(k, out_dim)) if bias else None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``W, W'``: the plain layer's init; fast weights per ``fast_init``; ``b, b'``: zeros; ``V`` per ``v_init``."""
        _init_kernel(self.weight, generator)
        _init_kernel(self.response_weight, generator)
        for p in (self.input_scale, self.output_scale, self.response_input_scale, self.response_output_scale):
            if p is not None:
                _init_fast(p, self.fast_init, self.fast_init_scale, generator)
        for b in (self.bias, self.response_bias):
            if b is not None:
                nn.init.zeros_(b)
        if self.v_init == "zero":
            nn.init.zeros_(self.hyper_bottleneck)
        else:
            nn.init.normal_(self.hyper_bottleneck, 0.0, self.v_std, generator=generator)

    def _response_factors(self) -> tuple[Tensor, Tensor]:
        if self.response_input_scale is None or self.response_output_scale is None:
            return self.input_scale, self.output_scale
        return self.response_input_scale, self.response_output_scale

    def fast_parameters(self) -> Iterator[nn.Parameter]:
        """``r, s`` (and ``u, v`` when untied) and the member biases ``b, b'``."""
        for name in _FAST_NAMES:
            p = getattr(self, name)
            if p is not None:
                yield p

    def _row_gates(self, hnet_input: Tensor | None, rows: int) -> tuple[Tensor, int]:
        """``e = V λ̃`` for every row (B, 2D or D) and ``N = B / K``."""
        n = _check_rows(rows, self.ensemble_size, type(self).__name__)
        e = self._gates(hnet_input, rows)
        return (e.expand(rows, -1) if e.shape[0] == 1 else e), n

    def kernel_sq_norm(self, hnet_input: Tensor | None = None) -> Tensor:
        """Per row ``‖W + diag(e1_i) W'‖²`` (B,), in closed form (Wenzel et al. 2020; UB ``regularize_fast_weights=False``).

        ``Σ‖W‖² + 2 Σ_d e1_d ⟨W_d, W'_d⟩ + Σ_d e1_d² ‖W'_d‖²`` with ``W_d`` the kernel of output unit ``d``; the
        per-row kernels are never formed.
        """
        rows = self._rows(hnet_input)
        e, _ = self._row_gates(hnet_input, rows)
        e1 = e[:, : self.out_dim]
        w, wr = self.weight.flatten(1), self.response_weight.flatten(1)
        cross, resp = (w * wr).sum(1), wr.square().sum(1)
        return w.square().sum() + 2.0 * (e1 @ cross) + e1.square() @ resp

    def bias_sq_norm(self, hnet_input: Tensor | None = None) -> Tensor:
        """Per row ``‖b_k + e2_i ⊙ b'_k‖²`` (B,) for the row's member ``k``; zeros for a layer without bias."""
        rows = self._rows(hnet_input)
        e, n = self._row_gates(hnet_input, rows)
        if self.bias is None or self.response_bias is None:
            return e.new_zeros(rows)
        e2 = e[:, self.out_dim :].unflatten(0, (self.ensemble_size, n))
        return (self.bias[:, None] + e2 * self.response_bias[:, None]).square().sum(-1).flatten()

    def _rows(self, hnet_input: Tensor | None) -> int:
        h = hnet_input if hnet_input is not None else self._hnet_context
        if h is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the hypernetwork input (B, {self.hdim}) to form its penalty"
            )
        return h.shape[0]


class HyperBatchEnsembleLinear(HyperBatchEnsembleLayer):
    """Hyper-batch-ensemble dense layer (Wenzel et al. 2020; edward2 ``DenseHyperBatchEnsemble``), an STN layer.

    ``y = ((x⊙r_k)Wᵀ)⊙s_k + b_k + e1 ⊙ ((x⊙u_k)W'ᵀ)⊙v_k + e2 ⊙ b'_k`` per row of member ``k`` with gates
    ``[e1, e2] = V λ̃_i``. With ``W' = 0, b' = 0`` (or ``V = 0``) it is the :class:`BatchEnsembleLinear` with the same
    ``W, r, s, b``.

    Args:
        in_features: Input size.
        out_features: Output size ``D``.
        ensemble_size: Number of members ``K``.
        hdim: Size of the hypernetwork input.
        bias: Member biases ``b`` and response biases ``b'`` (both ``(K, D)``, zeros init).
        tie_fast_weights: ``(u, v) := (r, s)`` (UB default); else own ``response_input_scale``/``response_output_scale``.
        fast_init: Initialisation of the fast weights (see :class:`BatchEnsembleLinear`).
        fast_init_scale: Its scale (UB hyper-batch WRN: N(1, 0.75²)).
        v_init: Initialisation of the bottleneck ``V`` (:class:`~hyperlit.nn.stn.StnLayer`).
        v_std: Std of ``V`` for ``v_init="normal"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ensemble_size: int,
        hdim: int,
        bias: bool = True,
        tie_fast_weights: bool = True,
        fast_init: FastInit = "normal",
        fast_init_scale: float = 0.75,
        v_init: VInit = "normal",
        v_std: float = 0.01,
    ) -> None:
        super().__init__(out_features, hdim, bias, v_init, v_std)
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        self._setup(in_features, out_features, shape, ensemble_size, bias, tie_fast_weights, fast_init, fast_init_scale)
        self.reset_parameters()

    def forward(self, x: Tensor, hnet_input: Tensor | None = None) -> Tensor:
        e, n = self._row_gates(hnet_input, x.shape[0])
        k, d = self.ensemble_size, self.out_features
        xv = x.unflatten(0, (k, n))  # (K, N, *, in)
        shape = (k, 1) + (1,) * (x.dim() - 2) + (-1,)
        gate_shape = (k, n) + (1,) * (x.dim() - 2) + (d,)
        r, s = self.input_scale.view(shape), self.output_scale.view(shape)
        xr = xv * r
        out = F.linear(xr, self.weight) * s
        if self.tie_fast_weights:
            resp = F.linear(xr, self.response_weight) * s
        else:
            u, v = (t.view(shape) for t in self._response_factors())
            resp = F.linear(xv * u, self.response_weight) * v
        out = torch.addcmul(out, resp, e[:, :d].reshape(gate_shape))
        if self.bias is not None and self.response_bias is not None:
            out = out + self.bias.view(shape)
            out = torch.addcmul(out, self.response_bias.view(shape), e[:, d:].reshape(gate_shape))
        return out.flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, ensemble_size={self.ensemble_size}, "
            f"hdim={self.hdim}, bias={self.bias is not None}, tie_fast_weights={self.tie_fast_weights}"
        )


class HyperBatchEnsembleConv2d(_ConvOptions, HyperBatchEnsembleLayer):
    """Hyper-batch-ensemble convolution (edward2 ``Conv2DHyperBatchEnsemble``): gates per output channel.

    Same formula as :class:`HyperBatchEnsembleLinear` with ``r, u`` scaling input channels, ``s, v, b, b'`` and the
    gates ``e1, e2`` acting per output channel (broadcast over ``H×W``); convolution options as ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ensemble_size: int,
        hdim: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        tie_fast_weights: bool = True,
        fast_init: FastInit = "normal",
        fast_init_scale: float = 0.75,
        v_init: VInit = "normal",
        v_std: float = 0.01,
    ) -> None:
        super().__init__(out_channels, hdim, bias, v_init, v_std)
        shape = self._set_conv_options(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self._setup(in_channels, out_channels, shape, ensemble_size, bias, tie_fast_weights, fast_init, fast_init_scale)
        self.reset_parameters()

    def forward(self, x: Tensor, hnet_input: Tensor | None = None) -> Tensor:
        e, n = self._row_gates(hnet_input, x.shape[0])
        k, d = self.ensemble_size, self.out_channels
        xv = x.unflatten(0, (k, n))  # (K, N, C, H, W)
        r, s = self.input_scale[:, None, :, None, None], self.output_scale[:, None, :, None, None]
        xr = (xv * r).flatten(0, 1)
        out = self._conv(xr, self.weight).unflatten(0, (k, n)) * s
        if self.tie_fast_weights:
            resp = self._conv(xr, self.response_weight).unflatten(0, (k, n)) * s
        else:
            u, v = (t[:, None, :, None, None] for t in self._response_factors())
            resp = self._conv((xv * u).flatten(0, 1), self.response_weight).unflatten(0, (k, n)) * v
        out = torch.addcmul(out, resp, e[:, :d].reshape(k, n, d, 1, 1))
        if self.bias is not None and self.response_bias is not None:
            offset = torch.addcmul(self.bias[:, None], self.response_bias[:, None], e[:, d:].reshape(k, n, d))
            out = out + offset[..., None, None]
        return out.flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"{self._conv_repr()}, ensemble_size={self.ensemble_size}, hdim={self.hdim}, "
            f"bias={self.bias is not None}, tie_fast_weights={self.tie_fast_weights}"
        )


# -- converters --------------------------------------------------------------------------------------------------------


def _check_paths(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Module]:
    names = dict(model.named_modules())
    for path in paths:
        if path not in names:
            raise KeyError(
                f"{path!r} is not a submodule of {type(model).__name__}; known: {sorted(n for n in names if n)}"
            )
    return names


def _replace_layers(net: nn.Module, skip: Sequence[str], make: Any) -> list[str]:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``net`` (in place) by ``make(path, child)``; the paths replaced."""
    replaced: list[str] = []

    def replace(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            path = f"{prefix}{child_name}"
            if path in skip:
                continue
            new = make(path, child)
            if new is None:
                replace(child, path + ".")
                continue
            new.train(child.training)
            setattr(parent, child_name, new)
            if type(child) in (nn.Linear, nn.Conv2d):
                replaced.append(path)

    replace(net, "")
    return replaced


def _conv_kwargs(child: nn.Conv2d) -> dict[str, Any]:
    return dict(
        in_channels=child.in_channels,
        out_channels=child.out_channels,
        kernel_size=child.kernel_size,
        stride=child.stride,
        padding=child.padding,
        dilation=child.dilation,
        groups=child.groups,
        bias=child.bias is not None,
        padding_mode=child.padding_mode,
    )


def _copy_plain(new: nn.Module, child: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic init from ``generator`` (on CPU), then ``W`` and the plain bias (every member row) copied."""
    new.reset_parameters(generator=generator)  # type: ignore[operator]
    new.to(device=child.weight.device, dtype=child.weight.dtype)  # type: ignore[arg-type]
    with torch.no_grad():
        new.weight.copy_(child.weight)  # type: ignore[operator]
        if child.bias is not None:
            new.bias.copy_(child.bias.expand_as(new.bias))  # type: ignore[operator,union-attr]
    return new


class BatchEnsembleModel(nn.Module):
    """A network converted by :func:`convert_to_batch_ensemble`: ``K`` members in one forward.

    Args:
        module: The converted network.
        ensemble_size: Number of members ``K``.
    """

    def __init__(self, module: nn.Module, ensemble_size: int) -> None:
        super().__init__()
        self.module = module
        self.ensemble_size = ensemble_size

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Outputs ``(K·N, …)`` for ``K·N`` member-major rows (see :func:`tile_members`)."""
        return self.module(x, **kwargs)

    def member_outputs(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Every member's outputs ``(K, N, …)`` for ``N`` examples (tiles, runs, untiles)."""
        return untile_members(self.module(tile_members(x, self.ensemble_size), **kwargs), self.ensemble_size)

    def batch_ensemble_layers(self) -> list[BatchEnsembleLinear | BatchEnsembleConv2d]:
        """The BatchEnsemble layers, in module order."""
        return [m for m in self.modules() if isinstance(m, (BatchEnsembleLinear, BatchEnsembleConv2d))]

    def fast_parameters(self) -> list[nn.Parameter]:
        """``r, s`` and member biases of every BatchEnsemble layer."""
        return [p for layer in self.batch_ensemble_layers() for p in layer.fast_parameters()]

    def slow_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: shared kernels, BatchNorm, plain (skipped) layers."""
        fast = {id(p) for p in self.fast_parameters()}
        return [p for p in self.parameters() if id(p) not in fast]


def convert_to_batch_ensemble(
    model: nn.Module,
    ensemble_size: int,
    skip: Sequence[str] = (),
    rank: int = 1,
    fast_init: FastInit = "normal",
    fast_init_scale: float = 0.5,
    seed: int = 0,
) -> BatchEnsembleModel:
    """Copy ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` replaced by a BatchEnsemble layer.

    Args:
        model: A plain network (left untouched).
        ensemble_size: Number of members ``K``.
        skip: Dotted names of Linear/Conv2d layers to keep plain (shared by all members).
        rank: Rank of each member's factors.
        fast_init: Initialisation of ``r, s`` (see :class:`BatchEnsembleLinear`).
        fast_init_scale: Its scale (UB WRN BatchEnsemble: N(1, 0.5²)).
        seed: Seed of the ``torch.Generator`` drawing ``r, s`` (deterministic conversion).

    Returns:
        A :class:`BatchEnsembleModel`; ``W`` is copied and the plain bias is copied into every member's bias, so with
        ``r = s = 1`` every member computes what ``model`` computes. Device and dtype are kept.
    """
    _check_paths(model, skip)
    _check_fast_init(fast_init, fast_init_scale)
    net = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    opts = dict(ensemble_size=ensemble_size, rank=rank, fast_init=fast_init, fast_init_scale=fast_init_scale)

    def make(path: str, child: nn.Module) -> nn.Module | None:
        if type(child) is nn.Linear:
            new: nn.Module = BatchEnsembleLinear(
                child.in_features, child.out_features, bias=child.bias is not None, **opts
            )
        elif type(child) is nn.Conv2d:
            new = BatchEnsembleConv2d(**_conv_kwargs(child), **opts)
        else:
            return None
        return _copy_plain(new, child, gen)

    _replace_layers(net, skip, make)
    return BatchEnsembleModel(net, ensemble_size)


class HyperBatchEnsembleModel(StnNet):
    """A network converted by :func:`convert_to_hyper_batch_ensemble`, run as an :class:`~hyperlit.nn.stn.StnNet`.

    ``forward(x, hnet_input, hparams, generator)`` on ``K·N`` member-major rows with one hypernetwork-input row per
    row (member ``k``'s λ on its block); :meth:`penalty` is the λ-dependent L2 of the replaced layers.

    Args:
        module: The converted network.
        hdim: Size of the hypernetwork input.
        ensemble_size: Number of members ``K``.
        l2_layers: Maps the dotted paths of penalised layers to their L2 hyperparameter names.
        hyperparameters: Default search space (L2 names, then dropout names).
        hdim_auto: ``hdim`` was derived from the names (so :class:`~hyperlit.tuning.stn.SelfTuningModule` may resize).
    """

    def __init__(
        self,
        module: nn.Module,
        hdim: int,
        ensemble_size: int,
        l2_layers: Mapping[str, str],
        hyperparameters: Sequence[Hyperparameter] = (),
        hdim_auto: bool = False,
    ) -> None:
        super().__init__()
        self.module = module
        self.hdim = hdim
        self._hdim_auto = hdim_auto
        self.ensemble_size = ensemble_size
        self.l2_layers = dict(l2_layers)
        self._defaults = list(hyperparameters)
        self.l2_fixed = {h.name: float(h.init) for h in self._defaults if h.name in set(self.l2_layers.values())}
        l2_names = tuple(dict.fromkeys(self.l2_layers.values()))
        drop = tuple(dict.fromkeys(m.hparam for m in module.modules() if isinstance(m, StnDropout)))
        self.hparam_names = l2_names + tuple(n for n in drop if n not in l2_names)
        self.penalty_scale = 1.0

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

    def penalty(self, hnet_input: Tensor, hparams: Mapping[str, Tensor]) -> Tensor:
        """Per-row λ-dependent L2 ``(B,)``: ``penalty_scale · Σ_layers h_i (‖W + diag(e1_i) W'‖² + ‖b_k + e2_i⊙b'_k‖²)``.

        ``h_i`` is the row's value of the layer's L2 hyperparameter (a name missing from ``hparams``, i.e. not tuned,
        uses its default ``init``). Keras convention ``c·Σw²`` (no ½); set ``penalty_scale`` to ``1/|train set|`` to
        divide by the training-set size as UB does.
        """
        modules = dict(self.module.named_modules())
        total = hnet_input.new_zeros(hnet_input.shape[0])
        for path, name in self.l2_layers.items():
            layer = modules[path]
            assert isinstance(layer, HyperBatchEnsembleLayer)
            h = hparams[name] if name in hparams else self.l2_fixed[name]
            sq = layer.kernel_sq_norm(hnet_input) + layer.bias_sq_norm(hnet_input)
            total = total + h * sq
        return self.penalty_scale * total

    def fast_parameters(self) -> list[nn.Parameter]:
        """Fast weights ``r, s`` (``u, v``) and member biases ``b, b'`` of every hyper-batch layer."""
        return [p for m in self.stn_layers() if isinstance(m, HyperBatchEnsembleLayer) for p in m.fast_parameters()]


def convert_to_hyper_batch_ensemble(
    model: nn.Module,
    ensemble_size: int,
    l2_hparams: Mapping[str, str] | None = None,
    dropout_hparams: Mapping[str, str] | None = None,
    hdim: int | None = None,
    skip: Sequence[str] = (),
    tie_fast_weights: bool = True,
    fast_init: FastInit = "normal",
    fast_init_scale: float = 0.75,
    v_init: VInit = "normal",
    v_std: float = 0.01,
    l2_range: tuple[float, float] = (0.1, 100.0),
    l2_init: float | None = None,
    seed: int = 0,
    dropout_range: tuple[float, float] = (0.0, 0.9),
) -> HyperBatchEnsembleModel:
    """Copy ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` replaced by a hyper-batch-ensemble layer.

    Args:
        model: A plain network (left untouched).
        ensemble_size: Number of members ``K``.
        l2_hparams: Maps dotted paths of replaced layers to L2 hyperparameter names (layers may share a name, as the
            UB WRN groups do); ``None``: one name per replaced layer, ``l2_<path with . → _>``. Replaced layers not
            listed get no penalty.
        dropout_hparams: ``nn.Dropout`` / ``nn.Dropout2d`` paths → names, as in :func:`~hyperlit.nn.stn.convert_to_stn`.
        hdim: Size of the hypernetwork input; default: the number of hyperparameter names.
        skip: Dotted names of Linear/Conv2d layers to keep plain.
        tie_fast_weights: ``(u, v) := (r, s)`` (UB default).
        fast_init: Initialisation of the fast weights.
        fast_init_scale: Its scale (UB hyper-batch WRN: N(1, 0.75²)).
        v_init: Initialisation of the bottlenecks ``V``.
        v_std: Std of ``V`` for ``v_init="normal"``.
        l2_range: The L2 range of UB (``[0.1, 100]``); sets the default initial L2 to its log-uniform mean
            ``(hi − lo) / ln(hi / lo)``.
        l2_init: Initial L2 value instead of that mean.
        seed: Seed of the generator drawing the new parameters (deterministic conversion).
        dropout_range: Range of the default dropout hyperparameters.

    Returns:
        A :class:`HyperBatchEnsembleModel`; ``W`` copied, the plain bias copied into every member bias, ``W'`` freshly
        initialised, ``b' = 0``. With ``W' = 0`` (or ``V = 0``) it computes the BatchEnsemble of the same ``W, r, s``.
    """
    dropout_hparams = dict(dropout_hparams or {})
    names = _check_paths(model, list(dropout_hparams) + list(skip) + list(l2_hparams or {}))
    for path in dropout_hparams:
        if type(names[path]) not in (nn.Dropout, nn.Dropout2d):
            raise TypeError(f"{path!r} is a {type(names[path]).__name__}, not nn.Dropout / nn.Dropout2d")
    replaceable = [
        p for p, m in names.items() if type(m) in (nn.Linear, nn.Conv2d) and not any(_within(p, s) for s in skip)
    ]
    if l2_hparams is None:
        l2_layers = {p: "l2_" + p.replace(".", "_") for p in replaceable}
    else:
        l2_layers = dict(l2_hparams)
        bad = [p for p in l2_layers if p not in replaceable]
        if bad:
            raise TypeError(f"l2_hparams names {bad}, which are not replaced nn.Linear / nn.Conv2d layers")
    _check_fast_init(fast_init, fast_init_scale)
    lo, hi = l2_range
    if not 0 < lo < hi:
        raise ValueError(f"l2_range must satisfy 0 < low < high, got {l2_range}")
    init = float(l2_init) if l2_init is not None else (hi - lo) / math.log(hi / lo)
    l2_names = list(dict.fromkeys(l2_layers.values()))
    drop_names = list(dict.fromkeys(dropout_hparams.values()))
    clash = sorted(set(l2_names) & set(drop_names))
    if clash:
        raise ValueError(f"names {clash} are used both for an L2 strength and a dropout rate")
    hnames = l2_names + drop_names
    hdim_auto = hdim is None
    if hdim is None:
        if not hnames:
            raise ValueError("pass hdim (the hypernetwork input size) or hyperparameters to tune (l2/dropout)")
        hdim = len(hnames)
    net = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    opts = dict(
        ensemble_size=ensemble_size,
        hdim=hdim,
        tie_fast_weights=tie_fast_weights,
        fast_init=fast_init,
        fast_init_scale=fast_init_scale,
        v_init=v_init,
        v_std=v_std,
    )

    def make(path: str, child: nn.Module) -> nn.Module | None:
        if type(child) is nn.Linear:
            new: nn.Module = HyperBatchEnsembleLinear(
                child.in_features, child.out_features, bias=child.bias is not None, **opts
            )
        elif type(child) is nn.Conv2d:
            new = HyperBatchEnsembleConv2d(**_conv_kwargs(child), **opts)
        elif path in dropout_hparams:
            return StnDropout(dropout_hparams[path], channelwise=type(child) is nn.Dropout2d, p=child.p)  # type: ignore[attr-defined]
        else:
            return None
        return _copy_plain(new, child, gen)

    _replace_layers(net, skip, make)
    defaults = [Hyperparameter(n, 0.0, math.inf, init=init, init_sigma=0.5, transform="log") for n in l2_names]
    dlo, dhi = dropout_range
    for name in drop_names:
        ps = [names[p].p for p, n in dropout_hparams.items() if n == name]  # type: ignore[attr-defined]
        p0 = min(max(float(ps[0]), dlo + 0.01 * (dhi - dlo)), dhi - 0.01 * (dhi - dlo))
        defaults.append(Hyperparameter(name, dlo, dhi, init=p0))
    return HyperBatchEnsembleModel(net, hdim, ensemble_size, l2_layers, defaults, hdim_auto=hdim_auto)


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")
