"""STN layers: equivalence with plain layers, per-example independence, the converter and its context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperlit.nn.stn import StnConv2d, StnDropout, StnLinear, StnModel, convert_to_stn, stn_context


def _zero_response(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.response_weight.zero_()
        if layer.response_bias is not None:
            layer.response_bias.zero_()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 7)])
def test_linear_zero_response_equals_nn_linear(bias: bool, shape: tuple[int, ...]) -> None:
    plain = nn.Linear(7, 4, bias=bias)
    stn = StnLinear(7, 4, hdim=3, bias=bias)
    stn.load_state_dict(plain.state_dict(), strict=False)
    _zero_response(stn)
    x, h = torch.randn(shape), torch.randn(shape[0], 3) * 5
    torch.testing.assert_close(stn(x, h), plain(x), atol=1e-6, rtol=0)
    # V = 0 (pomonam init) is the other way to switch the response off
    stn2 = StnLinear(7, 4, hdim=3, bias=bias, v_init="zero")
    stn2.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(stn2(x, h), plain(x), atol=1e-6, rtol=0)


CONV_CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=0, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=2),
    dict(stride=2, padding=1, dilation=1, groups=4),
    dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="reflect"),
    dict(stride=1, padding="same", dilation=1, groups=1),
]


@pytest.mark.parametrize("kw", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_zero_response_equals_nn_conv2d(kw: dict, bias: bool) -> None:
    plain = nn.Conv2d(4, 8, 3, bias=bias, **kw)
    stn = StnConv2d(4, 8, 3, hdim=2, bias=bias, **kw)
    stn.load_state_dict(plain.state_dict(), strict=False)
    _zero_response(stn)
    x, h = torch.randn(3, 4, 9, 9), torch.randn(3, 2) * 5
    torch.testing.assert_close(stn(x, h), plain(x), atol=1e-6, rtol=0)


def test_linear_matches_materialized_per_example_weights() -> None:
    """y_b = (W + diag(s_b) W_h) x_b + b + s'_b ⊙ b_h with s = V λ̃_b (STN eq. 9)."""
    stn = StnLinear(6, 5, hdim=3)
    nn.init.normal_(stn.hyper_bottleneck)
    x, h = torch.randn(4, 6), torch.randn(4, 3)
    s = h @ stn.hyper_bottleneck.T
    w_b = stn.weight + s[:, :5, None] * stn.response_weight  # (B, D, in)
    b_b = stn.bias + s[:, 5:] * stn.response_bias
    expected = torch.einsum("boi,bi->bo", w_b, x) + b_b
    torch.testing.assert_close(stn(x, h), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_matches_materialized_per_example_weights(groups: int) -> None:
    stn = StnConv2d(4, 6, 3, hdim=2, stride=2, padding=1, groups=groups)
    nn.init.normal_(stn.hyper_bottleneck)
    x, h = torch.randn(3, 4, 8, 8), torch.randn(3, 2)
    s = h @ stn.hyper_bottleneck.T
    out = stn(x, h)
    for b in range(3):  # reference: one plain convolution per example with its own weights
        w = stn.weight + s[b, :6, None, None, None] * stn.response_weight
        bias = stn.bias + s[b, 6:] * stn.response_bias
        ref = F.conv2d(x[b : b + 1], w, bias, stride=2, padding=1, groups=groups)
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: StnLinear(6, 5, hdim=3), lambda: StnConv2d(3, 5, 3, hdim=3, padding=1)])
def test_output_of_example_depends_only_on_its_own_hnet_input(make) -> None:
    layer = make()
    nn.init.normal_(layer.hyper_bottleneck)
    x = torch.randn(4, 6) if isinstance(layer, StnLinear) else torch.randn(4, 3, 6, 6)
    h = torch.randn(4, 3)
    out = layer(x, h)
    h2 = h.clone()
    h2[[0, 2, 3]] += torch.randn(3, 3)  # change every row but example 1
    out2 = layer(x, h2)
    torch.testing.assert_close(out2[1], out[1], atol=0, rtol=0)
    assert not torch.allclose(out2[0], out[0])
    # and equals running example 1 alone
    torch.testing.assert_close(layer(x[1:2], h[1:2])[0], out[1], atol=1e-6, rtol=0)
    # the Jacobian of output b w.r.t. λ̃ is zero outside row b
    hh = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(layer(x, hh)[1].sum(), hh)
    assert g[[0, 2, 3]].abs().max() == 0 and g[1].abs().max() > 0


