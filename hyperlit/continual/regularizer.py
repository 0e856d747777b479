"""The output regularizer of task-conditioned hypernetworks (von Oswald et al., ICLR 2020, Eq. 2), vectorized.

While task T is trained, the hypernetwork h(e, θ) is kept from changing its output for earlier tasks::

    R(θ) = 1/|S| · Σ_{t ∈ S} ‖ h(e^(t), θ*) − h(e^(t), θ + Δθ) ‖²₂ ,   S ⊆ {0, …, T−1}

where θ* is a snapshot taken before task T, Δθ an optional look-ahead (the update the optimizer would make from
the task loss alone, detached) and S all previous tasks or a seeded random subset of k of them. The squared norm
is a *sum* over all generated weights and the result is a *mean* over the regularized tasks, exactly as
``hypnettorch.utils.hnet_regularizer.calc_fix_target_reg``; the caller multiplies by β.

Unlike the reference implementation (one hypernetwork call per previous task in a Python loop), every
regularized task is generated in **one** batched call ``h(E_S, θ)`` of shape ``(|S|, P)`` (a chunked hypernetwork
batches ``|S|`` × #chunks rows): no Python loop, but the ``(|S|, P)`` weights, their difference to the targets and
their gradients are still formed, so the cost grows with ``|S|`` (at P = 2.1 M and 9 previous tasks this materialized
form measured slower than the reference's loop, ``examples/benchmarks/cl_regularizer_benchmark.py``).

**Gram form.** The hypernetwork's last layer is linear, h(e, θ) = W̃ φ̃(e, θ) per chunk (φ̃ the trunk's features
with a 1 appended, W̃ = [W | b]). With the snapshot's W̃*, φ̃* and D̃ = W̃ − W̃*, each chunk's difference is
``W̃ (φ̃ − φ̃*) + D̃ φ̃*`` = M z with M = [W̃ | D̃] and z = [φ̃ − φ̃*; φ̃*], so the whole sum is
``⟨MᵀM, Σ z zᵀ⟩``: two Gram matrices of size 2(h+1), no (k, P) tensor, a cost independent of the number of
regularized tasks (:func:`gram_regularization_loss`). Each of its three terms carries a small difference
(φ̃ − φ̃* or D̃), so no two large numbers are subtracted; it equals the materialized sum to rounding.

Targets h(e^(t), θ*) are either *stored* — a (T−1, P) tensor computed once per task boundary, (T−1)·P·4 bytes —
or computed *online* from a frozen copy of θ* and of the embeddings, ``|θ|`` + T·d floats, at the cost of one extra
no-grad hypernetwork call per step (:func:`stored_targets_bytes`, :func:`online_targets_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hyperlit.nn.hypernet import HyperNetwork

__all__ = [
    "ParameterSnapshot",
    "compute_targets",
    "gram_is_cheaper",
    "gram_regularization_loss",
    "hnet_features",
    "hnet_flat",
    "lookahead_delta",
    "online_targets_bytes",
    "output_regularizer",
    "regularization_loss",
    "sample_previous_tasks",
    "stored_targets_bytes",
]

Lookahead = Literal["none", "sgd", "adam"]
RegMethod = Literal["auto", "materialize", "gram"]

# Per output row, the Gram form costs ~(2(h+1))² multiply-adds and materializing ~k·C·(h+1) plus the (k, P)
# tensors' memory traffic: the Gram form is chosen from this many regularized rows k·C per feature h+1 on. At the
# PermutedMNIST-10 sizes (C = 28, h = 25) ``examples/benchmarks/cl_regularizer_benchmark.py --settings pm10`` has
# the materialized form faster at k = 1 (28 rows) and the Gram form faster at k = 3 (84 rows).
GRAM_ROWS_PER_FEATURE = 3


class _Flat(nn.Module):
    """Wraps a hypernetwork so that ``functional_call`` can evaluate its ``flat`` method with other parameters."""

    def __init__(self, hnet: HyperNetwork) -> None:
        super().__init__()
        self.hnet = hnet

    def forward(self, cond: Tensor) -> Tensor:
        return self.hnet.flat(cond)


def hnet_flat(hnet: HyperNetwork, cond: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Flat generated weights (K, P) for conditions (K, d), with the hypernet's parameters replaced by ``params``.

    ``params`` maps the hypernet's parameter names (as in ``hnet.named_parameters()``) to tensors, e.g. θ* or
    θ + Δθ; ``None`` uses the hypernet's own parameters.
    """
    if params is None:
        return hnet.flat(cond)
    own = {n for n, _ in hnet.named_parameters()}
    if set(params) != own:
        raise KeyError(
            f"params must name exactly the hypernet's parameters; missing {sorted(own - set(params))}, "
            f"unknown {sorted(set(params) - own)}"
        )
    return functional_call(_Flat(hnet), {f"hnet.{n}": p for n, p in params.items()}, (cond,))


