"""exp(λ)-weighted L2 penalties (Lorraine & Duvenaud 2018): conventions, batching, per-tensor expansion, gradients."""

from __future__ import annotations

import pytest
import torch

from hyperlit.nn.penalties import expand_strengths, weighted_l2


def test_global_strength_gives_scaled_squared_and_unsquared_norms() -> None:
    w = torch.randn(3, 7)
    lam = torch.tensor([[-1.0], [0.0], [2.0]])
    s = lam.exp()
    torch.testing.assert_close(weighted_l2(w, s), s[:, 0] * w.square().sum(-1))
    torch.testing.assert_close(weighted_l2(w, s, squared=False), s[:, 0] * w.norm(dim=-1))
    torch.testing.assert_close(weighted_l2(w[0], torch.tensor(2.0)), 2.0 * w[0].square().sum())


def test_per_weight_strengths() -> None:
    w = torch.randn(2, 5)
    s = torch.rand(2, 5)
    torch.testing.assert_close(weighted_l2(w, s), (s * w * w).sum(-1))
    torch.testing.assert_close(weighted_l2(w, s, squared=False), torch.sqrt(((s * w) ** 2).sum(-1)))
    # equal per-weight strengths reduce to the global penalty
    torch.testing.assert_close(weighted_l2(w, torch.full((2, 5), 0.3)), weighted_l2(w, torch.full((2, 1), 0.3)))


def test_expand_strengths_per_tensor() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0]])
    out = expand_strengths(s, [2, 1, 3])
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0]]))
    assert expand_strengths(torch.ones(4, 1), [2, 3]).shape == (4, 1)
    assert expand_strengths(torch.ones(4, 5), [2, 3]).shape == (4, 5)
    with pytest.raises(ValueError, match="expected 1"):
        expand_strengths(torch.ones(1, 4), [2, 3])


def test_gradients_match_finite_differences() -> None:
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    lam = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    for squared in (True, False):
        assert torch.autograd.gradcheck(lambda w, lam, sq=squared: weighted_l2(w, lam.exp(), sq), (w, lam))


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="last dimension"):
        weighted_l2(torch.randn(2, 5), torch.ones(2, 3))
    with pytest.raises(ValueError, match="broadcast"):
        weighted_l2(torch.randn(2, 5), torch.ones(3, 1))
    with pytest.raises(ValueError, match="at least one"):
        weighted_l2(torch.tensor(1.0), torch.tensor(1.0))
