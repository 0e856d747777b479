"""STN LSTM layers, the LSTM language model and its seven regularization hyperparameters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperlit.models.stn_lstm_lm import (
    LM_HPARAMS,
    CarriedStates,
    StnLSTMLanguageModel,
    lm_hyperparameters,
    lm_training_loss,
)
from hyperlit.nn.regularizers import (
    activation_regularization,
    dropconnect_mask,
    embedding_dropout_mask,
    locked_dropout,
    temporal_activation_regularization,
)
from hyperlit.nn.stn_lstm import DropConnectLSTM, StnEmbedding, StnLSTM, StnLSTMRecurrence, embedding_lookup


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny recurrent kernels run much faster single-threaded on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _zero_response(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("hyper_bottleneck"):
                p.zero_()


def _torch_lstm_like(layer: StnLSTM | DropConnectLSTM) -> nn.LSTM:
    ref = nn.LSTM(layer.input_size, layer.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(layer, name))
    return ref


# -- equivalence with torch.nn.LSTM -------------------------------------------------------------------------------
def test_zero_response_layer_equals_torch_lstm_one_window() -> None:
    layer = StnLSTM(6, 9, hdim=4)
    _zero_response(layer)
    ref = _torch_lstm_like(layer)
    x, lam = torch.randn(13, 5, 6), torch.randn(5, 4)
    h0, c0 = torch.randn(5, 9), torch.randn(5, 9)
    out, (h, c) = layer(x, (h0, c0), lam)
    ref_out, (ref_h, ref_c) = ref(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, ref_h[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(c, ref_c[0], atol=1e-5, rtol=0)


def test_zero_response_layer_equals_torch_lstm_across_windows() -> None:
    """Carrying the (detached) state over three BPTT windows equals one pass of nn.LSTM over the whole sequence."""
    layer = StnLSTM(4, 7, hdim=3)
    _zero_response(layer)
    ref = _torch_lstm_like(layer)
    x, lam = torch.randn(30, 3, 4), torch.randn(3, 3)
    state, outs = None, []
    for chunk in x.split(11):
        out, state = layer(chunk, state, lam)
        state = (state[0].detach(), state[1].detach())
        outs.append(out)
    ref_out, (ref_h, _) = ref(x)
    torch.testing.assert_close(torch.cat(outs), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(state[0], ref_h[0], atol=1e-5, rtol=0)


def test_zero_response_language_model_equals_torch_modules_across_windows() -> None:
    """The full 2-layer STN LM (V = 0, every rate 0, train mode) equals nn.Embedding → 2 nn.LSTM → tied Linear,
    window by window with carried state."""
    model = StnLSTMLanguageModel(50, 8, 12, num_layers=2, tie_weights=True, hdim=7).train()
    _zero_response(model)
    emb = nn.Embedding(50, 8)
    ref = nn.LSTM(8, 12)
    ref_last = nn.LSTM(12, 8)  # tied: the last layer has the embedding width
    with torch.no_grad():
        emb.weight.copy_(model.encoder.weight)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(model.rnns[0], name))
            getattr(ref_last, f"{name}_l0").copy_(getattr(model.rnns[1], name))
    tokens = torch.randint(0, 50, (25, 4))
    rates = {n: 0.0 for n in LM_HPARAMS}
    states = CarriedStates()
    logits = []
    for i, chunk in enumerate(tokens.split(10)):
        out = model(chunk, torch.randn(4, 7), rates, state=states.get("s", i, 4))
        states.put("s", i, out.state)
        logits.append(out.logits)
    h1, _ = ref(emb(tokens))
    h2, _ = ref_last(h1)
    expected = F.linear(h2, model.encoder.weight, model.decoder.bias)
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-5, rtol=0)


def test_zero_response_gradients_equal_torch_lstm_gradients() -> None:
    layer = StnLSTM(4, 6, hdim=2)
    _zero_response(layer)
    ref = _torch_lstm_like(layer)
    x = torch.randn(9, 3, 4)
    weights = torch.randn(9, 3, 6)
    out, (h, c) = layer(x, None, torch.randn(3, 2))
    ((out * weights).sum() + h.sum() + 2 * c.sum()).backward()
    ref_out, (ref_h, ref_c) = ref(x)
    ((ref_out * weights).sum() + ref_h.sum() + 2 * ref_c.sum()).backward()
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(ref, f"{name}_l0").grad, atol=1e-5, rtol=1e-4)


def test_recurrence_backward_matches_finite_differences() -> None:
    """The hand-written BPTT of the time loop against numerical gradients (float64) for every input."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    args = (rand(5, 3, 16), rand(3, 4), rand(3, 4), rand(4, 32, scale=0.5), rand(3, 16))
    assert torch.autograd.gradcheck(StnLSTMRecurrence.apply, args)
    shared = (*args[:4], rand(1, 16))  # one hypernet input for the whole batch
    assert torch.autograd.gradcheck(StnLSTMRecurrence.apply, shared)


