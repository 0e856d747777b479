"""MemberHyperparameterSpace: per-member perturbation, gradients, repeat, entropy, initialisation and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyperlit.ensembles.space import MemberHyperparameterSpace
from hyperlit.hparams import Hyperparameter, HyperparameterSpace

torch.set_num_threads(1)


def _entries() -> list[Hyperparameter]:
    return [
        Hyperparameter("drop", 0.0, 0.9, init=0.1, init_sigma=0.5),
        Hyperparameter("wd", 0.0, math.inf, init=1e-3, transform="log", init_sigma=0.3),
        Hyperparameter("holes", 0.0, 4.0, init=1.0, discrete=True),
        Hyperparameter("per_w", 0.0, 1.0, init=0.3, size=2, per_example=False, init_sigma=0.2),
    ]


def _space(k: int = 3, **kwargs: object) -> MemberHyperparameterSpace:
    space = MemberHyperparameterSpace(_entries(), k, **kwargs)
    with torch.no_grad():  # members apart, with distinct σ
        space.unconstrained.add_(torch.arange(k, dtype=torch.float32).unsqueeze(1))
        space.scale.add_(0.3 * torch.arange(k, dtype=torch.float32).unsqueeze(1))
    return space


def test_shapes_state_dict_and_inherited_api() -> None:
    s = _space(3)
    assert s.ensemble_size == 3 and s.dim == 5
    assert s.unconstrained.shape == (3, 5) and s.scale.shape == (3, 5)
    assert set(s.state_dict()) == {"unconstrained", "scale"}
    assert {n for n, _ in s.named_parameters()} == {"unconstrained", "scale"}
    c = s.constrained()
    assert c.shape == (3, 5)
    torch.testing.assert_close(
        s.unconstrain(s.constrained(discretize=False)), s.unconstrained.detach(), atol=1e-4, rtol=1e-4
    )
    # the constrained map is the parent's, row by row
    single = HyperparameterSpace(_entries())
    for k in range(3):
        torch.testing.assert_close(c[k], single.constrained(s.unconstrained[k]))
    v = s.values()
    assert v["drop"].shape == (3,) and v["per_w"].shape == (3, 2)
    torch.testing.assert_close(v["drop"], c[:, 0].detach())
    assert s.sigmas()["per_w"].shape == (3, 2)
    torch.testing.assert_close(s.sigmas()["wd"], F.softplus(s.scale[:, 1]).detach())
    m1 = s.member_values(1)
    assert isinstance(m1["drop"], float) and m1["drop"] == pytest.approx(c[1, 0].item())
    assert m1["per_w"].shape == (2,)
    assert s.get(s.perturb(6), "per_w").shape == (6, 2)
    assert "ensemble_size=3" in repr(s)
    rows = s.perturb(6)
    assert torch.equal(s.hnet_input(rows), rows)
    sc = MemberHyperparameterSpace(_entries(), 3, hnet_input="constrained")
    rows = sc.perturb(6)
    torch.testing.assert_close(sc.hnet_input(rows), sc.constrained(rows, discretize=False))


def test_perturb_rows_have_member_mean_and_std() -> None:
    s = _space(3)
    n = 20000
    gen = torch.Generator().manual_seed(1)
    rows = s.perturb(3 * n, generator=gen).detach().view(3, n, s.dim)
    per_example = [0, 1, 2]  # drop, wd, holes
    for k in range(3):
        mean = rows[k, :, per_example].mean(0)
        std = rows[k, :, per_example].std(0)
        torch.testing.assert_close(mean, s.unconstrained[k, per_example].detach(), atol=0.05, rtol=0)
        torch.testing.assert_close(std, s.sigma[k, per_example].detach(), atol=0.05, rtol=0.05)
        # per_example=False: one ε per member per batch (both columns of per_w constant within a member)
        block = rows[k, :, 3:]
        assert torch.equal(block, block[:1].expand_as(block))
    # the per-batch draws differ between members (not one ε shared by all)
    eps = (rows[:, 0, 3:] - s.unconstrained[:, 3:].detach()) / s.sigma[:, 3:].detach()
    assert not torch.allclose(eps[0], eps[1])


def test_perturb_gradient_reaches_only_the_rows_member() -> None:
    s = _space(3)
    n = 4
    rows = s.perturb(3 * n, generator=torch.Generator().manual_seed(0))
    for k in range(3):
        s.zero_grad()
        g_u, g_s = torch.autograd.grad(
            rows[k * n : (k + 1) * n].pow(2).sum(), [s.unconstrained, s.scale], retain_graph=True
        )
        others = [j for j in range(3) if j != k]
        assert torch.count_nonzero(g_u[others]) == 0 and torch.count_nonzero(g_s[others]) == 0
        assert (g_u[k] != 0).all() and (g_s[k] != 0).all()


def test_repeat_is_each_members_lambda_and_carries_gradient() -> None:
    s = _space(4)
    rows = s.repeat(8)
    assert rows.shape == (8, s.dim)
    for k in range(4):
        torch.testing.assert_close(rows[2 * k : 2 * k + 2], s.unconstrained[k].detach().expand(2, -1))
    (g,) = torch.autograd.grad(rows[2:4].sum(), s.unconstrained)
    expected = torch.zeros_like(g)
    expected[1] = 2.0
    torch.testing.assert_close(g, expected)


def test_entropy_is_sum_of_member_entropies() -> None:
    s = _space(3)
    total = torch.zeros(())
    for k in range(3):
        single = HyperparameterSpace(_entries())
        with torch.no_grad():
            single.scale.copy_(s.scale[k])
        total = total + single.entropy()
    torch.testing.assert_close(s.entropy(), total)
    (g,) = torch.autograd.grad(s.entropy(), s.scale)
    torch.testing.assert_close(g, torch.sigmoid(s.scale.detach()) / F.softplus(s.scale.detach()))


def test_default_init_equals_parent_for_every_member() -> None:
    s = MemberHyperparameterSpace(_entries(), 2)
    single = HyperparameterSpace(_entries())
    torch.testing.assert_close(s.unconstrained.detach(), single.unconstrained.detach().expand(2, -1))
    torch.testing.assert_close(s.scale.detach(), single.scale.detach().expand(2, -1))
    parent = single.values()
    for k in range(2):
        mine = s.member_values(k)
        assert mine["drop"] == pytest.approx(parent["drop"]) and mine["holes"] == parent["holes"] == 1.0
        torch.testing.assert_close(mine["per_w"], parent["per_w"])


def test_member_init_overrides_and_init_spread() -> None:
    init = [{"drop": 0.2}, {}, {"wd": 1e-2, "holes": 3, "per_w": [0.1, 0.7]}]
    s = MemberHyperparameterSpace(_entries(), 3, member_init=init)
    v = s.values()
    torch.testing.assert_close(v["drop"], torch.tensor([0.2, 0.1, 0.1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(v["wd"], torch.tensor([1e-3, 1e-3, 1e-2]), atol=0, rtol=1e-5)
    assert v["holes"].tolist() == [1.0, 1.0, 3.0]
    torch.testing.assert_close(v["per_w"][2], torch.tensor([0.1, 0.7]), atol=1e-6, rtol=0)
    torch.testing.assert_close(v["per_w"][0], torch.tensor([0.3, 0.3]), atol=1e-6, rtol=0)
    # a scalar value for a vector entry fills all its columns
    s1 = MemberHyperparameterSpace(_entries(), 1, member_init=[{"per_w": 0.6}])
    torch.testing.assert_close(s1.values()["per_w"][0], torch.tensor([0.6, 0.6]), atol=1e-6, rtol=0)

    a = MemberHyperparameterSpace(_entries(), 3, init_spread=0.5, seed=7)
    b = MemberHyperparameterSpace(_entries(), 3, init_spread=0.5, seed=7)
    c = MemberHyperparameterSpace(_entries(), 3, init_spread=0.5, seed=8)
    base = MemberHyperparameterSpace(_entries(), 3)
    assert torch.equal(a.unconstrained, b.unconstrained)
    assert not torch.equal(a.unconstrained, c.unconstrained)
    jitter = a.unconstrained.detach() - base.unconstrained.detach()
    expected = 0.5 * torch.randn(3, a.dim, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(jitter, expected)
    assert torch.equal(a.scale, base.scale)


def test_check_finite_names_member_and_entry() -> None:
    s = _space(3)
    s.check_finite()
    with torch.no_grad():
        s.unconstrained[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"at step 5: member 2 wd"):
        s.check_finite(step=5)


def test_bad_input() -> None:
    s = _space(3)
    with pytest.raises(ValueError, match="multiple of ensemble_size=3"):
        s.perturb(7)
    with pytest.raises(ValueError, match="multiple of ensemble_size=3"):
        s.repeat(4)
    with pytest.raises(ValueError, match="list of ensemble_size=3 dicts"):
        MemberHyperparameterSpace(_entries(), 3, member_init=[{}, {}])
    with pytest.raises(ValueError, match="list of ensemble_size=2 dicts"):
        MemberHyperparameterSpace(_entries(), 2, member_init={"drop": 0.2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"member_init\[1\]: unknown hyperparameter\(s\) \['lr'\]"):
        MemberHyperparameterSpace(_entries(), 2, member_init=[{}, {"lr": 0.1}])
    with pytest.raises(ValueError, match=r"member_init\[0\]\['drop'\].*outside the range"):
        MemberHyperparameterSpace(_entries(), 2, member_init=[{"drop": 0.95}, {}])
    with pytest.raises(ValueError, match="expected 1 or 2 values"):
        MemberHyperparameterSpace(_entries(), 1, member_init=[{"per_w": [0.1, 0.2, 0.3]}])
    with pytest.raises(ValueError, match="ensemble_size must be an integer >= 1"):
        MemberHyperparameterSpace(_entries(), 0)
    with pytest.raises(ValueError, match="init_spread"):
        MemberHyperparameterSpace(_entries(), 2, init_spread=-1.0)