def output_regularizer(pred: Tensor, targets: Tensor) -> Tensor:
    """Mean over tasks of the summed squared difference: ``((pred − targets)²).sum(−1).mean()`` for (k, P) inputs."""
    if pred.shape != targets.shape or pred.dim() != 2:
        raise ValueError(f"pred and targets must both be (k, P); got {tuple(pred.shape)} and {tuple(targets.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("no task to regularize (k = 0)")
    return (pred - targets).pow(2).sum(-1).mean()


def sample_previous_tasks(num_previous: int, k: int | None, generator: torch.Generator | None = None) -> Tensor:
    """Ids of the previous tasks to regularize this step: all of ``range(num_previous)``, or k of them at random.

    The subset is drawn without replacement from ``generator`` (CPU), so every process of a distributed run that
    holds an identically seeded generator draws the same subset. No random number is consumed when all previous
    tasks are regularized.
    """
    if num_previous < 1:
        raise ValueError(f"need at least one previous task, got num_previous={num_previous}")
    if k is not None and k < 1:
        raise ValueError(f"the number of regularized tasks k must be >= 1 or None (all), got {k}")
    if k is None or k >= num_previous:
        return torch.arange(num_previous)
    return torch.randperm(num_previous, generator=generator)[:k]


@torch.no_grad()
def compute_targets(hnet: HyperNetwork, embeddings: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Regularization targets h(e, θ*) (K, P): no gradient, hypernet in eval mode (as the reference does)."""
    was_training = hnet.training
    hnet.eval()
    try:
        return hnet_flat(hnet, embeddings.detach(), params).detach()
    finally:
        hnet.train(was_training)


def regularization_loss(
    hnet: HyperNetwork,
    embeddings: Tensor,
    targets: Tensor | None = None,
    theta_star: Mapping[str, Tensor] | None = None,
    target_embeddings: Tensor | None = None,
    delta: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Eq. 2 for the tasks whose embeddings are the rows of ``embeddings`` (k, d), in one hypernetwork call.

    Args:
        hnet: The hypernetwork with the current parameters θ.
        embeddings: Embeddings of the regularized tasks (detach them to keep old embeddings fixed).
        targets: Stored targets (k, P) of the same tasks; or ``None`` for online targets.
        theta_star: Online targets: the snapshot θ* (name → tensor).
        target_embeddings: Online targets: the embeddings the targets are computed from (default ``embeddings``).
        delta: Look-ahead Δθ (name → tensor, detached); the prediction uses θ + Δθ.
    """
    if (targets is None) == (theta_star is None):
        raise ValueError("give either stored targets or theta_star (online targets), not both or neither")
    if targets is None:
        emb = embeddings if target_embeddings is None else target_embeddings
        targets = compute_targets(hnet, emb, theta_star)
    params = None
    if delta is not None:
        params = {n: p + delta[n] for n, p in hnet.named_parameters()}
    return output_regularizer(hnet_flat(hnet, embeddings, params), targets)


def hnet_features(hnet: HyperNetwork, cond: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Inputs of the hypernetwork's output layer: ``(K, C, h)`` for conditions (K, d), C chunks (1 unchunked).

    ``params`` replaces the hypernetwork's parameters (names as in ``hnet.named_parameters()``), as in
    :func:`hnet_flat`.
    """
    p = dict(hnet.named_parameters()) if params is None else params
    if cond.dim() != 2 or cond.shape[-1] != hnet.cond_dim:
        raise ValueError(f"conditions must have shape (K, {hnet.cond_dim}), got {tuple(cond.shape)}")
    inp = cond.unsqueeze(1)
    if hnet.chunk_embeddings is not None:
        chunks = p["chunk_embeddings"].unsqueeze(0).expand(len(cond), -1, -1)
        inp = torch.cat([inp.expand(-1, hnet.num_chunks, -1), chunks], dim=-1)
    trunk = {n.removeprefix("trunk."): t for n, t in p.items() if n.startswith("trunk.")}
    return functional_call(hnet.trunk, trunk, (inp,))


def _augmented_head(params: Mapping[str, Tensor]) -> Tensor:
    """[W | b] of the output layer, (O, h + 1)."""
    return torch.cat([params["head.weight"], params["head.bias"].unsqueeze(1)], dim=1)


def gram_regularization_loss(
    hnet: HyperNetwork,
    embeddings: Tensor,
    theta_star: Mapping[str, Tensor],
    target_embeddings: Tensor | None = None,
    delta: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Eq. 2 with targets h(e*, θ*), in the Gram form of the module docstring (equal to
    :func:`regularization_loss` with the same targets, to rounding).

    Args:
        hnet: The hypernetwork with the current parameters θ.
        embeddings: Embeddings of the regularized tasks (k, d) (detach them to keep old embeddings fixed).
        theta_star: The snapshot θ* (name → tensor).
        target_embeddings: The embeddings the targets are computed from (default ``embeddings``).
        delta: Look-ahead Δθ (name → tensor, detached); the prediction uses θ + Δθ.
    """
    if len(embeddings) == 0:
        raise ValueError("no task to regularize (k = 0)")
    params = dict(hnet.named_parameters())
    if delta is not None:
        params = {n: p + delta[n] for n, p in params.items()}
    emb_star = embeddings if target_embeddings is None else target_embeddings
    with torch.no_grad():
        f_star = hnet_features(hnet, emb_star.detach(), theta_star)
    f = hnet_features(hnet, embeddings, params)
    ones = f.new_ones(*f.shape[:2], 1)
    f, f_star = torch.cat([f, ones], -1), torch.cat([f_star, ones], -1)
    z = torch.cat([f - f_star, f_star], dim=-1)  # (k, C, 2(h+1))
    w = _augmented_head(params)
    m = torch.cat([w, w - _augmented_head(theta_star)], dim=1)  # (O, 2(h+1))
    out = m.shape[0]
    used = hnet.num_target_params - (hnet.num_chunks - 1) * out  # outputs of the last chunk that are weights
    if used == out:
        zz = z.reshape(-1, z.shape[-1])
        return (m.T @ m * (zz.T @ zz)).sum() / len(embeddings)
    g_last = m[:used].T @ m[:used]
    g_all = g_last + m[used:].T @ m[used:]
    z_all = z[:, :-1].reshape(-1, z.shape[-1])
    z_last = z[:, -1]
    total = (g_all * (z_all.T @ z_all)).sum() + (g_last * (z_last.T @ z_last)).sum()
    return total / len(embeddings)


def gram_is_cheaper(hnet: HyperNetwork, k: int) -> bool:
    """Whether the Gram form beats materializing k tasks' weights: chunked hypernets with k·C ≥ 3(h+1) rows."""
    if hnet.chunk_embeddings is None:
        return False
    return k * hnet.num_chunks >= GRAM_ROWS_PER_FEATURE * (hnet.head.in_features + 1)


def stored_targets_bytes(num_previous: int, num_target_params: int, element_size: int = 4) -> int:
    """Memory of stored targets: one generated weight vector per previous task."""
    return num_previous * num_target_params * element_size


def online_targets_bytes(hnet: nn.Module, num_tasks: int, emb_dim: int, element_size: int = 4) -> int:
    """Memory of online targets: the snapshot θ* plus a copy of the task embeddings."""
    return (sum(p.numel() for p in hnet.parameters()) + num_tasks * emb_dim) * element_size


class ParameterSnapshot(nn.Module):
    """A frozen copy of a module's parameters, kept as (checkpointed) buffers: θ* for online targets."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._names = [n for n, _ in module.named_parameters()]
        for n, p in module.named_parameters():
            self.register_buffer(self._key(n), torch.zeros_like(p, requires_grad=False))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """Store the current parameters of ``module`` (same architecture as at construction)."""
        params = dict(module.named_parameters())
        for n in self._names:
            getattr(self, self._key(n)).copy_(params[n].detach())

    def as_dict(self) -> dict[str, Tensor]:
        """name → stored tensor, in the module's parameter names."""
        return {n: getattr(self, self._key(n)) for n in self._names}


@torch.no_grad()
def lookahead_delta(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], kind: Lookahead
) -> list[Tensor] | None:
    """The update Δθ the optimizer would apply to ``params`` from their current ``.grad`` (state unchanged).

    ``sgd``: −lr·g (HCL's ``use_sgd_change``). ``adam``: the step ``torch.optim.Adam`` would take from a copy of
    its moments, −lr/(1−β1^k) · m_k / (√v_k/√(1−β2^k) + ε) (HCL ``calc_delta_theta``; L2 weight decay is folded
    into g as Adam does). ``none`` returns ``None``. Parameters without a gradient get a zero update.
    """
    if kind == "none":
        return None
    if kind not in ("sgd", "adam"):
        raise ValueError(f"lookahead must be 'none', 'sgd' or 'adam', got {kind!r}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    deltas: list[Tensor] = []
    for p in params:
        if id(p) not in group_of:
            raise KeyError("a look-ahead parameter is not managed by the optimizer")
        group = group_of[id(p)]
        if p.grad is None:
            deltas.append(torch.zeros_like(p))
            continue
        g = p.grad.detach()
        lr = float(group["lr"])
        if kind == "sgd":
            deltas.append(-lr * g)
            continue
        if group.get("amsgrad", False) or group.get("maximize", False) or "betas" not in group:
            raise ValueError("the adam look-ahead needs a plain torch.optim.Adam (no amsgrad, no maximize)")
        beta1, beta2 = group["betas"]
        if group.get("weight_decay", 0.0):
            g = g + group["weight_decay"] * p.detach()
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1.0 if "step" in state else 1.0
        m = state["exp_avg"] * beta1 + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
        v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if "exp_avg_sq" in state else (1 - beta2) * g * g
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = v.sqrt() / bias2**0.5 + group["eps"]
        deltas.append(-(lr / bias1) * m / denom)
    return deltas
