"""BatchEnsemble and hyper-batch-ensemble layers: per-member loop oracles, closed-form penalties, converters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperlit.hparams import HyperparameterSpace
from hyperlit.nn.batch_ensemble import (
    BatchEnsembleConv2d,
    BatchEnsembleLinear,
    BatchEnsembleModel,
    HyperBatchEnsembleConv2d,
    HyperBatchEnsembleLinear,
    HyperBatchEnsembleModel,
    convert_to_batch_ensemble,
    convert_to_hyper_batch_ensemble,
    tile_members,
    untile_members,
)
from hyperlit.nn.stn import StnDropout, StnLayer

torch.set_num_threads(1)


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    """Random values everywhere (biases and response weights included) so that no term is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "scale" in name else 0.0))


def _conv_ref(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if layer.padding_mode != "zeros":
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode)
        return F.conv2d(x, w, b, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def test_tile_and_untile_are_member_major() -> None:
    x = torch.randn(3, 2, 4)
    t = tile_members(x, 4)
    torch.testing.assert_close(t, torch.cat([x] * 4), atol=0, rtol=0)
    u = untile_members(t, 4)
    assert u.shape == (4, 3, 2, 4) and u.data_ptr() == t.data_ptr()  # a view
    torch.testing.assert_close(u[2], x, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of ensemble_size=4"):
        untile_members(torch.randn(6, 2), 4)


# -- BatchEnsemble layers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (2, 7)])
def test_be_linear_equals_loop_over_members(k: int, rank: int, bias: bool, shape: tuple[int, ...]) -> None:
    layer = BatchEnsembleLinear(7, 5, k, bias=bias, rank=rank)
    _randomize(layer)
    n = 4
    x = torch.randn(k * n, *shape)
    out = layer(x)
    assert out.shape == (k * n, *shape[:-1], 5)
    for m in range(k):
        w = sum(
            layer.weight
            * torch.outer(layer.output_scale.view(rank, k, -1)[i, m], layer.input_scale.view(rank, k, -1)[i, m])
            for i in range(rank)
        )
        ref = F.linear(x[m * n : (m + 1) * n], w, layer.bias[m] if bias else None)
        torch.testing.assert_close(out[m * n : (m + 1) * n], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.member_weight(m), w, atol=1e-6, rtol=1e-6)


CONV_CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=0, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=2),
    dict(stride=2, padding=1, dilation=1, groups=4),
    dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="reflect"),
    dict(stride=1, padding=1, dilation=1, groups=2, padding_mode="circular"),
    dict(stride=1, padding="same", dilation=1, groups=1),
]


@pytest.mark.parametrize("kw", CONV_CASES)
@pytest.mark.parametrize(("k", "rank", "bias"), [(1, 1, True), (3, 1, False), (3, 2, True)])
def test_be_conv_equals_loop_over_members(kw: dict, k: int, rank: int, bias: bool) -> None:
    layer = BatchEnsembleConv2d(4, 8, 3, k, bias=bias, rank=rank, **kw)
    _randomize(layer)
    n = 2
    x = torch.randn(k * n, 4, 7, 7)
    out = layer(x)
    for m in range(k):
        ref = _conv_ref(layer, x[m * n : (m + 1) * n], layer.member_weight(m), layer.bias[m] if bias else None)
        torch.testing.assert_close(out[m * n : (m + 1) * n], ref, atol=1e-5, rtol=1e-5)


def test_be_conv_member_weight_is_the_elementwise_rank1_kernel() -> None:
    layer = BatchEnsembleConv2d(4, 6, 3, 2, groups=2)
    w = layer.member_weight(1)
    r, s = layer.input_scale[1], layer.output_scale[1]
    for o in range(6):  # output channel o sees input channels of its group
        grp = o // 3
        for j in range(2):
            torch.testing.assert_close(w[o, j], layer.weight[o, j] * s[o] * r[grp * 2 + j], atol=1e-6, rtol=0)


