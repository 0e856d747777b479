"""Elastic weight consolidation (Kirkpatrick et al. 2017; online EWC, Schwarz et al. 2018) — Lightning-free math.

Penalty while training task T:  λ/2 · Σ_i F_i (θ_i − θ*_i)²  with θ* the parameters after task T−1 and the
online Fisher ``F ← γ F + F_{T−1}``. The diagonal empirical Fisher F_t is the mean over examples of the squared
per-example gradient of the task loss, computed for a whole batch at once: for networks made of ``nn.Linear``
layers from each layer's inputs and output gradients (one forward and one backward pass), otherwise with
``torch.func.vmap(grad(...))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from typing_extensions import override

__all__ = ["ewc_penalty", "per_example_grad_sq"]


def per_example_grad_sq(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
    *,
    method: Literal["auto", "linear", "vmap"] = "auto",
) -> dict[str, Tensor]:
    """Mean over the batch of the squared per-example gradients of ``loss_fn(model(x_i), y_i)`` w.r.t. ``params``.

    Two exact ways to compute it:

    * ``"linear"`` — when every tensor of ``params`` is the weight or bias of an ``nn.Linear`` applied once per
      example (one call in the forward pass, input ``(B, in)``, the tensor used nowhere else): one batched forward
      and one backward of the summed per-example losses give each layer's inputs ``a`` ``(B, in)`` and output
      gradients ``g`` ``(B, out)``, and ``mean_i (∂ℓ_i/∂W)² = (g²)ᵀ a² / B``, ``mean_i (∂ℓ_i/∂b)² = mean_i g_i²``
      (Goodfellow 2015), without per-example gradient tensors. The uses of the tensors are checked while the forward
      runs (a layer called twice, shared weights, inputs of more than two dimensions, any other operation on a
      parameter: not applicable). The network must treat the examples of a batch independently, as the one-example
      calls of ``"vmap"`` do (dropout in training mode and BatchNorm with batch statistics are refused).
    * ``"vmap"`` — ``torch.func.vmap(grad(...))`` over the examples: any network, with ``B`` per-example
      gradients in memory.

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
        method: ``"auto"`` (``"linear"`` where it applies, else ``"vmap"``), ``"linear"`` (raise
            ``ValueError`` naming the reason where it does not apply) or ``"vmap"``.
    """
    if method not in ("auto", "linear", "vmap"):
        raise ValueError(f"method must be 'auto', 'linear' or 'vmap', got {method!r}")
    detached = {n: p.detach() for n, p in params.items()}
    fixed = dict(buffers or {})
    if method != "vmap":
        result = _linear_grad_sq(model, detached, loss_fn, x, y, fixed)
        if isinstance(result, dict):
            return result
        if method == "linear":
            raise ValueError(f"method='linear' does not apply: {result}; use method='auto' or 'vmap'")
    return _vmap_grad_sq(model, detached, loss_fn, x, y, fixed)


def _vmap_grad_sq(
    model: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    fixed: dict[str, Tensor],
) -> dict[str, Tensor]:
    """The ``vmap(grad(...))`` path of :func:`per_example_grad_sq` (``B`` per-example gradients)."""

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),), strict=False)
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g.pow(2).mean(0) for n, g in grads.items()}


class _LinearUses(TorchFunctionMode):
    """Records the ``F.linear`` calls on the tracked tensors (input, output, weight/bias names) during a forward.

    Any other operation that takes a tracked tensor and returns tensors (not metadata such as ``.shape``), a tensor
    used twice, or a ``linear`` input that is not ``(B, in)`` sets :attr:`reason` (the fast path does not apply).
    """

    def __init__(self, tracked: dict[str, Tensor], batch: int) -> None:
        super().__init__()
        self.names = {id(t): n for n, t in tracked.items()}
        self.batch = batch
        self.calls: list[tuple[Tensor, Tensor, str | None, str | None]] = []
        self.seen: set[str] = set()
        self.reason: str | None = None

    @override
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        hit = [self.names[id(t)] for t in leaves if isinstance(t, Tensor) and id(t) in self.names]
        if not hit or self.reason is not None:
            return out
        if not any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            return out  # metadata (size, dtype, …)
        name = getattr(func, "__name__", repr(func))
        if func is not F.linear:
            self.reason = f"parameter {hit[0]!r} is used by {name!r}, not only by an nn.Linear"
            return out
        twice = [n for i, n in enumerate(hit) if n in self.seen or n in hit[:i]]
        if twice:
            self.reason = f"parameter {twice[0]!r} is used more than once in a forward pass (shared weights)"
            return out
        self.seen.update(hit)
        inp = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        names = (self.names.get(id(weight)), self.names.get(id(bias)) if bias is not None else None)
        other = sorted(set(hit) - set(names))
        if other:
            self.reason = f"parameter {other[0]!r} is used by 'linear' as its input, not as its weight or bias"
            return out
        if inp.dim() != 2 or inp.shape[0] != self.batch:
            self.reason = (
                f"the linear layer of {hit[0]!r} gets input {tuple(inp.shape)}, not (B={self.batch}, in) "
                f"(applied at several positions per example)"
            )
            return out
        # copies: a later in-place operation (ReLU(inplace=True), x += …) must change neither a nor the z we
        # differentiate with respect to; the network continues with a clone of z
        self.calls.append((inp.detach().clone(), out, *names))
        return out.clone()


def _linear_grad_sq(
    model: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    fixed: dict[str, Tensor],
) -> dict[str, Tensor] | str:
    """The ``nn.Linear`` path of :func:`per_example_grad_sq`; where it does not apply, the reason."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in params:
        owner, _, attr = name.rpartition(".")
        if attr not in ("weight", "bias") or owner not in linears:
            return f"parameter {name!r} is not the weight or bias of an nn.Linear"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"dropout {name!r} is in training mode (random per example)"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            return f"BatchNorm {name!r} uses batch statistics (examples are not independent)"
    tracked = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    uses = _LinearUses(tracked, len(x))
    with torch.enable_grad():
        with uses:
            out = functional_call(model, {**fixed, **tracked}, (x,), strict=False)
        if uses.reason is not None:
            return uses.reason
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != len(x):
            return "the network's output is not one tensor (B, …)"
        # the loss of one example, exactly as the vmap path computes it; summed, so each example's gradient is unscaled
        losses = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        outputs = [z for _, z, _, _ in uses.calls]
        if losses.requires_grad and outputs:
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        else:
            grads = (None,) * len(outputs)
    result = {n: torch.zeros_like(p) for n, p in params.items()}  # unused parameters: zero gradient
    for (a, _, weight, bias), g in zip(uses.calls, grads):
        if g is None:
            continue
        g2 = g.detach().pow(2)
        if weight is not None:
            result[weight] = g2.T.mm(a.pow(2)).div_(len(x))
        if bias is not None:
            result[bias] = g2.mean(0)
    return result


def ewc_penalty(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """½ Σ F (θ − θ*)² summed over all named tensors (multiply by λ)."""
    missing = set(params) - set(anchor) | set(params) - set(fisher)
    if missing:
        raise KeyError(f"no anchor/Fisher for parameters {sorted(missing)}")
    terms = [(fisher[n] * (p - anchor[n]).pow(2)).sum() for n, p in params.items()]
    return 0.5 * torch.stack(terms).sum()
