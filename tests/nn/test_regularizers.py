"""Per-example dropout variants: rates per example, inverted scaling, no gradient through masks, errors."""

from __future__ import annotations

import pytest
import torch

from hyperlit.nn.regularizers import channel_dropout, input_dropout, per_example_dropout


def test_per_example_dropout_rates_and_scaling() -> None:
    x = torch.ones(4, 20000)
    p = torch.tensor([0.0, 0.1, 0.5, 0.9])
    out = per_example_dropout(x, p, generator=torch.Generator().manual_seed(0))
    dropped = (out == 0).float().mean(1)
    torch.testing.assert_close(dropped, p, atol=0.015, rtol=0)
    for b in range(4):  # kept units are scaled by 1 / (1 - p_b): the expectation is preserved
        kept = out[b][out[b] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p[b].item())))
    assert torch.equal(out[0], x[0])


def test_channel_dropout_drops_whole_channels() -> None:
    x = torch.ones(3, 4000, 5, 5)
    p = torch.tensor([0.2, 0.5, 0.8])
    out = channel_dropout(x, p, generator=torch.Generator().manual_seed(0))
    per_channel = out.flatten(2)
    assert (per_channel.amin(2) == per_channel.amax(2)).all()  # constant within each channel
    torch.testing.assert_close((per_channel[..., 0] == 0).float().mean(1), p, atol=0.03, rtol=0)


def test_input_dropout_is_elementwise_per_example() -> None:
    x = torch.ones(2, 3, 64, 64)
    out = input_dropout(x, torch.tensor([0.3, 0.6]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((out == 0).float().mean((1, 2, 3)), torch.tensor([0.3, 0.6]), atol=0.02, rtol=0)


def test_masks_carry_no_gradient_to_the_rates() -> None:
    x = torch.randn(3, 50, requires_grad=True)
    p = torch.tensor([0.2, 0.4, 0.6], requires_grad=True)
    for fn, inp in ((per_example_dropout, x), (channel_dropout, x.view(3, 5, 10)), (input_dropout, x)):
        out = fn(inp, p, generator=torch.Generator().manual_seed(0))
        gx, gp = torch.autograd.grad(out.sum(), (x, p), allow_unused=True)
        assert gp is None  # probabilities are detached
        assert gx is not None and gx.abs().sum() > 0


def test_eval_mode_identity_generator_reproducible_and_errors() -> None:
    x = torch.randn(3, 10)
    assert per_example_dropout(x, 0.5, training=False) is x
    feats = x.view(3, 10, 1)
    assert channel_dropout(feats, 0.5, training=False) is feats
    a = per_example_dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
    b = per_example_dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        per_example_dropout(x, torch.tensor([0.1, -0.1, 0.2]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        per_example_dropout(x, torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="shape"):
        per_example_dropout(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="B, C"):
        channel_dropout(x, 0.1)
    # a saturated rate of exactly 1 zeroes the example instead of producing inf/NaN
    out = per_example_dropout(x, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.isfinite(out).all() and (out[1] == 0).all()
