"""HyperparameterSpace: transforms, discrete entries, perturbation, entropy, reporting and validation errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyperlit.hparams import Hyperparameter, HyperparameterSpace, inv_softplus


def _space() -> HyperparameterSpace:
    return HyperparameterSpace(
        [
            Hyperparameter("drop", 0.0, 0.9, init=0.05, init_sigma=0.5),
            Hyperparameter("alpha", 0.0, math.inf, init=2.0, init_sigma=1.0),
            Hyperparameter("shift", -math.inf, 3.0, init=1.0),
            Hyperparameter("free", -math.inf, math.inf, init=-0.7),
            Hyperparameter("wd", 0.0, math.inf, init=1e-3, transform="log"),
            Hyperparameter("holes", 0.0, 4.0, init=1.0, discrete=True),
            Hyperparameter("per_w", 0.0, 1.0, init=0.3, size=3, per_example=False),
        ]
    )


def test_initial_values_and_transforms() -> None:
    s = _space()
    v = s.values()
    assert v["drop"] == pytest.approx(0.05, abs=1e-6)
    assert v["alpha"] == pytest.approx(2.0, abs=1e-5)
    assert v["shift"] == pytest.approx(1.0, abs=1e-5)
    assert v["free"] == pytest.approx(-0.7, abs=1e-6)
    assert v["wd"] == pytest.approx(1e-3, rel=1e-5)
    assert v["holes"] == 1.0  # discrete: starts in the middle of its bucket, floor gives the initial value
    torch.testing.assert_close(v["per_w"], torch.full((3,), 0.3), atol=1e-6, rtol=0)
    u = s.unconstrained.detach()
    c = s.constrained(u, discretize=False)
    # the formulas of the official code: stretched sigmoid, a + softplus, b − softplus, identity, exp
    assert c[0].item() == pytest.approx(0.9 * torch.sigmoid(u[0]).item(), abs=1e-6)
    assert c[1].item() == pytest.approx(F.softplus(u[1]).item(), abs=1e-6)
    assert c[2].item() == pytest.approx(3.0 - F.softplus(u[2]).item(), abs=1e-6)
    assert c[3].item() == pytest.approx(u[3].item())
    assert c[4].item() == pytest.approx(math.exp(u[4].item()), rel=1e-6)
    assert c[5].item() == pytest.approx(1.5, abs=1e-5)
    torch.testing.assert_close(s.unconstrain(c), u, atol=1e-4, rtol=1e-4)
    assert s.dim == 9 and len(s) == 7 and "drop" in s


def test_constrained_values_stay_in_range_and_discrete_floors() -> None:
    s = _space()
    u = torch.randn(1000, s.dim) * 8
    c = s.constrained(u)
    assert ((c[:, 0] >= 0) & (c[:, 0] <= 0.9)).all()
    assert (c[:, 1] >= 0).all() and (c[:, 2] <= 3).all() and (c[:, 4] > 0).all()
    holes = s.get(c, "holes")
    assert torch.equal(holes, holes.floor()) and holes.min() >= 0 and holes.max() <= 4
    assert set(holes.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert s.get(c, "per_w").shape == (1000, 3)


def test_perturb_per_example_and_per_batch() -> None:
    s = _space()
    g = torch.Generator().manual_seed(0)
    lam = s.perturb(20000, generator=g)
    eps = (lam - s.unconstrained) / s.sigma
    per_w = s.slice("per_w")
    assert (eps[:, per_w] == eps[:1, per_w]).all()  # per-batch: one draw shared by the batch
    others = eps[:, : per_w.start]
    assert others.std(0).sub(1).abs().max() < 0.03 and others.mean(0).abs().max() < 0.03  # N(0, 1) per example
    torch.testing.assert_close(s.sigma[0], torch.tensor(0.5), atol=1e-6, rtol=0)
    # reparameterized: gradients reach λ and σ
    s.perturb(4, generator=g).sum().backward()
    assert s.unconstrained.grad is not None and s.scale.grad is not None and s.scale.grad.abs().sum() > 0
    assert torch.equal(s.repeat(3), s.unconstrained.detach().expand(3, -1))
    with pytest.raises(ValueError, match="batch_size"):
        s.perturb(0)


def test_entropy_is_that_of_a_diagonal_gaussian() -> None:
    s = _space()
    expected = sum(torch.distributions.Normal(0.0, sig).entropy().item() for sig in s.sigma.detach().tolist())
    assert s.entropy().item() == pytest.approx(expected, rel=1e-5)


def test_hnet_input_modes() -> None:
    entries = [Hyperparameter("drop", 0.0, 0.9, init=0.3)]
    u = torch.randn(5, 1)
    assert torch.equal(HyperparameterSpace(entries).hnet_input(u), u)
    c = HyperparameterSpace(entries, hnet_input="constrained").hnet_input(u)
    torch.testing.assert_close(c, 0.9 * torch.sigmoid(u))
    with pytest.raises(ValueError, match="hnet_input"):
        HyperparameterSpace(entries, hnet_input="logit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Hyperparameter("p", 0.0, 1.0, init=1.5), "outside its range"),
        (Hyperparameter("p", 0.0, 1.0, init=0.0), "outside its range"),
        (Hyperparameter("p", 1.0, 1.0, init=1.0), "empty or inverted range"),
        (Hyperparameter("p", 2.0, 1.0, init=1.5), "empty or inverted range"),
        (Hyperparameter("p", 0.0, 1.0, init=0.5, init_sigma=0.0), "init_sigma"),
        (Hyperparameter("p", 0.0, 1.0, init=float("nan")), "NaN"),
        (Hyperparameter("p", 0.0, math.inf, init=1.0, transform="sigmoid"), "finite range"),
        (Hyperparameter("p", 1.0, math.inf, init=2.0, transform="log"), "low=0"),
        (Hyperparameter("", 0.0, 1.0, init=0.5), "non-empty name"),
        (Hyperparameter("p", 0.0, 1.0, init=0.5, size=0), "size"),
    ],
)
def test_validation_errors_name_the_offending_value(entry: Hyperparameter, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HyperparameterSpace([entry])


def test_unknown_and_duplicate_names() -> None:
    s = _space()
    with pytest.raises(KeyError, match="unknown hyperparameter 'dropout'"):
        s.get(torch.zeros(2, s.dim), "dropout")
    with pytest.raises(ValueError, match="duplicate"):
        HyperparameterSpace([Hyperparameter("a", init=0.5), Hyperparameter("a", init=0.5)])
    with pytest.raises(ValueError, match="at least one"):
        HyperparameterSpace([])


def test_check_finite_names_the_bad_entry() -> None:
    s = _space()
    s.check_finite()
    with torch.no_grad():
        s.unconstrained[s.slice("alpha")] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 7: alpha"):
        s.check_finite(step=7)


def test_sigmas_and_inv_softplus() -> None:
    s = _space()
    assert s.sigmas()["alpha"] == pytest.approx(1.0, abs=1e-6)
    x = torch.tensor([1e-4, 0.5, 3.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(inv_softplus(x)), x)
