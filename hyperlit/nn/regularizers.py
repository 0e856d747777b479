"""Per-example regularizers as batched tensor ops (STN §4.3; official ``cnn/util/dropout.py``).

Each example ``b`` of a batch gets its own strength ``p_b`` (the constrained value of its perturbed
hyperparameter λ_b). Mask probabilities are **detached**: the training loss is never differentiated with respect to
the hyperparameters (STN trains them through the best-response path only), and no gradient flows through a mask.
Every random draw takes an explicit ``generator`` so that a run is reproducible and resumable.

Sections: dropout on activations · dropout on inputs · (sequence models: locked dropout, DropConnect, AR/TAR are
added below by the language-model helpers).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["channel_dropout", "input_dropout", "per_example_dropout", "per_example_rate"]


def per_example_rate(p: Tensor | float, x: Tensor, name: str = "p") -> Tensor:
    """Detached rates of shape (B,) on ``x``'s device/dtype, checked to lie in [0, 1] (NaN raises)."""
    rate = torch.as_tensor(p, dtype=x.dtype, device=x.device).detach()
    if rate.dim() == 0:
        rate = rate.expand(x.shape[0])
    if rate.dim() != 1 or rate.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0]},), got {tuple(rate.shape)}")
    if not bool(((rate >= 0) & (rate <= 1)).all()):  # also catches NaN
        raise ValueError(f"{name} must lie in [0, 1], got min {rate.min().item()} max {rate.max().item()}")
    # a saturated sigmoid can give exactly 1: keep a tiny keep-probability instead of dividing by zero
    return rate.clamp(max=1.0 - 1e-6).expand(x.shape[0])


def _masked(x: Tensor, keep: Tensor, mask_shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    keep_b = keep.view(-1, *([1] * (len(mask_shape) - 1)))
    u = torch.rand(mask_shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(u < keep_b, x / keep_b, torch.zeros((), dtype=x.dtype, device=x.device))


# -- dropout on activations -------------------------------------------------------------------------------------
def per_example_dropout(
    x: Tensor, p: Tensor | float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Inverted dropout with a drop rate ``p_b`` per example: ``x ⊙ Bernoulli(1 − p_b) / (1 − p_b)``.

    Args:
        x: (B, …) activations.
        p: Drop rates, scalar or (B,); detached.
        training: Identity when False.
        generator: Source of the Bernoulli draws.
    """
    if not training:
        return x
    keep = 1.0 - per_example_rate(p, x)
    return _masked(x, keep, tuple(x.shape), generator)


def channel_dropout(
    x: Tensor, p: Tensor | float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Per-example ``Dropout2d``: whole channels of example ``b`` are dropped with rate ``p_b``.

    Args:
        x: (B, C, …) feature maps.
        p: Drop rates, scalar or (B,); detached.
        training: Identity when False.
        generator: Source of the Bernoulli draws.
    """
    if not training:
        return x
    if x.dim() < 3:
        raise ValueError(f"channel_dropout needs (B, C, ...) inputs, got shape {tuple(x.shape)}")
    keep = 1.0 - per_example_rate(p, x)
    mask_shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    return _masked(x, keep, mask_shape, generator)


# -- dropout on inputs --------------------------------------------------------------------------------------------
def input_dropout(
    x: Tensor, p: Tensor | float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Input (pixel) dropout: each input element of example ``b`` is zeroed with rate ``p_b`` and the rest rescaled.

    The official CNN applies its activation ``dropout`` to the normalised image (``indropout``, range (0, 1)).
    """
    return per_example_dropout(x, p, training, generator)


# =====================================================================================================================
# LSTM language-model regularizers (STN PTB model; MacKay et al. 2019 §4.3 / official ``lstm/``, after AWD-LSTM,
# Merity et al. 2018). Section owned by the PTB language-model work (``hyperlit/nn/stn_lstm.py``,
# ``hyperlit/models/stn_lstm_lm.py``). Tensors are time-first: (T, B, D).
# =====================================================================================================================


def _batch_rate(p: Tensor | float, like: Tensor, name: str) -> Tensor:
    """One detached rate for the whole batch, checked like :func:`per_example_rate` (in [0, 1], NaN raises)."""
    rate = torch.as_tensor(p, dtype=like.dtype, device=like.device).detach()
    if rate.numel() != 1:
        raise ValueError(f"{name} takes one rate per batch, got shape {tuple(rate.shape)}")
    rate = rate.reshape(())
    if not bool((rate >= 0) & (rate <= 1)):  # also catches NaN
        raise ValueError(f"{name} rate must lie in [0, 1], got {rate.item()}")
    return rate.clamp(max=1.0 - 1e-6)


def locked_dropout(x: Tensor, p: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Variational ("locked") dropout: one Bernoulli mask per sequence and unit, shared by all time steps.

    Args:
        x: Activations (T, B, D).
        p: Drop rate, a scalar or one rate per sequence (B,) (STN's per-example dropouto/dropouti/dropouth);
            detached, so the mask carries no gradient to the rate.
        generator: Source of the mask.

    Returns:
        ``x ⊙ m / (1 − p_b)`` with ``m ~ Bernoulli(1 − p_b)`` of shape (1, B, D).
    """
    if x.dim() != 3:
        raise ValueError(f"locked_dropout expects (T, B, D) activations, got shape {tuple(x.shape)}")
    keep = 1.0 - per_example_rate(p, x[0], "locked dropout rate")
    return _masked(x.transpose(0, 1), keep, (x.size(1), 1, x.size(2)), generator).transpose(0, 1)


def embedding_dropout_mask(
    num_embeddings: int, p: Tensor | float, generator: torch.Generator | None = None, like: Tensor | None = None
) -> Tensor:
    """Embedding dropout (whole words): a scaled keep-mask over the rows of an embedding table, shape (V,).

    Multiplying the looked-up vectors of token ``w`` by ``mask[w]`` equals masking row ``w`` of the table(s), so
    every occurrence of a word in the batch is dropped together (one rate per batch: ``dropoute``).
    """
    like = like if like is not None else torch.empty(())
    keep = 1.0 - _batch_rate(p, like, "embedding dropout")
    ones = torch.ones(num_embeddings, dtype=like.dtype, device=like.device)
    return _masked(ones, keep.expand(1), (num_embeddings,), generator)


def dropconnect_mask(weight: Tensor, p: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """DropConnect (Wan et al. 2013) on a weight matrix: a scaled Bernoulli(1 − p) keep-mask of ``weight``'s shape.

    The STN LSTM applies the same mask to the elementary and the response hidden-to-hidden weights (one rate
    per batch: ``wdrop``), drawn once per forward pass, i.e. shared by all time steps of a BPTT window.
    """
    keep = 1.0 - _batch_rate(p, weight, "DropConnect")
    return _masked(torch.ones_like(weight), keep.expand(1), tuple(weight.shape), generator)


def activation_regularization(h: Tensor, alpha: Tensor | float) -> Tensor:
    """AR: ``α · mean(h²)`` over all entries of ``h`` (the dropped output of the last LSTM layer)."""
    return alpha * h.pow(2).mean()


def temporal_activation_regularization(h: Tensor, beta: Tensor | float) -> Tensor:
    """TAR (slowness): ``β · mean((h_t − h_{t−1})²)`` over time steps of ``h`` (T, B, D) (raw last-layer output)."""
    if h.size(0) < 2:
        return h.new_zeros(()) * beta
    return beta * (h[1:] - h[:-1]).pow(2).mean()


__all__ += [
    "activation_regularization",
    "dropconnect_mask",
    "embedding_dropout_mask",
    "locked_dropout",
    "temporal_activation_regularization",
]