@pytest.mark.parametrize(
    "make", [lambda: StnLinear(6, 5, hdim=3, elem_scalar=True), lambda: StnConv2d(3, 5, 3, hdim=3, padding=1, groups=1)]
)
def test_shared_row_is_folded_into_one_weight_exactly(make) -> None:
    """A single λ̃ for the batch (a stride-0 expansion or one row) gives the per-example result and gradient."""
    layer = make()
    nn.init.normal_(layer.hyper_bottleneck)
    x = torch.randn(4, 6) if isinstance(layer, StnLinear) else torch.randn(4, 3, 6, 6)
    row = torch.randn(1, 3, requires_grad=True)
    per_example = layer(x, row.expand(4, -1).clone())  # materialized rows: the per-example path
    (g_ref,) = torch.autograd.grad(per_example.square().sum(), row)
    for h in (row.expand(4, -1), row):
        folded = layer(x, h)
        torch.testing.assert_close(folded, per_example, atol=1e-5, rtol=1e-5)
        (g,) = torch.autograd.grad(folded.square().sum(), row)
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_parameter_groups_partition_the_layer() -> None:
    for layer in (StnLinear(3, 2, hdim=2, elem_scalar=True), StnConv2d(2, 2, 3, hdim=2)):
        general = {id(p) for p in layer.general_parameters()}
        response = {id(p) for p in layer.response_parameters()}
        assert general.isdisjoint(response)
        assert general | response == {id(p) for p in layer.parameters()}
        assert id(layer.hyper_bottleneck) in response and id(layer.weight) in general


def test_v_init_options_and_errors() -> None:
    assert StnLinear(3, 2, hdim=4, v_init="zero").hyper_bottleneck.abs().max() == 0
    v = StnLinear(300, 300, hdim=50).hyper_bottleneck
    assert 0.008 < v.std().item() < 0.012  # N(0, 0.01²)
    with pytest.raises(ValueError, match="v_init"):
        StnLinear(3, 2, hdim=2, v_init="uniform")  # type: ignore[arg-type]
    layer = StnLinear(3, 2, hdim=2)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        layer(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="rows"):
        layer(torch.randn(4, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="hypernetwork input"):
        layer(torch.randn(4, 3))


def _plain_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8 * 4 * 4, 10),
    )


def test_convert_to_stn_copies_weights_and_matches_plain_model() -> None:
    plain = _plain_cnn().eval()
    net = convert_to_stn(plain, dropout_hparams={"2": "drop_conv", "6": "drop_fc"}, v_init="zero")
    assert isinstance(net, StnModel) and net.hdim == 2
    assert [type(m).__name__ for m in net.module] == [
        "StnConv2d", "ReLU", "StnDropout", "StnConv2d", "ReLU", "Flatten", "StnDropout", "StnLinear",
    ]  # fmt: skip
    assert net.hparam_names == ("drop_conv", "drop_fc")
    assert [h.name for h in net.default_hyperparameters()] == ["drop_conv", "drop_fc"]
    assert isinstance(plain[0], nn.Conv2d)  # the original is untouched
    x = torch.rand(5, 3, 8, 8)
    net.eval()
    torch.testing.assert_close(net(x, torch.randn(5, 2)), plain(x), atol=1e-6, rtol=0)
    # the context is cleared after the call
    assert all(getattr(m, "_hnet_context", None) is None for m in net.modules())


def test_converted_dropout_uses_per_example_rates_from_the_context() -> None:
    net = convert_to_stn(nn.Sequential(nn.Linear(4, 4000), nn.Dropout(0.5)), dropout_hparams={"1": "p"})
    net.train()
    x = torch.ones(3, 4)
    rates = torch.tensor([0.0, 0.5, 0.8])
    hnet = torch.zeros(3, 1)
    plain_out = net.module[0](x, hnet)
    out = net(x, hnet, {"p": rates}, generator=torch.Generator().manual_seed(0))
    zero_frac = (out == 0).float().mean(1) - (plain_out == 0).float().mean(1)
    torch.testing.assert_close(zero_frac, rates, atol=0.03, rtol=0)
    # without a value for its name the layer falls back to the plain model's rate
    out = net(x, hnet, {}, generator=torch.Generator().manual_seed(0))
    assert abs((out == 0).float().mean().item() - 0.5) < 0.03


def test_convert_errors() -> None:
    with pytest.raises(KeyError, match="not a submodule"):
        convert_to_stn(_plain_cnn(), dropout_hparams={"99": "p"})
    with pytest.raises(TypeError, match=r"not nn\.Dropout"):
        convert_to_stn(_plain_cnn(), dropout_hparams={"0": "p"})
    with pytest.raises(ValueError, match="hdim"):
        convert_to_stn(_plain_cnn())
    net = convert_to_stn(_plain_cnn(), hdim=3, skip=["7"])
    assert type(net.module[7]) is nn.Linear


def test_stn_context_installs_and_clears() -> None:
    model = nn.Sequential(StnLinear(3, 3, hdim=2), StnDropout("p"))
    h = torch.randn(2, 2)
    with stn_context(model, h, {"p": torch.zeros(2)}):
        assert model[0]._hnet_context is h
        model(torch.randn(2, 3))
    assert model[0]._hnet_context is None and model[1]._hparams_context is None
    with pytest.raises(RuntimeError), stn_context(model, h):
        raise RuntimeError("boom")
    assert model[0]._hnet_context is None
