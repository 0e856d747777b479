"""The WRN of the ensemble papers (:class:`~hyperlit.models.wide_resnet.WideResNet`) and the plain small CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlit.models.small_cnn import SmallCNN
from hyperlit.models.stn_cnn import StnSmallCNN
from hyperlit.models.wide_resnet import WideResNet
from hyperlit.nn.batch_ensemble import BatchEnsembleConv2d, BatchEnsembleLinear, convert_to_batch_ensemble


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _wrn_count(depth: int, width: int, classes: int = 10) -> int:
    """Closed-form parameter count of the pre-activation WRN (no conv biases, 1×1 shortcuts where shapes change)."""
    n, widths = (depth - 4) // 6, [16 * width, 32 * width, 64 * width]
    total, chans = 3 * 16 * 9, 16  # the input conv
    for w, stride in zip(widths, (1, 2, 2)):
        for b in range(n):
            c_in = chans if b == 0 else w
            total += 2 * c_in + c_in * w * 9 + 2 * w + w * w * 9  # bn1, conv1, bn2, conv2
            if b == 0 and (c_in != w or stride != 1):
                total += c_in * w  # the 1×1 shortcut
        chans = w
    return total + 2 * chans + chans * classes + classes  # final bn, fc


def test_wrn_28_10_has_the_published_parameter_count() -> None:
    # Zagoruyko & Komodakis (2016) and the UB README give "36.5M" for WRN-28-10: a figure rounded to 0.1M, so the
    # exact count must lie within its rounding interval [36.45M, 36.55M).
    with torch.device("meta"):  # counts shapes without allocating the 146 MB of weights
        model = WideResNet(28, 10)
    count = _count(model)
    assert count == _wrn_count(28, 10)
    assert 36.45e6 <= count < 36.55e6, count
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1 + 3 * 4 * 2 + 3  # convs + 3 shortcuts


def test_wrn_output_shape_and_small_counts() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=2, num_classes=7)
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 7)
    assert _count(model) == _wrn_count(10, 2, 7)
    assert _count(WideResNet(16, 4)) == _wrn_count(16, 4)


def test_wrn_is_pre_activation() -> None:
    """A block's output is ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))`` (identity shortcut inside a group)."""
    torch.manual_seed(1)
    model = WideResNet(depth=16, width=1).eval()
    block = model.groups[0][1]
    assert block.shortcut is None
    x = torch.randn(2, 16, 8, 8)
    bn1, bn2 = block.bn1, block.bn2
    expected = x + block.conv2(torch.relu(bn2(block.conv1(torch.relu(bn1(x))))))
    torch.testing.assert_close(block(x), expected)


def test_wrn_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="depth must be 6·n \\+ 4"):
        WideResNet(depth=27)


def test_batch_ensemble_wrn_keeps_batchnorm_shared() -> None:
    torch.manual_seed(2)
    model = WideResNet(depth=10, width=1)
    k = 3
    be = convert_to_batch_ensemble(model, k, fast_init="ones")
    bns = [m for m in be.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(bn.weight.shape == (bn.num_features,) and bn.running_mean.shape == (bn.num_features,) for bn in bns)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in be.modules())
    assert (
        sum(isinstance(m, (BatchEnsembleConv2d, BatchEnsembleLinear)) for m in be.modules()) == 1 + 3 * 2 + 2 + 1
    )  # no shortcut in group 0
    x = torch.rand(4, 3, 32, 32)
    # r = s = 1: every member is the plain network, also in train mode (the tiled batch has the plain batch's
    # statistics, and the shared running statistics are updated as the plain network's are)
    out = be.member_outputs(x)
    plain = model(x)
    assert out.shape == (k, 4, 10)
    for member in range(k):
        torch.testing.assert_close(out[member], plain, rtol=1e-4, atol=1e-5)
    plain_bn = model.groups[0][0].bn1
    torch.testing.assert_close(bns[0].running_mean, plain_bn.running_mean)
    # running variances differ only by Bessel's correction n / (n − 1), n = rows · H · W (3 times more rows tiled)
    m, n_plain, n_tiled = plain_bn.momentum, 4 * 32 * 32, k * 4 * 32 * 32
    biased = (plain_bn.running_var - (1 - m)) / m * (n_plain - 1) / n_plain
    torch.testing.assert_close(bns[0].running_var, (1 - m) + m * biased * n_tiled / (n_tiled - 1))
    plain_bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    for shared, bn in zip(bns, plain_bns):
        shared.load_state_dict(bn.state_dict())
    be.eval(), model.eval()
    torch.testing.assert_close(be.member_outputs(x)[1], model(x), rtol=1e-4, atol=1e-5)


def test_small_cnn_shape_and_equals_the_stn_cnn_at_zero_response() -> None:
    torch.manual_seed(3)
    plain = SmallCNN()
    assert plain(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert _count(plain) == (3 * 10 * 9 + 10) + (10 * 20 * 9 + 20) + (20 * 40 * 9 + 40) + (40 * 16 * 10 + 10)
    stn = StnSmallCNN(hdim=2).eval()
    with torch.no_grad():
        for conv, stn_conv in zip(plain.convs, stn.convs):
            stn_conv.weight.copy_(conv.weight)
            stn_conv.bias.copy_(conv.bias)
            for name, p in stn_conv.named_parameters():
                if name not in ("weight", "bias"):
                    p.zero_()
        stn.fc.load_state_dict(plain.fc.state_dict())
    x = torch.rand(5, 3, 32, 32)
    torch.testing.assert_close(plain(x), stn(x, torch.randn(5, 2)))
    assert SmallCNN(filters=(4, 8, 16), image_size=16)(torch.rand(1, 3, 16, 16)).shape == (1, 10)
    with pytest.raises(ValueError, match="divisible by 8"):
        SmallCNN(image_size=12)
