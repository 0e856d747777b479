"""Forward-mode AD through the STN LSTM time loop (:func:`hyperlit.nn.stn_lstm.stn_lstm_recurrence`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import jvp

from hyperlit.models.stn_lstm_lm import StnLSTMLanguageModel
from hyperlit.nn.stn_lstm import StnLSTM, StnLSTMRecurrence, stn_lstm_recurrence


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(seed: int = 0, shared: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    return rand(5, 3, 16), rand(3, 4), rand(3, 4), rand(4, 32, scale=0.5), rand(1 if shared else 3, 16)


def _central(fn, args: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...], d: float = 1e-6):
    plus = fn(*(a + d * t for a, t in zip(args, tangents)))
    minus = fn(*(a - d * t for a, t in zip(args, tangents)))
    return tuple((p - m) / (2 * d) for p, m in zip(plus, minus))


@pytest.mark.parametrize("shared", [False, True])
def test_recurrence_jvp_matches_finite_differences(shared: bool) -> None:
    """``torch.func.jvp`` of the loop in every input direction at once against central differences (float64)."""
    args = _inputs(0, shared)
    tangents = _inputs(1, shared)
    out, tangent = jvp(stn_lstm_recurrence, args, tangents)
    for o, ref in zip(out, StnLSTMRecurrence.apply(*args)):
        torch.testing.assert_close(o, ref, atol=1e-12, rtol=0)
    for t, fd in zip(tangent, _central(StnLSTMRecurrence.apply, args, tangents)):
        torch.testing.assert_close(t, fd, atol=1e-8, rtol=1e-6)


def test_recurrence_dual_tensors_match_func_jvp() -> None:
    """:mod:`torch.autograd.forward_ad` dual inputs take the same exact path as :func:`torch.func.jvp`."""
    args, tangents = _inputs(0), _inputs(2)
    _, expected = jvp(stn_lstm_recurrence, args, tangents)
    with forward_ad.dual_level():
        outs = stn_lstm_recurrence(*(forward_ad.make_dual(a, t) for a, t in zip(args, tangents)))
        got = [forward_ad.unpack_dual(o).tangent for o in outs]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


def test_reverse_mode_keeps_the_hand_written_backward_and_both_paths_agree() -> None:
    """Outside forward mode the loop is :class:`StnLSTMRecurrence`; the plain-operation path has its gradients."""
    args = [a.requires_grad_() for a in _inputs(0)]
    out = stn_lstm_recurrence(*args)
    assert type(out[0].grad_fn).__name__ == "StnLSTMRecurrenceBackward"
    weights = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = (out[0] * weights).sum() + out[1].square().sum() + out[2].sum()
    grads = torch.autograd.grad(loss, args)
    with forward_ad.dual_level():  # a dual input with a zero tangent switches to the plain operations
        dual = [forward_ad.make_dual(a, torch.zeros_like(a)) for a in args]
        plain = stn_lstm_recurrence(*dual)
        assert type(plain[0].grad_fn).__name__ != "StnLSTMRecurrenceBackward"
        loss2 = (plain[0] * weights).sum() + plain[1].square().sum() + plain[2].sum()
        grads2 = torch.autograd.grad(forward_ad.unpack_dual(loss2).primal, args)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, atol=1e-12, rtol=1e-10)


def test_layer_jvp_over_the_hypernet_input_is_differentiable_in_reverse_mode() -> None:
    """Δ-STN's linearization ``J_ε f·ε`` through a layer: the tangent against finite differences, and its gradient
    with respect to the response weights ``R_hh`` and ``V`` against finite differences of the tangent."""
    torch.manual_seed(0)
    layer = StnLSTM(3, 4, hdim=2).double()
    with torch.no_grad():
        layer.hyper_bottleneck.normal_(0, 0.5)
    x, eps = torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    state = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))

    def f(e: torch.Tensor) -> torch.Tensor:
        return layer(x, state, e)[0]

    zero = torch.zeros_like(eps)
    _, tangent = jvp(f, (zero,), (eps,))
    d = 1e-6
    torch.testing.assert_close(tangent, (f(d * eps) - f(-d * eps)) / (2 * d), atol=1e-8, rtol=1e-6)
    weights = torch.randn_like(tangent)
    for p in (layer.response_weight_hh, layer.hyper_bottleneck):
        grad = torch.autograd.grad((tangent * weights).sum(), p, retain_graph=True)[0]
        u = torch.randn_like(p)
        with torch.no_grad():
            p.add_(d * u)
            plus = (jvp(f, (zero,), (eps,))[1] * weights).sum()
            p.sub_(2 * d * u)
            minus = (jvp(f, (zero,), (eps,))[1] * weights).sum()
            p.add_(d * u)
        torch.testing.assert_close((grad * u).sum(), (plus - minus) / (2 * d), atol=1e-7, rtol=1e-6)


def test_language_model_jvp_runs_through_every_layer() -> None:
    """The whole STN LM under :func:`torch.func.jvp` (train mode, dropout masks from a seeded generator)."""
    model = StnLSTMLanguageModel(20, 5, 6, num_layers=2, hdim=7).double()
    tokens = torch.randint(0, 20, (4, 3))
    eps = torch.randn(3, 7, dtype=torch.float64)
    hp = {"dropouto": 0.2, "wdrop": 0.3}

    def logits(e: torch.Tensor) -> torch.Tensor:
        return model(tokens, e, hp, torch.Generator().manual_seed(1)).logits

    _, tangent = jvp(logits, (torch.zeros_like(eps),), (eps,))
    d = 1e-6
    torch.testing.assert_close(tangent, (logits(d * eps) - logits(-d * eps)) / (2 * d), atol=1e-8, rtol=1e-6)
    assert tangent.abs().max() > 0
