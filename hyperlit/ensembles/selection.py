"""Hyper-deep ensembles: random-search sampling and greedy ensemble selection (Wenzel et al. 2020).

The released procedure (uncertainty-baselines ``baselines/cifar/hyperdeepensemble.py``; ``reference/ensembles.md``
§3.1): train a pool of models with hyperparameters from a random search (L2 strengths log-uniform), then build the
ensemble greedily on the validation split — Caruana et al. 2004, *with replacement*: each round adds the pool
model that gives the candidate set the lowest objective, until ``ensemble_size`` distinct members are chosen or
no candidate beats the best objective so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["greedy_selection", "sample_log_uniform"]

Objective = Literal["nll", "acc", "nll-acc"]


def greedy_selection(
    member_log_probs: Tensor,
    labels: Tensor,
    ensemble_size: int,
    objective: Objective = "nll",
    max_rounds: int | None = None,
) -> list[int]:
    """Greedy ensemble selection with replacement (Caruana et al. 2004, as in uncertainty-baselines).

    Each round evaluates all ``M`` candidate sets ``S + [m]`` at once (vectorised over ``m``): the ensemble
    prediction is the mean of the members' probabilities, with repeated members counted with multiplicity.
    The round's best candidate (the lowest objective; the lowest index on ties) is added if its objective is
    strictly below the best objective so far (never reset between rounds); otherwise selection stops. It also
    stops once the list holds ``ensemble_size`` distinct models.

    Objectives (all minimised): ``"nll"`` = ensemble NLL on the validation split; ``"acc"`` = ensemble error
    ``1 − accuracy``; ``"nll-acc"`` = ``NLL − accuracy`` (uncertainty-baselines' definition). uncertainty-baselines'
    ``"acc"`` minimises the accuracy itself, which would pick the worst models; here it is the error. A round
    holds one ``(M, N, C)`` tensor of candidate log-probabilities (memory ``O(M·N·C)``).

    Args:
        member_log_probs: ``(M, N, C)`` log-probabilities of the ``M`` pool models on the validation split
            (logits work too: they are normalised with ``log_softmax``).
        labels: ``(N,)`` integer labels.
        ensemble_size: ``K``, the number of distinct members to stop at.
        objective: ``"nll"``, ``"acc"`` or ``"nll-acc"``.
        max_rounds: Optional cap on the number of rounds (members added, duplicates included); ``None`` runs
            until one of the two stopping rules above holds.

    Returns:
        The selected pool indices in the order they were added, duplicates included (a model chosen twice is
        weighted twice in the ensemble average).
    """
    if objective not in ("nll", "acc", "nll-acc"):
        raise ValueError(f"objective must be 'nll', 'acc' or 'nll-acc', got {objective!r}")
    if not isinstance(member_log_probs, Tensor) or member_log_probs.ndim != 3 or member_log_probs.shape[0] < 1:
        got = tuple(member_log_probs.shape) if isinstance(member_log_probs, Tensor) else type(member_log_probs)
        raise ValueError(f"expected pool log-probabilities of shape (M, N, C) with M >= 1, got {got}")
    if not member_log_probs.is_floating_point():
        raise ValueError(f"expected floating log-probabilities, got dtype {member_log_probs.dtype}")
    m, n, _ = member_log_probs.shape
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"expected integer labels of shape (N,) = ({n},) matching (M, N, C) log-probs, got {got}")
    if ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
    if max_rounds is not None and max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1 or None, got {max_rounds}")

    lp = F.log_softmax(member_log_probs.detach(), dim=-1)
    y = labels.to(lp.device).long()
    idx = y.view(1, n, 1).expand(m, n, 1)
    ens: list[int] = []
    total: Tensor | None = None  # logsumexp over the selected members' log-probabilities, (N, C)
    best_objective = math.inf
    while len(set(ens)) < ensemble_size and (max_rounds is None or len(ens) < max_rounds):
        size = len(ens) + 1
        cand = lp if total is None else torch.logaddexp(total.unsqueeze(0), lp)
        cand = cand - math.log(size)  # (M, N, C): log of each candidate set's mean probability
        nll = -cand.gather(2, idx).squeeze(2).mean(dim=1)
        acc = (cand.argmax(dim=-1) == y).to(lp.dtype).mean(dim=1)
        obj = nll if objective == "nll" else (1.0 - acc if objective == "acc" else nll - acc)
        best = int(torch.argmin(obj))
        value = float(obj[best])
        if not value < best_objective:
            break
        best_objective = value
        ens.append(best)
        total = lp[best] if total is None else torch.logaddexp(total, lp[best])
    return ens


def sample_log_uniform(ranges: Mapping[str, tuple[float, float]], n: int, seed: int) -> dict[str, Tensor]:
    """Random-search sampler: ``n`` values per name, log-uniform in ``[low, high]`` (hyper-deep ensembles §3.1).

    ``value = exp(log low + U·(log high − log low))``, ``U ~ U[0, 1)``, drawn name by name (in the mapping's
    order) from one generator seeded by ``seed``, so the same call gives the same values.

    Args:
        ranges: Name → ``(low, high)`` with ``0 < low <= high`` (``low == high`` gives a constant).
        n: Number of configurations.
        seed: Seed of the generator.

    Returns:
        Name → float64 tensor of shape ``(n,)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for name, bounds in ranges.items():
        if len(bounds) != 2:
            raise ValueError(f"range of {name!r} must be a (low, high) pair, got {bounds!r}")
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"range of {name!r} must satisfy 0 < low <= high (log-uniform), got ({low}, {high})")
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, Tensor] = {}
    for name, (low, high) in ranges.items():
        lo, hi = math.log(low), math.log(high)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        out[name] = torch.exp(lo + (hi - lo) * u).clamp(low, high)
    return out
