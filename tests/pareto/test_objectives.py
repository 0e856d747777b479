"""Fairness and multi-task objectives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyperlit.pareto.objectives import (
    FairnessObjectives,
    MultiTaskObjectives,
    binary_cross_entropy,
    fnr_gap,
    fpr_gap,
    make_objectives,
    multitask_cross_entropy,
    relaxed_fnr_gap,
    relaxed_fpr_gap,
    toy_objectives,
)


def _data(n: int = 200, k: int = 3):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(n, generator=g) < 0.4).float()
    group = (torch.rand(n, generator=g) < 0.3).long()
    logits = torch.randn(k, n, generator=g) * 2
    return logits, y, group


def _rates(pred, y, group):  # type: ignore[no-untyped-def]
    """FPR and FNR per group, written out with boolean indexing."""
    out = {}
    for gv in (0, 1):
        neg = (group == gv) & (y == 0)
        pos = (group == gv) & (y == 1)
        out[gv] = (pred[neg].float().mean(), 1 - pred[pos].float().mean())
    return out


def test_relaxed_gaps_equal_hard_gaps_on_hard_predictions() -> None:
    logits, y, group = _data()
    hard = (logits > 0).float()  # (K, B) 0/1 "probabilities"
    torch.testing.assert_close(relaxed_fpr_gap(hard, y, group), fpr_gap(hard, y, group))
    torch.testing.assert_close(relaxed_fnr_gap(hard, y, group), fnr_gap(hard, y, group))
    for k in range(hard.shape[0]):
        r = _rates(hard[k], y, group)
        assert fpr_gap(hard[k], y, group).item() == pytest.approx(abs(r[0][0] - r[1][0]).item(), abs=1e-6)
        assert fnr_gap(hard[k], y, group).item() == pytest.approx(abs(r[0][1] - r[1][1]).item(), abs=1e-6)
    # saturated logits: the relaxed loss of the module equals the hard metric
    objs = FairnessObjectives()
    saturated = torch.where(logits > 0, 1e4, -1e4)
    torch.testing.assert_close(
        objs.losses(saturated, (None, y, group))[:, 1:],
        objs.from_statistics(objs.statistics(saturated, (None, y, group)))[:, 1:].float(),
    )


def test_relaxed_gaps_are_the_soft_means_and_differentiable() -> None:
    logits, y, group = _data()
    logits.requires_grad_(True)
    p = torch.sigmoid(logits)
    fp = relaxed_fpr_gap(p, y, group)
    for k in range(3):
        neg0 = p[k][(group == 0) & (y == 0)].mean()
        neg1 = p[k][(group == 1) & (y == 0)].mean()
        assert fp[k].item() == pytest.approx((neg0 - neg1).abs().item(), abs=1e-6)
    fp.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_empty_group_gives_zero_gap_and_bad_predictions_raise() -> None:
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1])  # group 1 has no negatives
    preds = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert fpr_gap(preds, y, group).item() == 0.0
    assert fnr_gap(preds, y, group).item() == 1.0
    with pytest.raises(ValueError, match="0/1"):
        fpr_gap(torch.tensor([0.5, 0.0, 1.0, 0.0]), y, group)


def test_statistics_aggregate_to_full_set_metrics() -> None:
    logits, y, group = _data(n=300)
    objs = FairnessObjectives()
    stats = sum(
        objs.statistics(logits[:, i : i + 70], (None, y[i : i + 70], group[i : i + 70])) for i in range(0, 300, 70)
    )
    hard = objs.from_statistics(stats, hard=True)
    soft = objs.from_statistics(stats, hard=False)
    pred = (logits > 0).float()
    torch.testing.assert_close(hard[:, 0].float(), binary_cross_entropy(logits, y))
    torch.testing.assert_close(hard[:, 1].float(), fpr_gap(pred, y, group))
    torch.testing.assert_close(hard[:, 2].float(), fnr_gap(pred, y, group))
    torch.testing.assert_close(soft.float(), objs.losses(logits, (None, y, group)))


def test_bce_and_multitask_ce_match_torch() -> None:
    logits, y, _ = _data()
    for k in range(3):
        assert binary_cross_entropy(logits, y)[k].item() == pytest.approx(
            F.binary_cross_entropy_with_logits(logits[k], y).item(), rel=1e-6
        )
    out = torch.randn(4, 16, 2, 10)  # (K, B, T, C)
    tgt = torch.randint(0, 10, (16, 2))
    ce = multitask_cross_entropy(out, tgt)
    assert ce.shape == (4, 2)
    for k in range(4):
        for t in range(2):
            assert ce[k, t].item() == pytest.approx(F.cross_entropy(out[k, :, t], tgt[:, t]).item(), rel=1e-6)
    mt = MultiTaskObjectives(2)
    err = mt.from_statistics(mt.statistics(out, (None, tgt)), hard=True)
    torch.testing.assert_close(err.float(), (out.argmax(-1) != tgt).float().mean(1))
    assert mt.eval_names(hard=True) == ("err_0", "err_1") and mt.eval_names(hard=False) == mt.names == ("ce_0", "ce_1")
    assert FairnessObjectives().eval_names(hard=True) == ("bce", "fpr_gap", "fnr_gap")


def test_toy_objectives_front() -> None:
    d = 5
    u = torch.full((d,), d**-0.5)
    for t in (-1.0, 0.0, 0.5, 1.0):
        l1, l2 = toy_objectives(t * u).tolist()
        assert l1 == pytest.approx(1 - torch.exp(torch.tensor(-((1 - t) ** 2))).item(), abs=1e-6)
        assert l2 == pytest.approx(1 - torch.exp(torch.tensor(-((1 + t) ** 2))).item(), abs=1e-6)


def test_make_objectives() -> None:
    assert make_objectives(["bce", "fnr_gap"]).names == ("bce", "fnr_gap")
    assert isinstance(make_objectives(["ce_0", "ce_1"]), MultiTaskObjectives)
    with pytest.raises(ValueError, match="unknown objectives"):
        make_objectives(["bce", "accuracy"])
    with pytest.raises(ValueError, match=">= 2 distinct"):
        FairnessObjectives(["bce", "bce"])
