"""Ensemble metrics: functional math vs per-member numpy loops, known values, K=1, whole-split accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from hyperlit.ensembles.metrics import (
    EnsembleAccuracy,
    EnsembleBrierScore,
    EnsembleCalibrationError,
    EnsembleNLL,
    GibbsNLL,
    MemberDisagreement,
    MemberNLL,
    brier_score,
    ensemble_log_probs,
    ensemble_metrics,
    ensemble_nll,
    gibbs_nll,
    member_disagreement,
    member_nll,
)

torch.set_num_threads(1)


def _data(k: int = 4, n: int = 50, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(k, n, c, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ece_reference(probs: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """Reference §5: equal-width bins of the max probability, values clamped into the first/last bin."""
    conf, pred = probs.max(1), probs.argmax(1)
    bins = np.clip(np.floor(conf * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.sum() / len(y) * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return ece


def test_functional_matches_per_member_loops() -> None:
    z, y = _data()
    zn, yn = z.numpy(), y.numpy()
    k, n, _ = zn.shape
    p = np.stack([_softmax(zn[i]) for i in range(k)])  # (K, N, C)
    pbar = p.mean(0)
    np.testing.assert_allclose(ensemble_log_probs(z).numpy(), np.log(pbar), rtol=1e-10)
    np.testing.assert_allclose(ensemble_nll(z, y).numpy(), -np.log(pbar[np.arange(n), yn]), rtol=1e-10)
    gibbs = np.mean([-np.log(p[i, np.arange(n), yn]) for i in range(k)], axis=0)
    np.testing.assert_allclose(gibbs_nll(z, y).numpy(), gibbs, rtol=1e-10)
    members = [np.mean(-np.log(p[i, np.arange(n), yn])) for i in range(k)]
    np.testing.assert_allclose(member_nll(z, y).numpy(), members, rtol=1e-10)
    brier = [sum((pbar[j, c] - (c == yn[j])) ** 2 for c in range(pbar.shape[1])) for j in range(n)]
    np.testing.assert_allclose(brier_score(torch.from_numpy(pbar), y).numpy(), brier, rtol=1e-10)
    pred = zn.argmax(-1)
    dis = [sum(pred[a, j] != pred[b, j] for a in range(k) for b in range(k)) / k**2 for j in range(n)]
    np.testing.assert_allclose(member_disagreement(z).numpy(), dis)
    assert member_disagreement(z).max() > 0


def test_ensemble_nll_below_gibbs_nll_jensen() -> None:
    for seed in range(5):
        z, y = _data(k=3, n=40, c=7, seed=seed)
        assert (ensemble_nll(z, y) <= gibbs_nll(z, y) + 1e-12).all()
        torch.testing.assert_close(
            ensemble_nll(z, y), -torch.log(F.softmax(z, -1).mean(0)[torch.arange(40), y]), rtol=1e-10, atol=0
        )
    same = torch.randn(1, 10, 4, dtype=torch.float64).expand(3, -1, -1)  # identical members: equality
    yy = torch.randint(0, 4, (10,))
    torch.testing.assert_close(ensemble_nll(same, yy), gibbs_nll(same, yy))


def test_brier_known_value() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    # (0.3² + 0.2² + 0.1²) = 0.14; (0.5² + 0.5² + 1²) = 1.5
    torch.testing.assert_close(brier_score(probs, y), torch.tensor([0.14, 1.5]))
    m = EnsembleBrierScore()
    m.update(torch.log(probs.clamp_min(1e-30)).unsqueeze(0), y)
    assert m.compute().item() == pytest.approx(0.82, abs=1e-6)


def test_ece_hand_made_two_bins() -> None:
    # 2 bins [0, 0.5) and [0.5, 1]; 3 classes so that a confidence below 0.5 exists
    probs = torch.tensor(
        [
            [0.4, 0.3, 0.3],  # conf 0.4, pred 0, y 0: correct  -> bin 0
            [0.4, 0.35, 0.25],  # conf 0.4, pred 0, y 1: wrong  -> bin 0
            [0.9, 0.05, 0.05],  # conf 0.9, pred 0, y 0: correct -> bin 1
            [0.05, 0.9, 0.05],  # conf 0.9, pred 1, y 1: correct -> bin 1
        ]
    )
    y = torch.tensor([0, 1, 0, 1])
    # bin 0: |0.5 − 0.4| · 2/4 = 0.05; bin 1: |1.0 − 0.9| · 2/4 = 0.05 → ECE 0.1
    m = EnsembleCalibrationError(num_classes=3, n_bins=2)
    m.update(torch.log(probs).unsqueeze(0), y)
    assert m.compute().item() == pytest.approx(0.1, abs=1e-6)
    assert _ece_reference(probs.numpy(), y.numpy(), 2) == pytest.approx(0.1, abs=1e-6)


def test_ece_matches_reference_definition_and_clamps_confidence_one() -> None:
    z, y = _data(k=3, n=400, c=10, seed=3)
    z = z.float()
    z[:, :40] = 0.0
    z[:, :40, 0] = 200.0  # saturated: mean probability exactly 1.0 in float32, all wrong (overconfident)
    z[:, 40:60] = 0.0
    z[:, 40:60, 0] = 5.0  # confidence ≈ 0.94 (the last of 15 bins), all correct (underconfident)
    y = y.clone()
    y[:40], y[40:60] = 1, 0
    probs = F.softmax(z, -1).mean(0)
    assert (probs.max(1).values == 1.0).sum() == 40
    ref = _ece_reference(probs.double().numpy(), y.numpy(), 15)
    m = EnsembleCalibrationError(num_classes=10)
    m.update(z, y)
    assert m.compute().item() == pytest.approx(ref, abs=1e-5)
    # torchmetrics alone puts confidence 1.0 into a 16th bin of its own: a different number here
    plain = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    plain.update(probs, y)
    assert abs(plain.compute().item() - ref) > 1e-3
    # without saturated rows the two agree (it is torchmetrics' own binning)
    z2, y2 = _data(k=3, n=400, c=10, seed=4)
    m2 = EnsembleCalibrationError(num_classes=10)
    m2.update(z2.float(), y2)
    plain2 = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    plain2.update(F.softmax(z2.float(), -1).mean(0), y2)
    torch.testing.assert_close(m2.compute(), plain2.compute())
    ref2 = _ece_reference(F.softmax(z2, -1).mean(0).numpy(), y2.numpy(), 15)
    assert m2.compute().item() == pytest.approx(ref2, abs=1e-5)


def test_single_member_reduces_to_single_model() -> None:
    z, y = _data(k=1, n=60, c=6, seed=5)
    torch.testing.assert_close(ensemble_nll(z, y), F.cross_entropy(z[0], y, reduction="none"))
    torch.testing.assert_close(gibbs_nll(z, y), F.cross_entropy(z[0], y, reduction="none"))
    nll = EnsembleNLL()
    nll.update(z, y)
    assert nll.compute().item() == pytest.approx(F.cross_entropy(z[0], y).item(), rel=1e-6)
    acc = EnsembleAccuracy(num_classes=6)
    acc.update(z.float(), y)
    ref = MulticlassAccuracy(num_classes=6, average="micro")
    ref.update(z[0].float(), y)
    torch.testing.assert_close(acc.compute(), ref.compute())
    assert acc.compute().item() == pytest.approx((z[0].argmax(1) == y).double().mean().item())
    assert member_disagreement(z).abs().sum() == 0


def test_accuracy_uses_mean_probabilities_not_mean_logits() -> None:
    # member 0 is very sure of class 0, members 1 and 2 prefer class 1: mean logits pick 0, mean probabilities 1
    z = torch.tensor([[[10.0, 0.0]], [[0.0, 3.0]], [[0.0, 3.0]]])
    assert z.mean(0).argmax(-1).item() == 0
    assert F.softmax(z, -1).mean(0).argmax(-1).item() == 1
    assert ensemble_log_probs(z).argmax(-1).item() == 1
    acc = EnsembleAccuracy(num_classes=2)
    acc.update(z, torch.tensor([1]))
    assert acc.compute().item() == 1.0


def test_batchwise_updates_equal_one_update_whole_split() -> None:
    z, y = _data(k=4, n=103, c=5, seed=6)
    z = z.float()
    whole = ensemble_metrics(num_classes=5, ensemble_size=4)
    whole.update(z, y)
    batched = ensemble_metrics(num_classes=5, ensemble_size=4)
    per_batch_ece = []
    for lo in range(0, 103, 10):
        batched.update(z[:, lo : lo + 10], y[lo : lo + 10])
        e = EnsembleCalibrationError(num_classes=5)
        e.update(z[:, lo : lo + 10], y[lo : lo + 10])
        per_batch_ece.append(e.compute().item())
    a, b = whole.compute(), batched.compute()
    assert set(a) == {"acc", "nll", "gibbs_nll", "ece", "brier", "disagreement"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert abs(a["ece"].item() - float(np.mean(per_batch_ece))) > 1e-3  # whole-split, not a per-batch mean
    torch.testing.assert_close(a["nll"], ensemble_nll(z, y).mean())
    torch.testing.assert_close(a["gibbs_nll"], gibbs_nll(z, y).mean())
    torch.testing.assert_close(a["disagreement"], member_disagreement(z).mean())
    mem_whole, mem_batched = MemberNLL(4), MemberNLL(4)
    mem_whole.update(z, y)
    for lo in range(0, 103, 10):
        mem_batched.update(z[:, lo : lo + 10], y[lo : lo + 10])
    assert mem_whole.compute().shape == (4,)
    torch.testing.assert_close(mem_whole.compute(), mem_batched.compute())
    torch.testing.assert_close(mem_whole.compute(), member_nll(z, y))
    whole.reset()
    whole.update(z[:, :10], y[:10])
    torch.testing.assert_close(whole.compute()["nll"], ensemble_nll(z[:, :10], y[:10]).mean())


def test_metric_states_are_sums() -> None:
    for m in (EnsembleNLL(), GibbsNLL(), EnsembleBrierScore(), MemberDisagreement(), MemberNLL(3)):
        assert set(m._reductions) == {"total", "count"}
        assert all(getattr(fx, "__name__", "") == "dim_zero_sum" for fx in m._reductions.values())
    acc = EnsembleAccuracy(num_classes=3)
    assert all(getattr(fx, "__name__", "") == "dim_zero_sum" for fx in acc._reductions.values())


def test_bad_shapes() -> None:
    z, y = _data(k=2, n=8, c=3)
    with pytest.raises(ValueError, match=r"member logits of shape \(K, N, C\)"):
        ensemble_nll(z[0], y)
    with pytest.raises(ValueError, match=r"labels of shape \(N,\) = \(8,\)"):
        gibbs_nll(z, y[:5])
    with pytest.raises(ValueError, match=r"integer class labels"):
        ensemble_nll(z, y.float())
    with pytest.raises(ValueError, match=r"member logits of shape \(4, N, 3\)"):
        ensemble_metrics(3, 4).update(z, y)
    with pytest.raises(ValueError, match=r"member logits of shape \(2, N, 5\)"):
        EnsembleCalibrationError(num_classes=5, ensemble_size=2).update(z, y)
    with pytest.raises(ValueError, match=r"member logits of shape \(3, N, C\)"):
        MemberNLL(3).update(z, y)
    with pytest.raises(ValueError, match=r"probabilities of shape \(N, C\)"):
        brier_score(z, y)
    with pytest.raises(ValueError, match="ensemble_size must be >= 1"):
        MemberNLL(0)
    assert math.isfinite(EnsembleNLL(num_classes=3, ensemble_size=2).forward(z, y).item())
