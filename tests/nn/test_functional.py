"""``call_with_weights`` / ``batched_call`` / ``materialize``: equivalence with plain modules and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlit.nn import batched_call, call_with_weights, materialize


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _random_weights(module: nn.Module, k: int | None = None) -> dict[str, torch.Tensor]:
    lead = () if k is None else (k,)
    return {n: torch.randn(*lead, *p.shape) for n, p in module.named_parameters()}


def test_call_with_weights_equals_module_with_those_parameters() -> None:
    target = _mlp()
    w = _random_weights(target)
    x = torch.randn(4, 5)
    reference = materialize(target, w)
    torch.testing.assert_close(call_with_weights(target, w, x), reference(x), rtol=0, atol=0)
    # the original module is untouched
    assert not torch.equal(target[0].weight, w["0.weight"])


def test_partial_weights_take_the_rest_from_the_target() -> None:
    target = _mlp()
    w = {"2.weight": torch.randn(3, 8)}
    x = torch.randn(4, 5)
    expected = nn.functional.linear(target[1](target[0](x)), w["2.weight"], target[2].bias)
    torch.testing.assert_close(call_with_weights(target, w, x), expected)


def test_unknown_names_raise() -> None:
    with pytest.raises(KeyError, match="does not have"):
        call_with_weights(_mlp(), {"3.weight": torch.zeros(1)}, torch.randn(1, 5))
    with pytest.raises(KeyError, match="no parameter"):
        materialize(_mlp(), {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        materialize(_mlp(), {"0.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("shared_input", [True, False])
def test_batched_call_equals_a_loop(shared_input: bool) -> None:
    target = _mlp()
    w = _random_weights(target, k=6)
    x = torch.randn(4, 5) if shared_input else torch.randn(6, 4, 5)
    out = batched_call(target, w, x, shared_input=shared_input)
    assert out.shape == (6, 4, 3)
    for k in range(6):
        xi = x if shared_input else x[k]
        torch.testing.assert_close(out[k], call_with_weights(target, {n: v[k] for n, v in w.items()}, xi))
    torch.testing.assert_close(batched_call(target, w, x, shared_input=shared_input, chunk_size=4), out)


def test_batched_call_gradients_equal_loop_gradients() -> None:
    target = _mlp()
    w1 = {n: v.requires_grad_() for n, v in _random_weights(target, k=3).items()}
    w2 = {n: v.detach().clone().requires_grad_() for n, v in w1.items()}
    x = torch.randn(4, 5)
    batched_call(target, w1, x).square().sum().backward()
    sum(call_with_weights(target, {n: v[k] for n, v in w2.items()}, x).square().sum() for k in range(3)).backward()
    for n in w1:
        torch.testing.assert_close(w1[n].grad, w2[n].grad)
    assert all(p.grad is None for p in target.parameters())


def test_batched_call_lstm_falls_back_to_sequential_calls() -> None:
    """``aten::lstm`` has no vmap batching rule; the result must still equal per-weight-set calls."""
    target = nn.LSTM(3, 4, batch_first=True)
    w = _random_weights(target, k=2)
    x = torch.randn(2, 5, 3)
    out, (h, c) = batched_call(target, w, x)
    assert out.shape == (2, 2, 5, 4)
    assert h.shape == c.shape == (2, 1, 2, 4)
    for k in range(2):
        ref_out, (ref_h, _) = call_with_weights(target, {n: v[k] for n, v in w.items()}, x)
        torch.testing.assert_close(out[k], ref_out)
        torch.testing.assert_close(h[k], ref_h)


def test_materialize_is_a_detached_copy() -> None:
    target = _mlp()
    w = {n: v.requires_grad_() for n, v in _random_weights(target).items()}
    module = materialize(target, w)
    assert module is not target
    assert all(not p.grad_fn for p in module.parameters())
    x = torch.randn(2, 5)
    torch.testing.assert_close(module(x), call_with_weights(target, w, x).detach())