def test_stn_language_model_trains_under_bf16_autocast() -> None:
    """Mixed precision (``bf16-mixed``): the hand-written recurrence runs in one dtype and returns fp32 gradients."""
    model = StnLSTMLanguageModel(50, 16, 16, hdim=7)
    tokens, targets = torch.randint(0, 50, (6, 3)), torch.randint(0, 50, (6, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, torch.randn(3, 7), {"dropouto": 0.1, "wdrop": 0.2}, torch.Generator().manual_seed(0))
        loss, _ = lm_training_loss(out, targets, 0.1, 0.1)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert model.rnns[1].hyper_bottleneck.grad.abs().sum() > 0


def test_plain_dropconnect_lstm_equals_torch_lstm() -> None:
    layer = DropConnectLSTM(5, 6).train()
    ref = _torch_lstm_like(layer)
    x = torch.randn(9, 3, 5)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], atol=1e-6, rtol=0)
    # with DropConnect: nn.LSTM with the same masked weight_hh (same generator seed)
    g = torch.Generator().manual_seed(3)
    out, _ = layer(x, None, 0.5, g)
    mask = dropconnect_mask(layer.weight_hh, 0.5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref.weight_hh_l0.mul_(mask)
    torch.testing.assert_close(out, ref(x)[0], atol=1e-6, rtol=0)


# -- the structured best response -------------------------------------------------------------------------------
def test_response_equals_materialized_per_sequence_weights() -> None:
    """Sequence b runs exactly the LSTM with weights W + diag(s_b) R and biases b + a_b ⊙ r (STN eq. 9)."""
    layer = StnLSTM(4, 5, hdim=3)
    with torch.no_grad():
        layer.hyper_bottleneck.normal_(0, 0.5)
    x, lam = torch.randn(7, 2, 4), torch.randn(2, 3)
    out, _ = layer(x, None, lam)
    s_ih, s_hh, a_ih, a_hh = (lam @ layer.hyper_bottleneck.t()).split(20, dim=-1)
    for b in range(2):
        ref = nn.LSTM(4, 5)
        with torch.no_grad():
            ref.weight_ih_l0.copy_(layer.weight_ih + s_ih[b, :, None] * layer.response_weight_ih)
            ref.weight_hh_l0.copy_(layer.weight_hh + s_hh[b, :, None] * layer.response_weight_hh)
            ref.bias_ih_l0.copy_(layer.bias_ih + a_ih[b] * layer.response_bias_ih)
            ref.bias_hh_l0.copy_(layer.bias_hh + a_hh[b] * layer.response_bias_hh)
        torch.testing.assert_close(out[:, b], ref(x[:, b : b + 1])[0][:, 0], atol=1e-5, rtol=0)


def test_output_of_a_sequence_depends_only_on_its_own_hypernet_input() -> None:
    model = StnLSTMLanguageModel(30, 6, 6, hdim=7).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("hyper_bottleneck"):
                p.normal_(0, 0.3)
    tokens, lam = torch.randint(0, 30, (8, 3)), torch.randn(3, 7)
    base = model(tokens, lam).logits
    lam2 = lam.clone()
    lam2[1] += 1.0
    moved = model(tokens, lam2).logits
    assert torch.equal(moved[:, 0], base[:, 0]) and torch.equal(moved[:, 2], base[:, 2])
    assert (moved[:, 1] - base[:, 1]).abs().max() > 1e-4


def test_parameter_groups_are_disjoint_and_complete() -> None:
    model = StnLSTMLanguageModel(30, 6, 6, hdim=7)
    general = {id(p) for p in model.general_parameters()}
    response = {id(p) for p in model.response_parameters()}
    assert not general & response
    assert general | response == {id(p) for p in model.parameters()}
    assert id(model.decoder.weight) in general and model.decoder.weight is model.encoder.weight


def test_zero_response_embedding_equals_lookup() -> None:
    emb = StnEmbedding(20, 5, hdim=2)
    _zero_response(emb)
    tokens = torch.randint(0, 20, (4, 3))
    torch.testing.assert_close(emb(tokens, torch.randn(3, 2)), F.embedding(tokens, emb.weight))


def test_missing_or_misshaped_hypernet_input_raises() -> None:
    layer = StnLSTM(3, 4, hdim=2)
    with pytest.raises(RuntimeError, match="hypernetwork input"):
        layer(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        layer(torch.randn(5, 2, 3), None, torch.randn(2, 3))
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(5, 2, 4), None, torch.randn(2, 2))


# -- each hyperparameter changes the computation it names ------------------------------------------------------
def _model_and_inputs() -> tuple[StnLSTMLanguageModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = StnLSTMLanguageModel(40, 16, 16, hdim=7).train()
    return model, torch.randint(0, 40, (12, 6)), torch.randn(6, 7)


def _capture_inputs(model: StnLSTMLanguageModel) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for rnn in model.rnns:
        rnn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    return seen


def test_dropconnect_rate_changes_the_recurrent_weights_used() -> None:
    layer = StnLSTM(5, 8, hdim=2).train()
    w0, r0 = layer.recurrent_weights(0.0)
    assert w0 is layer.weight_hh and r0 is layer.response_weight_hh
    w, r = layer.recurrent_weights(0.5, torch.Generator().manual_seed(0))
    dropped = w == 0
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(r == 0, dropped)  # one mask for the elementary and the response weights
    torch.testing.assert_close(w[~dropped], 2 * layer.weight_hh[~dropped])
    x, lam = torch.randn(6, 3, 5), torch.randn(3, 2)
    out0, _ = layer(x, None, lam, 0.0)
    out5, _ = layer(x, None, lam, 0.5, torch.Generator().manual_seed(0))
    assert (out0 - out5).abs().max() > 1e-3
    layer.eval()  # no DropConnect at evaluation
    assert layer.recurrent_weights(0.5)[0] is layer.weight_hh


def test_dropouti_masks_the_embedding_per_sequence_and_unit() -> None:
    model, tokens, lam = _model_and_inputs()
    seen = _capture_inputs(model)
    rates = dict.fromkeys(LM_HPARAMS, 0.0)
    model(tokens, lam, rates, torch.Generator().manual_seed(0))
    clean = seen[0]
    rates["dropouti"] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    model(tokens, lam, rates, torch.Generator().manual_seed(0))
    masked = seen[2]
    torch.testing.assert_close(masked[:, :3], clean[:, :3])  # rate 0 sequences untouched
    ratio = masked[:, 3:] / clean[:, 3:]
    assert torch.all((ratio.abs() < 1e-6) | ((ratio - 2).abs() < 1e-4))  # dropped or scaled by 1/(1-p)
    assert torch.equal(ratio[0] == 0, ratio[-1] == 0)  # locked: the same mask at every time step
    assert 0.3 < (ratio == 0).float().mean() < 0.7


def test_dropouth_masks_only_between_layers() -> None:
    model, tokens, lam = _model_and_inputs()
    seen = _capture_inputs(model)
    rates = dict.fromkeys(LM_HPARAMS, 0.0)
    a = model(tokens, lam, rates, torch.Generator().manual_seed(0))
    rates["dropouth"] = 0.5
    b = model(tokens, lam, rates, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[2], seen[0])  # first layer's input unchanged
    assert (seen[3] == 0).float().mean() > 0.3 and (seen[1] == 0).float().mean() == 0  # second layer's input masked
    assert not torch.allclose(a.raw, b.raw)


def test_dropouto_masks_only_the_output_per_sequence() -> None:
    model, tokens, lam = _model_and_inputs()
    rates = dict.fromkeys(LM_HPARAMS, 0.0)
    rates["dropouto"] = torch.tensor([0.0, 0.9, 0.0, 0.9, 0.0, 0.9])
    out = model(tokens, lam, rates, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.dropped[:, ::2], out.raw[:, ::2])
    assert (out.dropped[:, 1::2] == 0).float().mean() > 0.8
    torch.testing.assert_close(out.logits, model.decoder(out.dropped))
    model.eval()  # evaluation: no dropout whatever the rate
    ev = model(tokens, lam, rates)
    torch.testing.assert_close(ev.dropped, ev.raw)


def test_dropoute_drops_whole_words() -> None:
    emb = StnEmbedding(12, 4, hdim=2).train()
    tokens = torch.tensor([[1, 2, 3], [1, 5, 3], [7, 2, 1]])
    lam = torch.randn(3, 2)
    clean = emb(tokens, lam)
    out = emb(tokens, lam, 0.5, torch.Generator().manual_seed(4))
    scale = (out / clean)[..., 0]
    for w in tokens.unique():  # every occurrence of a word gets the same factor, 0 or 1/(1-p)
        factors = scale[tokens == w]
        assert torch.allclose(factors, factors[0].expand_as(factors))
        assert factors[0].item() == pytest.approx(0.0, abs=1e-6) or factors[0].item() == pytest.approx(2.0)
    mask = embedding_dropout_mask(1000, 0.3, torch.Generator().manual_seed(0))
    assert 0.25 < (mask == 0).float().mean() < 0.35
    torch.testing.assert_close(mask[mask > 0], torch.full_like(mask[mask > 0], 1 / 0.7))
    plain = embedding_lookup(emb.weight, tokens, 0.5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(plain, F.embedding(tokens, emb.weight) * (scale[..., None]))


def test_alpha_adds_exactly_alpha_times_mean_square_activation() -> None:
    model, tokens, lam = _model_and_inputs()
    targets = torch.randint(0, 40, tokens.shape)
    rates = dict.fromkeys(LM_HPARAMS, 0.1)
    out = model(tokens, lam, rates, torch.Generator().manual_seed(0))
    base, ce = lm_training_loss(out, targets, 0.0, 0.0)
    with_alpha, ce2 = lm_training_loss(out, targets, 0.7, 0.0)
    torch.testing.assert_close(with_alpha - base, 0.7 * out.dropped.pow(2).mean())
    torch.testing.assert_close(ce, ce2)
    torch.testing.assert_close(base, F.cross_entropy(out.logits.reshape(-1, 40), targets.reshape(-1)))


def test_beta_adds_exactly_beta_times_mean_square_difference() -> None:
    model, tokens, lam = _model_and_inputs()
    targets = torch.randint(0, 40, tokens.shape)
    out = model(tokens, lam, dict.fromkeys(LM_HPARAMS, 0.1), torch.Generator().manual_seed(0))
    base, _ = lm_training_loss(out, targets)
    with_beta, _ = lm_training_loss(out, targets, 0.0, 2.5)
    diff = out.raw[1:] - out.raw[:-1]
    torch.testing.assert_close(with_beta - base, 2.5 * diff.pow(2).mean())
    assert not torch.allclose(out.raw, out.dropped)  # TAR uses the raw, AR the dropped output


def test_per_batch_hyperparameters_use_one_value() -> None:
    """α, β, dropoute and wdrop are per batch: the model takes the first row of a per-example tensor."""
    model = StnLSTMLanguageModel(20, 4, 4, hdim=7)
    values = {"alpha": torch.tensor([0.3, 0.9]), "wdrop": torch.tensor([0.2, 0.8])}
    assert model.regularization_strengths(values)[0].item() == pytest.approx(0.3)
    assert model._value(values, "wdrop", True).item() == pytest.approx(0.2)
    flags = {h.name: h.per_example for h in lm_hyperparameters()}
    assert flags == {
        "alpha": False,
        "beta": False,
        "dropouto": True,
        "dropouti": True,
        "dropouth": True,
        "dropoute": False,
        "wdrop": False,
    }


# -- regularizer functions --------------------------------------------------------------------------------------
def test_locked_dropout_rates_carry_no_gradient() -> None:
    x = torch.randn(5, 4, 3, requires_grad=True)
    p = torch.full((4,), 0.5, requires_grad=True)
    y = locked_dropout(x, p, torch.Generator().manual_seed(0))
    y.sum().backward()
    assert p.grad is None and x.grad is not None
    with pytest.raises(ValueError, match="locked dropout rate"):
        locked_dropout(x, torch.tensor([0.1, 1.5, 0.1, 0.1]))
    with pytest.raises(ValueError, match=r"\(T, B, D\)"):
        locked_dropout(torch.randn(4, 3), 0.1)


def test_rate_validation_of_batch_regularizers() -> None:
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="DropConnect"):
        dropconnect_mask(w, float("nan"))
    with pytest.raises(ValueError, match="one rate per batch"):
        dropconnect_mask(w, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="embedding dropout"):
        embedding_dropout_mask(10, -0.1)


def test_activation_regularizers_match_definitions() -> None:
    h = torch.randn(6, 2, 3)
    torch.testing.assert_close(activation_regularization(h, 0.5), 0.5 * (h**2).mean())
    expected = 0.25 * sum(((h[t] - h[t - 1]) ** 2).sum() for t in range(1, 6)) / (5 * 2 * 3)
    torch.testing.assert_close(temporal_activation_regularization(h, 0.25), expected)


def test_carried_states_reset_on_gaps_and_new_batch_sizes() -> None:
    states = CarriedStates()
    st = [(torch.ones(2, 3, requires_grad=True) * 1.0, torch.zeros(2, 3))]
    states.put("train", 4, st)
    got = states.get("train", 5, 2)
    assert got is not None and not got[0][0].requires_grad
    assert states.get("train", 6, 2) is None  # a skipped window
    assert states.get("train", 0, 2) is None  # the stream restarted
    assert states.get("train", 5, 3) is None  # another batch size
    assert states.get("hyper", 5, 2) is None  # streams are separate
