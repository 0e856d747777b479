"""ZenkeNet (the paper's SplitCIFAR target): shape contract, the official weight count, and training as the target of
the continual learners (generated weights under ``torch.func``, online EWC) on generated CIFAR batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from datamodules import SplitCIFAR10DataModule
from hyperlit.continual.baselines import EWCContinualModule
from hyperlit.continual.module import HyperContinualModule
from hyperlit.models import ZenkeNet
from tests.continual.conftest import adam, optimizers
from tests.fakedata import write_fake_cifar

Trainers = Callable[..., pl.Trainer]

# chrhenning/hypercl mnets/zenkenet.py, ZenkeNet._architectures["cifar"] with 60 outputs (6 heads × 10)
OFFICIAL_SHAPES = [
    [32, 3, 3, 3], [32], [32, 32, 3, 3], [32], [64, 32, 3, 3], [64],
    [64, 64, 3, 3], [64], [512, 2304], [512], [60, 512], [60],
]  # fmt: skip


def test_layers_and_weight_count_are_the_official_ones() -> None:
    net = ZenkeNet(60)
    assert [list(p.shape) for p in net.parameters()] == OFFICIAL_SHAPES
    assert sum(p.numel() for p in net.parameters()) == 1_276_508  # cl.md §2.3 (6 heads × 10)
    assert sum(math.prod(s) for s in OFFICIAL_SHAPES) == 1_276_508
    assert (net.conv1.padding, net.conv2.padding, net.conv3.padding, net.conv4.padding) == (
        (1, 1),
        (0, 0),
        (1, 1),
        (0, 0),
    )
    assert net.drop_conv.p == 0.25 and net.drop_fc.p == 0.5 and isinstance(net.drop_conv, nn.Dropout2d)


def test_output_shape_for_images_and_flat_inputs() -> None:
    net = ZenkeNet(10).eval()
    x = torch.rand(3, 3, 32, 32)
    out = net(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(net(x.reshape(3, -1)), out)  # flat rows are channel planes (CIFAR's pickle layout)
    gray = ZenkeNet(4, in_channels=1, image_size=28, dropout_rate=0.0)
    assert gray(torch.rand(2, 1, 28, 28)).shape == (2, 4) and gray.fc.in_features == 64 * 5 * 5
    with pytest.raises(ValueError, match=r"expects inputs \(B, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        net(torch.rand(2, 3, 28, 28))


def test_dropout_only_in_training_mode() -> None:
    net = ZenkeNet(10)
    x = torch.rand(4, 3, 32, 32)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    plain = ZenkeNet(10, dropout_rate=0.0).train()
    assert torch.equal(plain(x), plain(x))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 0.5\]"):
        ZenkeNet(10, dropout_rate=0.6)
    with pytest.raises(ValueError, match="num_outputs and in_channels must be >= 1"):
        ZenkeNet(0)
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        ZenkeNet(10, image_size=8)


@pytest.fixture
def cifar_tasks(tmp_path) -> SplitCIFAR10DataModule:
    write_fake_cifar(tmp_path, per_batch=40, files=["data_batch_1", "test_batch"])
    return SplitCIFAR10DataModule(
        data_dir=str(tmp_path), train_batches=["data_batch_1"], num_tasks=2, batch_size=4, steps_per_task=2, eval_size=4
    )


def test_hypernetwork_generates_and_trains_zenkenet(cifar_tasks, make_trainer: Trainers) -> None:
    model = HyperContinualModule(
        num_tasks=2,
        output_dim=2,
        heads="multihead",
        target=ZenkeNet(2),
        hnet_hidden=(8,),
        chunk_size=5500,
        chunk_emb_dim=4,
        emb_dim=4,
        beta=0.01,
        infer_task=False,
        **optimizers(1e-3),
    )
    assert model.target.head.out_features == 4  # widened to one 2-way slice per task
    assert model.hnet.num_target_params == sum(p.numel() for p in model.target.parameters()) == 1_245_728 + 512 * 4 + 4
    template = {n: p.detach().clone() for n, p in model.target.named_parameters()}
    before = model.generated_weights(torch.arange(2)).detach().clone()
    make_trainer(max_epochs=2).fit(model, cifar_tasks)
    assert model.task == 1 and bool(torch.isfinite(model.acc_matrix[1, :2]).all())
    after = model.generated_weights(torch.arange(2)).detach()
    assert not torch.allclose(before, after)  # the hypernetwork (and with it the generated weights) trained
    for n, p in model.target.named_parameters():  # the target's own parameters are only a template
        assert torch.equal(p, template[n]), n
    model.eval()
    with torch.no_grad():  # the batched path (vmap over tasks) agrees with one functional call per task
        x = torch.rand(3, 3, 32, 32)
        batched = model.task_outputs(x, torch.arange(2))
        for t in range(2):
            torch.testing.assert_close(batched[t], model(x, t), atol=1e-5, rtol=1e-4)


def test_online_ewc_trains_zenkenet(cifar_tasks, make_trainer: Trainers) -> None:
    model = EWCContinualModule(
        num_tasks=2,
        output_dim=2,
        heads="multihead",
        target=ZenkeNet(2),
        ewc_lambda=100.0,
        fisher_every=1,
        optimizer=adam(1e-3),
        infer_task=False,
    )
    assert model.net.head.out_features == 4
    start = model.net.conv1.weight.detach().clone()
    make_trainer(max_epochs=2).fit(model, cifar_tasks)
    fisher = model.fisher.as_dict()
    assert float(fisher["conv1.weight"].sum()) > 0 and float(fisher["head.weight"].sum()) > 0  # task 0's Fisher
    assert not torch.equal(model.net.conv1.weight, start)
    assert bool(torch.isfinite(model.acc_matrix[1, :2]).all())
