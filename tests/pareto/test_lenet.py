"""PHNLeNet (PHN's Multi-MNIST target): the official layer list and weight count, no ReLU after the 50-unit layer,
generated weights under ``torch.func``, and PHN-LS / PHN-EPO over it on a tiny generated Multi-MNIST."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from datamodules.multi_mnist import MultiMNISTDataModule
from hyperlit.models.lenet import PHNLeNet
from hyperlit.nn import HyperNetwork, batched_call
from hyperlit.pareto import ParetoHyperNetModule
from tests.fakedata import write_fake_mnist

# PHN experiments/multimnist/models.py LeNetTarget / LeNetHyper([9, 5]) (phn.md §1.2-1.3): conv0, conv1, hidden0,
# task0, task1 — weights then biases
OFFICIAL_SHAPES = [[10, 1, 9, 9], [10], [20, 10, 5, 5], [20], [50, 500], [50], [10, 50], [10], [10, 50], [10]]


def test_layers_and_weight_count_are_the_official_ones() -> None:
    net = PHNLeNet()
    assert [list(p.shape) for p in net.parameters()] == OFFICIAL_SHAPES
    count = sum(math.prod(s) for s in OFFICIAL_SHAPES)
    assert count == 31_910 and sum(p.numel() for p in net.parameters()) == count  # phn.md §1.2
    assert net.conv0.kernel_size == (9, 9) and net.conv1.kernel_size == (5, 5)
    assert sum(p.numel() for p in PHNLeNet(num_tasks=3).parameters()) == count + 510


def test_forward_is_the_layer_list_without_relu_after_the_hidden_layer() -> None:
    net = PHNLeNet().eval()
    x = torch.rand(4, 1, 36, 36)
    h = F.max_pool2d(torch.relu(F.conv2d(x, net.conv0.weight, net.conv0.bias)), 2)
    h = F.max_pool2d(torch.relu(F.conv2d(h, net.conv1.weight, net.conv1.bias)), 2)
    assert h.shape == (4, 20, 5, 5)
    z = h.reshape(4, 500) @ net.hidden0.weight.T + net.hidden0.bias
    assert (z < 0).any()  # a ReLU here would change the outputs
    expected = torch.stack([z @ head.weight.T + head.bias for head in net.heads], dim=1)
    out = net(x)
    assert out.shape == (4, 2, 10)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(net.features(x), z)
    torch.testing.assert_close(net(x.reshape(4, -1)), out)  # flat rows are 36×36 planes


def test_bad_inputs_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"expects inputs \(B, 1, 36, 36\), got \(2, 1, 28, 28\)"):
        PHNLeNet()(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="too small"):
        PHNLeNet(image_size=16)
    with pytest.raises(ValueError, match="num_tasks >= 1"):
        PHNLeNet(num_tasks=0)
    assert PHNLeNet(in_channels=3, image_size=28)(torch.rand(2, 3, 28, 28)).shape == (2, 2, 10)


def test_generated_weights_under_vmap_equal_one_call_per_set() -> None:
    net = PHNLeNet()
    hnet = HyperNetwork(net, 2, hidden=(100, 100))
    rays = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    weights = hnet(rays)
    x = torch.rand(5, 1, 36, 36)
    out = batched_call(net, weights, x)
    assert out.shape == (3, 5, 2, 10)
    for k in range(3):
        torch.testing.assert_close(out[k], functional_call(net, {n: w[k] for n, w in weights.items()}, (x,)))


def test_hypernet_parameter_counts() -> None:
    """PHN's LeNetHyper: ray MLP 2→100→100→100 (no activation at the end), one Linear(100, numel) head per target
    tensor: 3,243,410 (phn.md §1.2). Ours folds that last linear layer into the heads (same function class)."""
    net = PHNLeNet()
    numel = sum(p.numel() for p in net.parameters())
    official = (2 * 100 + 100) + 2 * (100 * 100 + 100) + sum(100 * math.prod(s) + math.prod(s) for s in OFFICIAL_SHAPES)
    assert official == 3_243_410
    folded = (2 * 100 + 100) + (100 * 100 + 100) + (100 * numel + numel)
    assert HyperNetwork(net, 2, hidden=(100, 100)).num_parameters() == folded == official - 10_100


@pytest.fixture(scope="module")
def tiny_multi_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("mm"), n_train=40, n_test=12)


@pytest.mark.parametrize("solver", ["ls", "epo"])
def test_phn_trains_and_validates_over_the_lenet(solver: str, tiny_multi_mnist: Path, make_trainer) -> None:
    dm = MultiMNISTDataModule(data_dir=str(tiny_multi_mnist), batch_size=16, cache=False)
    model = ParetoHyperNetModule(
        target=PHNLeNet(), objectives=("ce_0", "ce_1"), solver=solver, ref_point=(2.0, 2.0), eval_metric="relaxed"
    )
    assert model.hnet is not None
    before = [p.detach().clone() for p in model.hnet.parameters()]
    trainer = make_trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1 and int(model.ray_step) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.hnet.parameters()))
    front = model.last_front  # the validation pass after the epoch: 25 test rays, CE of both tasks
    assert front is not None and front.losses.shape == (25, 2) and front.names == ("ce_0", "ce_1")
    assert torch.isfinite(front.losses).all() and (front.losses > 0).all()
    assert front.ref_point == (2.0, 2.0)
    rays = front.rays.numpy()
    np.testing.assert_allclose(rays.sum(1), 1.0, rtol=1e-6)
    theta = np.arctan2(rays[:, 1], rays[:, 0])  # circle_points(25, 0.1, π/2 − 0.1), renormalised to sum 1
    np.testing.assert_allclose(np.sort(theta), np.linspace(0.1, np.pi / 2 - 0.1, 25), atol=1e-5)
    logged = trainer.callback_metrics
    assert "val/hv" in logged and "val/ce_0_mean" in logged