def test_be_with_unit_factors_equals_plain_layers() -> None:
    lin = nn.Linear(6, 4)
    be = BatchEnsembleLinear(6, 4, 1, fast_init="ones")
    with torch.no_grad():
        be.weight.copy_(lin.weight)
        be.bias.copy_(lin.bias[None])
    x = torch.randn(5, 6)
    torch.testing.assert_close(be(x), lin(x), atol=1e-6, rtol=0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    bec = BatchEnsembleConv2d(3, 5, 3, 1, stride=2, padding=1, fast_init="ones")
    with torch.no_grad():
        bec.weight.copy_(conv.weight)
        bec.bias.copy_(conv.bias[None])
    xi = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(bec(xi), conv(xi), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchEnsembleLinear(5, 4, 3, rank=2),
        lambda: BatchEnsembleConv2d(4, 6, 3, 3, padding=1, groups=2),
    ],
)
def test_be_gradients_equal_per_member_loop(make) -> None:
    layer = make()
    _randomize(layer, seed=1)
    x = torch.randn(6, 5) if isinstance(layer, BatchEnsembleLinear) else torch.randn(6, 4, 5, 5)
    target = torch.randn_like(layer(x))
    params = [layer.weight, layer.input_scale, layer.output_scale, layer.bias]
    g_vec = torch.autograd.grad((layer(x) - target).square().sum(), params)
    loss = 0.0
    for m in range(3):
        xm = x[2 * m : 2 * m + 2]
        if isinstance(layer, BatchEnsembleLinear):
            out = F.linear(xm, layer.member_weight(m), layer.bias[m])
        else:
            out = _conv_ref(layer, xm, layer.member_weight(m), layer.bias[m])
        loss = loss + (out - target[2 * m : 2 * m + 2]).square().sum()
    g_loop = torch.autograd.grad(loss, params)
    for a, b in zip(g_vec, g_loop):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fast_init_options_and_distinct_members() -> None:
    g = torch.Generator().manual_seed(0)
    layer = BatchEnsembleLinear(200, 300, 4)
    layer.reset_parameters(generator=g)
    r = layer.input_scale.detach()
    assert abs(r.mean().item() - 1.0) < 0.05 and abs(r.std().item() - 0.5) < 0.05  # N(1, 0.5²)
    x = tile_members(torch.randn(3, 200), 4)
    out = untile_members(layer(x), 4)
    assert (out[0] - out[1]).abs().max() > 0.1  # default init: distinct members (§6.2 pitfall)
    sign = BatchEnsembleLinear(100, 200, 4, fast_init="random_sign", fast_init_scale=0.7)
    vals = torch.cat([sign.input_scale.flatten(), sign.output_scale.flatten()])
    assert set(vals.unique().tolist()) == {-1.0, 1.0}
    assert abs((vals > 0).float().mean().item() - 0.7) < 0.05
    ones = BatchEnsembleConv2d(3, 4, 3, 3, fast_init="ones")
    with torch.no_grad():
        ones.bias.copy_(torch.randn(3, 4))
    out = untile_members(ones(tile_members(torch.randn(2, 3, 5, 5), 3)), 3)
    diff = out[1] - out[0]  # members differ only by their bias
    torch.testing.assert_close(diff, (ones.bias[1] - ones.bias[0]).view(1, 4, 1, 1).expand_as(diff), atol=1e-5, rtol=0)
    # same generator seed → same parameters
    a, b = BatchEnsembleLinear(4, 3, 2), BatchEnsembleLinear(4, 3, 2)
    a.reset_parameters(torch.Generator().manual_seed(5))
    b.reset_parameters(torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.state_dict(), b.state_dict(), atol=0, rtol=0)


