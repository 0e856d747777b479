"""Greedy ensemble selection (known answers, loop oracle, objectives) and the log-uniform random-search sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hyperlit.ensembles.selection import greedy_selection, sample_log_uniform

torch.set_num_threads(1)


def _binary_pool(p_correct: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool of two-class models from each model's probability of the (always 0) label."""
    p = torch.tensor(p_correct, dtype=torch.float64)
    return torch.stack([p, 1 - p], -1).log(), torch.zeros(p.shape[1], dtype=torch.long)


def _greedy_oracle(log_probs: np.ndarray, y: np.ndarray, k: int, objective: str) -> list[int]:
    """uncertainty-baselines' greedy_selection, literally: a Python loop over rounds and candidates."""
    probs = np.exp(log_probs - log_probs.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    ens: list[int] = []
    best_objective = np.inf
    while len(set(ens)) < k:
        best_model = None
        for m in range(len(probs)):
            pbar = probs[[*ens, m]].mean(0)
            nll = -np.mean(np.log(pbar[np.arange(len(y)), y]))
            acc = np.mean(pbar.argmax(1) == y)
            obj = {"nll": nll, "acc": 1.0 - acc, "nll-acc": nll - acc}[objective]
            if obj < best_objective:
                best_objective, best_model = obj, m
        if best_model is None:
            break
        ens.append(best_model)
    return ens


def test_dominant_model_is_returned_alone() -> None:
    lp, y = _binary_pool([[0.6, 0.7, 0.6], [0.999, 0.999, 0.999], [0.5, 0.8, 0.3]])
    assert greedy_selection(lp, y, 3) == [1]  # adding anything (itself included) does not lower the NLL


def test_duplicates_allowed_and_stop_when_no_gain() -> None:
    # B alone 0.465; B + A 0.427; B + A + B 0.410; then every addition is worse (computed in the test below)
    lp, y = _binary_pool([[0.99, 0.99, 0.01], [0.5, 0.5, 0.99], [0.05, 0.05, 0.05]])
    sel = greedy_selection(lp, y, 3)
    assert sel == [1, 0, 1]
    assert len(set(sel)) == 2 < 3  # stopped by "no gain", not by the size
    p = lp.exp()[:, :, 0]
    nll = {tuple(s): -p[s].mean(0).log().mean().item() for s in ([1], [1, 0], [1, 0, 1], [1, 0, 1, 1], [1, 0, 1, 0])}
    assert nll[(1,)] > nll[(1, 0)] > nll[(1, 0, 1)]
    assert min(nll[(1, 0, 1, 1)], nll[(1, 0, 1, 0)]) > nll[(1, 0, 1)]
    assert greedy_selection(lp, y, 2) == [1, 0]  # stopped by the size: 2 distinct members
    assert greedy_selection(lp, y, 1) == [1]
    assert greedy_selection(lp, y, 3, max_rounds=2) == [1, 0]


@pytest.mark.parametrize("objective", ["nll", "acc", "nll-acc"])
def test_vectorised_rounds_equal_candidate_loop(objective: str) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        m, n, c = 12, 60, 4
        y = torch.randint(0, c, (n,), generator=g)
        logits = 1.5 * torch.randn(m, n, c, generator=g, dtype=torch.float64)
        logits[torch.arange(m).unsqueeze(1), torch.arange(n), y] += torch.rand(m, 1, generator=g, dtype=torch.float64)
        lp = torch.log_softmax(logits, -1)
        for k in (1, 3, 5):
            sel = greedy_selection(lp, y, k, objective=objective)
            assert sel == _greedy_oracle(lp.numpy(), y.numpy(), k, objective), (trial, k)
            assert 1 <= len(set(sel)) <= k
        # logits are accepted too: normalised with log_softmax
        assert greedy_selection(logits, y, 3, objective=objective) == greedy_selection(lp, y, 3, objective=objective)


def test_acc_objective_maximises_accuracy() -> None:
    # model 0: best NLL (never badly wrong) but lower accuracy; model 1: higher accuracy, one confident mistake
    lp, y = _binary_pool([[0.45, 0.45, 0.9, 0.9], [0.6, 0.6, 0.6, 0.001]])
    assert greedy_selection(lp, y, 1, objective="nll") == [0]
    assert greedy_selection(lp, y, 1, objective="acc") == [1]  # 3/4 correct vs 2/4
    assert greedy_selection(lp, y, 2, objective="acc") == [1]  # no candidate raises the accuracy further


def test_greedy_bad_input() -> None:
    lp, y = _binary_pool([[0.6, 0.7], [0.5, 0.8]])
    with pytest.raises(ValueError, match="objective must be"):
        greedy_selection(lp, y, 2, objective="ece")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(M, N, C\)"):
        greedy_selection(lp[0], y, 2)
    with pytest.raises(ValueError, match=r"labels of shape \(N,\) = \(2,\)"):
        greedy_selection(lp, y[:1], 2)
    with pytest.raises(ValueError, match="ensemble_size must be >= 1"):
        greedy_selection(lp, y, 0)


def test_sample_log_uniform_range_distribution_and_determinism() -> None:
    ranges = {"l2": (1e-2 / 47500, 1e2 / 47500), "smooth": (1e-5, 0.2), "fixed": (0.3, 0.3)}
    a = sample_log_uniform(ranges, 4000, seed=3)
    b = sample_log_uniform(ranges, 4000, seed=3)
    c = sample_log_uniform(ranges, 4000, seed=4)
    assert set(a) == set(ranges)
    for name, (lo, hi) in ranges.items():
        assert a[name].shape == (4000,) and a[name].dtype == torch.float64
        assert torch.equal(a[name], b[name])
        assert ((a[name] >= lo) & (a[name] <= hi)).all()
    assert not torch.equal(a["l2"], c["l2"])
    assert torch.all(a["fixed"] == 0.3)
    for name in ("l2", "smooth"):
        lo, hi = ranges[name]
        t = (a[name].log() - math.log(lo)) / (math.log(hi) - math.log(lo))  # uniform on [0, 1] if log-uniform
        hist = torch.histc(t, bins=10, min=0.0, max=1.0)
        assert (hist - 400).abs().max() < 80  # each decile ≈ 400 of 4000
        assert t.mean().item() == pytest.approx(0.5, abs=0.02)
    # a name's draws do not depend on the names after it
    first = sample_log_uniform({"l2": ranges["l2"]}, 4000, seed=3)
    assert torch.equal(first["l2"], a["l2"])
    with pytest.raises(ValueError, match="0 < low <= high"):
        sample_log_uniform({"x": (0.0, 1.0)}, 3, seed=0)
    with pytest.raises(ValueError, match="0 < low <= high"):
        sample_log_uniform({"x": (2.0, 1.0)}, 3, seed=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_log_uniform({"x": (1.0, 2.0)}, 0, seed=0)
