"""Elastic weight consolidation (Kirkpatrick et al. 2017; online EWC, Schwarz et al. 2018) — Lightning-free math.

Penalty while training task T:  λ/2 · Σ_i F_i (θ_i − θ*_i)²  with θ* the parameters after task T−1 and the
online Fisher ``F ← γ F + F_{T−1}``. The diagonal empirical Fisher F_t is the mean over examples of the squared
per-example gradient of the task loss, computed for a whole batch at once with ``torch.func.vmap(grad(...))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["ewc_penalty", "per_example_grad_sq"]


def per_example_grad_sq(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Mean over the batch of the squared per-example gradients of ``loss_fn(model(x_i), y_i)`` w.r.t. ``params``.

    Run the model in eval mode when it has norm layers or dropout: one example has no batch statistics, and
    ``vmap`` refuses in-place updates of running statistics and random draws.

    Args:
        model: The network (``params`` replace its parameters of the same name).
        params: name → tensor of the parameters to differentiate (detached copies are used).
        loss_fn: Loss of one example: ``loss_fn(output (1, …), target (1, …))`` → scalar.
        x: Inputs (B, …).
        y: Targets (B, …).
        buffers: name → tensor of buffers to use instead of the model's own (e.g. one task's norm statistics);
            not differentiated.
    """
    detached = {n: p.detach() for n, p in params.items()}
    fixed = dict(buffers or {})

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),), strict=False)
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, x, y)
    return {n: g.pow(2).mean(0) for n, g in grads.items()}


def ewc_penalty(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """½ Σ F (θ − θ*)² summed over all named tensors (multiply by λ)."""
    missing = set(params) - set(anchor) | set(params) - set(fisher)
    if missing:
        raise KeyError(f"no anchor/Fisher for parameters {sorted(missing)}")
    terms = [(fisher[n] * (p - anchor[n]).pow(2)).sum() for n, p in params.items()]
    return 0.5 * torch.stack(terms).sum()