def test_be_errors_and_parameter_groups() -> None:
    layer = BatchEnsembleLinear(3, 2, 4)
    with pytest.raises(ValueError, match="6 rows, which is not a multiple of ensemble_size=4"):
        layer(torch.randn(6, 3))
    with pytest.raises(ValueError, match="not a multiple"):
        BatchEnsembleConv2d(3, 2, 3, 4)(torch.randn(5, 3, 6, 6))
    with pytest.raises(ValueError, match="fast_init"):
        BatchEnsembleLinear(3, 2, 4, fast_init="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="P\\(\\+1\\)"):
        BatchEnsembleLinear(3, 2, 4, fast_init="random_sign", fast_init_scale=1.5)
    fast = {id(p) for p in layer.fast_parameters()}
    slow = {id(p) for p in layer.slow_parameters()}
    assert fast.isdisjoint(slow) and fast | slow == {id(p) for p in layer.parameters()}
    assert layer.weight.shape == nn.Linear(3, 2).weight.shape
    assert BatchEnsembleLinear(3, 2, 4, rank=2).input_scale.shape == (2, 4, 3)
    assert "ensemble_size=4" in repr(layer)


# -- converter -------------------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def _member_copy(model: nn.Module, net: BatchEnsembleModel, k: int) -> nn.Module:
    """An explicit plain network for member ``k``: kernels ``member_weight(k)``, biases ``b_k``."""
    plain = copy.deepcopy(model)
    layers = dict(net.module.named_modules())
    with torch.no_grad():
        for path, m in plain.named_modules():
            if type(m) in (nn.Linear, nn.Conv2d):
                be = layers[path]
                m.weight.copy_(be.member_weight(k))
                m.bias.copy_(be.bias[k])
    return plain


@pytest.mark.parametrize(("make", "shape"), [(_mlp, (5, 6)), (_cnn, (3, 3, 8, 8))])
def test_converted_members_equal_separate_plain_networks(make, shape) -> None:
    model = make()
    net = convert_to_batch_ensemble(model, 3, seed=1)
    assert isinstance(model[0], (nn.Linear, nn.Conv2d))  # the source is untouched
    with torch.no_grad():
        for layer in net.batch_ensemble_layers():
            layer.bias.add_(torch.randn_like(layer.bias))  # members with distinct biases too
    x = torch.randn(shape)
    out = net.member_outputs(x)
    assert out.shape[:2] == (3, shape[0])
    for k in range(3):
        torch.testing.assert_close(out[k], _member_copy(model, net, k)(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(tile_members(x, 3)), out.flatten(0, 1), atol=0, rtol=0)


def test_convert_copies_weights_and_is_deterministic() -> None:
    model = _cnn().double()
    net = convert_to_batch_ensemble(model, 2, skip=["5"], seed=3, fast_init="ones")
    assert type(net.module[5]) is nn.Linear and type(net.module[0]) is BatchEnsembleConv2d
    assert net.module[0].weight.dtype == torch.float64
    torch.testing.assert_close(net.module[0].weight, model[0].weight, atol=0, rtol=0)
    torch.testing.assert_close(net.module[0].bias, model[0].bias.expand(2, -1), atol=0, rtol=0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(net.member_outputs(x), model(x).expand(2, -1, -1), atol=1e-10, rtol=0)
    a, b = convert_to_batch_ensemble(model, 2, seed=3), convert_to_batch_ensemble(model, 2, seed=3)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), atol=0, rtol=0)
    c = convert_to_batch_ensemble(model, 2, seed=4)
    assert not torch.equal(a.module[0].input_scale, c.module[0].input_scale)
    fast, slow = {id(p) for p in a.fast_parameters()}, {id(p) for p in a.slow_parameters()}
    assert fast.isdisjoint(slow) and fast | slow == {id(p) for p in a.parameters()}
    assert id(a.module[0].weight) in slow and id(a.module[0].input_scale) in fast
    with pytest.raises(KeyError, match="not a submodule"):
        convert_to_batch_ensemble(model, 2, skip=["99"])


def test_batchnorm_model_converts_and_keeps_bn_slow() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net = convert_to_batch_ensemble(model, 2)
    slow = {id(p) for p in net.slow_parameters()}
    assert id(net.module[1].weight) in slow and id(net.module[1].bias) in slow
    assert net.member_outputs(torch.randn(3, 3, 6, 6)).shape == (2, 3, 4, 4, 4)


# -- hyper-batch layers ----------------------------------------------------------------------------------------------


def _hbe_linear_ref(layer: HyperBatchEnsembleLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Reference §2.1 per row with explicit kernels ``W ⊙ s rᵀ`` and ``W' ⊙ v uᵀ``."""
    k, d = layer.ensemble_size, layer.out_features
    n = x.shape[0] // k
    u = layer.input_scale if layer.tie_fast_weights else layer.response_input_scale
    v = layer.output_scale if layer.tie_fast_weights else layer.response_output_scale
    rows = []
    for i in range(x.shape[0]):
        m = i // n
        e = layer.hyper_bottleneck @ h[i]
        w = layer.weight * torch.outer(layer.output_scale[m], layer.input_scale[m])
        wr = layer.response_weight * torch.outer(v[m], u[m])
        y = w @ x[i] + e[:d] * (wr @ x[i])
        if layer.bias is not None:
            y = y + layer.bias[m] + e[d:] * layer.response_bias[m]
        rows.append(y)
    return torch.stack(rows)


def _hbe_conv_ref(layer: HyperBatchEnsembleConv2d, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k, d = layer.ensemble_size, layer.out_channels
    n = x.shape[0] // k
    u = layer.input_scale if layer.tie_fast_weights else layer.response_input_scale
    v = layer.output_scale if layer.tie_fast_weights else layer.response_output_scale
    g, cg = layer.groups, layer.in_channels // layer.groups
    rows = []
    for i in range(x.shape[0]):
        m = i // n
        e = layer.hyper_bottleneck @ h[i]

        def kernel(w, r, s, m=m):
            rin = r[m].view(g, cg).repeat_interleave(d // g, 0)  # (C_out, C_in/g)
            return w * (s[m][:, None] * rin)[:, :, None, None]

        w = kernel(layer.weight, layer.input_scale, layer.output_scale)
        wr = kernel(layer.response_weight, u, v)
        w_i = w + e[:d, None, None, None] * wr
        b_i = layer.bias[m] + e[d:] * layer.response_bias[m] if layer.bias is not None else None
        rows.append(_conv_ref(layer, x[i : i + 1], w_i, b_i)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_hbe_linear_equals_loop_formula(tie: bool, bias: bool) -> None:
    layer = HyperBatchEnsembleLinear(5, 4, 3, hdim=2, bias=bias, tie_fast_weights=tie)
    _randomize(layer, seed=2)
    x, h = torch.randn(6, 5), torch.randn(6, 2)
    torch.testing.assert_close(layer(x, h), _hbe_linear_ref(layer, x, h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(
    "kw", [dict(padding=1), dict(stride=2, groups=2, bias=False), dict(padding=1, padding_mode="replicate")]
)
def test_hbe_conv_equals_loop_formula(tie: bool, kw: dict) -> None:
    layer = HyperBatchEnsembleConv2d(4, 6, 3, 2, hdim=3, tie_fast_weights=tie, **kw)
    _randomize(layer, seed=3)
    x, h = torch.randn(4, 4, 6, 6), torch.randn(4, 3)
    torch.testing.assert_close(layer(x, h), _hbe_conv_ref(layer, x, h), atol=1e-5, rtol=1e-5)


def _be_twin(hbe: nn.Module) -> nn.Module:
    if isinstance(hbe, HyperBatchEnsembleLinear):
        be = BatchEnsembleLinear(hbe.in_features, hbe.out_features, hbe.ensemble_size, bias=hbe.bias is not None)
    else:
        be = BatchEnsembleConv2d(
            hbe.in_channels, hbe.out_channels, hbe.kernel_size, hbe.ensemble_size, hbe.stride, hbe.padding,
            hbe.dilation, hbe.groups, hbe.bias is not None, hbe.padding_mode,
        )  # fmt: skip
    be.load_state_dict(hbe.state_dict(), strict=False)
    return be


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: HyperBatchEnsembleLinear(5, 4, 3, hdim=2, **kw),
        lambda **kw: HyperBatchEnsembleConv2d(4, 6, 3, 3, hdim=2, padding=1, groups=2, **kw),
    ],
)
def test_hbe_zero_response_equals_batch_ensemble(make) -> None:
    layer = make(tie_fast_weights=False)
    _randomize(layer, seed=4)
    be = _be_twin(layer)
    x = torch.randn(6, 5) if isinstance(layer, HyperBatchEnsembleLinear) else torch.randn(6, 4, 5, 5)
    h = torch.randn(6, 2) * 3
    assert not torch.allclose(layer(x, h), be(x))
    with torch.no_grad():
        layer.response_weight.zero_()
        layer.response_bias.zero_()
    torch.testing.assert_close(layer(x, h), be(x), atol=1e-6, rtol=0)
    layer2 = make(v_init="zero")  # V = 0 switches the response off as well
    _randomize(layer2, seed=5)
    with torch.no_grad():
        layer2.hyper_bottleneck.zero_()
    torch.testing.assert_close(layer2(x, h), _be_twin(layer2)(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: HyperBatchEnsembleLinear(5, 4, 3, hdim=2),
        lambda: HyperBatchEnsembleConv2d(4, 6, 3, 3, hdim=2, groups=2),
        lambda: HyperBatchEnsembleLinear(5, 4, 3, hdim=2, bias=False),
    ],
)
def test_hbe_penalties_equal_naive_loop_and_reach_all_weights(make) -> None:
    layer = make()
    _randomize(layer, seed=6)
    h = torch.randn(6, 2)
    d = layer.out_dim
    e = h @ layer.hyper_bottleneck.T
    ksq, bsq = [], []
    for i in range(6):
        q = layer.weight + e[i, :d].view(-1, *[1] * (layer.weight.dim() - 1)) * layer.response_weight
        ksq.append(q.square().sum())
        m = i // 2
        if layer.bias is not None:
            bsq.append((layer.bias[m] + e[i, d:] * layer.response_bias[m]).square().sum())
        else:
            bsq.append(torch.zeros(()))
    torch.testing.assert_close(layer.kernel_sq_norm(h), torch.stack(ksq), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(layer.bias_sq_norm(h), torch.stack(bsq), atol=1e-5, rtol=1e-6)
    total = (layer.kernel_sq_norm(h) + layer.bias_sq_norm(h)).sum()
    params = [layer.weight, layer.response_weight, layer.hyper_bottleneck]
    if layer.bias is not None:
        params += [layer.bias, layer.response_bias]
    grads = torch.autograd.grad(total, params)
    assert all(g.abs().max() > 0 for g in grads)
    # the naive per-row kernels give the same gradients
    naive = sum(ksq) + sum(bsq)
    for a, b in zip(grads, torch.autograd.grad(naive, params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_hbe_parameter_groups_and_errors() -> None:
    for tie in (True, False):
        layer = HyperBatchEnsembleConv2d(2, 4, 3, 2, hdim=2, tie_fast_weights=tie)
        assert isinstance(layer, StnLayer)
        general = {id(p) for p in layer.general_parameters()}
        response = {id(p) for p in layer.response_parameters()}
        assert general.isdisjoint(response) and general | response == {id(p) for p in layer.parameters()}
        assert id(layer.input_scale) in general and id(layer.hyper_bottleneck) in response
        fast = {id(p) for p in layer.fast_parameters()}
        expected = [layer.input_scale, layer.output_scale, layer.bias, layer.response_bias]
        if not tie:
            expected += [layer.response_input_scale, layer.response_output_scale]
        assert fast == {id(p) for p in expected}
    layer = HyperBatchEnsembleLinear(3, 2, 2, hdim=2)
    x, row = torch.randn(4, 3), torch.randn(1, 2)  # one hypernet row serves every row
    torch.testing.assert_close(layer(x, row), layer(x, row.expand(4, -1).clone()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of ensemble_size=2"):
        layer(torch.randn(3, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        layer(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="hypernetwork input"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="fast_init"):
        HyperBatchEnsembleLinear(3, 2, 2, hdim=2, fast_init="zeros")  # type: ignore[arg-type]


# -- hyper-batch converter ------------------------------------------------------------------------------------------


def _drop_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def test_convert_to_hyper_batch_ensemble_defaults_and_zero_response() -> None:
    model = _drop_mlp()
    net = convert_to_hyper_batch_ensemble(model, 2, dropout_hparams={"2": "drop"}, seed=0)
    assert isinstance(net, HyperBatchEnsembleModel) and net.ensemble_size == 2
    assert net.hparam_names == ("l2_0", "l2_3", "drop") and net.hdim == 3 and net._hdim_auto
    assert type(net.module[2]) is StnDropout and type(net.module[0]) is HyperBatchEnsembleLinear
    hps = net.default_hyperparameters()
    assert [h.name for h in hps] == ["l2_0", "l2_3", "drop"]
    assert math.isclose(hps[0].init, 99.9 / math.log(1000.0)) and hps[0].transform == "log"
    assert hps[2].init == 0.3 and (hps[2].low, hps[2].high) == (0.0, 0.9)
    HyperparameterSpace(hps)  # a valid space
    # zero response: the BatchEnsemble conversion with the same seed-independent W, b and the same r, s
    be = convert_to_batch_ensemble(model, 2)
    with torch.no_grad():
        for path in ("0", "3"):
            hl, bl = net.module.get_submodule(path), be.module.get_submodule(path)
            hl.response_weight.zero_()
            hl.response_bias.zero_()
            bl.input_scale.copy_(hl.input_scale)
            bl.output_scale.copy_(hl.output_scale)
    net.eval(), be.eval()
    x = tile_members(torch.randn(4, 6), 2)
    torch.testing.assert_close(net(x, torch.randn(8, 3)), be(x), atol=1e-6, rtol=0)
    assert all(getattr(m, "_hnet_context", None) is None for m in net.modules())
    # deterministic, and the source model is untouched
    again = convert_to_hyper_batch_ensemble(model, 2, dropout_hparams={"2": "drop"}, seed=0)
    torch.testing.assert_close(again.module[0].input_scale, convert_to_hyper_batch_ensemble(
        model, 2, dropout_hparams={"2": "drop"}, seed=0).module[0].input_scale, atol=0, rtol=0)  # fmt: skip
    assert type(model[0]) is nn.Linear


def test_hbe_model_penalty_is_the_weighted_sum_of_layer_norms() -> None:
    model = _drop_mlp()
    net = convert_to_hyper_batch_ensemble(model, 2, l2_hparams={"0": "l2", "3": "l2"}, l2_init=2.0, hdim=4)
    assert net.hparam_names == ("l2",) and net.hdim == 4 and not net._hdim_auto
    h = torch.randn(6, 4)
    lam = torch.rand(6) + 0.5
    net.penalty_scale = 0.1
    layers = [net.module[0], net.module[3]]
    ref = 0.1 * lam * sum(m.kernel_sq_norm(h) + m.bias_sq_norm(h) for m in layers)
    torch.testing.assert_close(net.penalty(h, {"l2": lam}), ref, atol=1e-5, rtol=1e-6)
    # a name that is not tuned falls back to its default value
    torch.testing.assert_close(net.penalty(h, {}), ref / lam * 2.0, atol=1e-4, rtol=1e-5)
    fast = {id(p) for p in net.fast_parameters()}
    assert id(net.module[0].input_scale) in fast and id(net.module[3].response_bias) in fast
    assert id(net.module[0].weight) not in fast
    net.set_hdim(2)
    assert net.module[0].hyper_bottleneck.shape == (16, 2)


def test_hbe_converter_errors_and_skip() -> None:
    model = _drop_mlp()
    with pytest.raises(KeyError, match="not a submodule"):
        convert_to_hyper_batch_ensemble(model, 2, skip=["9"])
    with pytest.raises(KeyError, match="not a submodule"):
        convert_to_hyper_batch_ensemble(model, 2, l2_hparams={"7": "a"})
    with pytest.raises(TypeError, match="not replaced"):
        convert_to_hyper_batch_ensemble(model, 2, l2_hparams={"2": "a"})
    with pytest.raises(TypeError, match=r"not nn\.Dropout"):
        convert_to_hyper_batch_ensemble(model, 2, dropout_hparams={"0": "a"})
    with pytest.raises(ValueError, match="both"):
        convert_to_hyper_batch_ensemble(model, 2, l2_hparams={"0": "a"}, dropout_hparams={"2": "a"})
    with pytest.raises(ValueError, match="hdim"):
        convert_to_hyper_batch_ensemble(model, 2, l2_hparams={})
    net = convert_to_hyper_batch_ensemble(model, 2, skip=["3"])
    assert type(net.module[3]) is nn.Linear and net.hparam_names == ("l2_0",)


def test_self_tuning_module_accepts_the_converted_model() -> None:
    from hyperlit.tuning.stn import SelfTuningModule

    net = convert_to_hyper_batch_ensemble(_drop_mlp(), 2, dropout_hparams={"2": "drop"})
    module = SelfTuningModule(net, tune=["l2_0", "drop"])
    assert net.hdim == 2 and net.module[0].hyper_bottleneck.shape[1] == 2
    x, y = tile_members(torch.randn(3, 6), 2), torch.randint(0, 3, (3,)).repeat(2)
    lam = module.space.perturb(6)
    loss = module.train_loss((x, y), lam)
    assert loss.dim() == 0 and torch.isfinite(loss)
