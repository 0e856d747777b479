"""The three programs of ``docs/bring_your_own.md``, run exactly as the page shows them, at small sizes.

Each fenced ``python`` block of the page is executed as a module (not as ``__main__``, so its ``main()`` is not
called on import) and its ``main(...)`` is called with small sizes on tiny data files in the real on-disk formats
(:mod:`tests.fakedata`) or on the in-memory data the program itself uses.
"""

from __future__ import annotations

import math
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from hyperlit.hparams import HyperparameterSpace
from tests.fakedata import write_fake_cifar, write_fake_mnist

PAGE = Path(__file__).resolve().parents[1] / "docs" / "bring_your_own.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The bodies of the page's fenced ``python`` blocks, in order."""
    return FENCE.findall(text)


def load_example(index: int, name: str) -> types.ModuleType:
    """Execute block ``index`` of the page as the module ``name`` (registered in ``sys.modules``)."""
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    module = types.ModuleType(name)
    module.__file__ = f"{PAGE}#example-{index}"
    sys.modules[name] = module
    exec(compile(blocks[index], module.__file__, "exec"), module.__dict__)
    return module


@pytest.fixture(autouse=True)
def _one_thread_and_forget_examples() -> Iterator[None]:
    # small ops: one thread avoids oversubscribing the shared cores (two threads are many times slower here)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for name in [n for n in sys.modules if n.startswith("docs_example_")]:
        del sys.modules[name]


def test_the_page_has_exactly_three_programs_each_with_main() -> None:
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) == 3
    for code in blocks:
        assert "\ndef main(" in code and code.rstrip().endswith('if __name__ == "__main__":\n    main()')
    assert python_blocks("text\n```python\nx = 1\n```\nmore\n```bash\nls\n```\n") == ["x = 1\n"]


def test_stn_resnet18_with_batchnorm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision's CIFAR10 checks the md5 of the real files; the fixture files are real pickles but not those
    # files, so the check is reduced to "the file exists"
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    data_root = tmp_path / "data"
    write_fake_cifar(data_root, per_batch=12, layout="torchvision")  # 60 training images, 12 test images
    example = load_example(0, "docs_example_stn")
    module, trainer = example.main(
        data_root=str(data_root),
        max_epochs=1,
        batch_size=8,
        val_size=12,
        warmup_epochs=0,
        limit_train_batches=2,
        limit_val_batches=1,
        num_workers=0,
        download=False,
        root_dir=str(tmp_path),
    )
    net = module.net
    assert isinstance(net.module, torchvision.models.ResNet)
    assert module.space.names == ["drop_fc", "jitter", "cutout"]
    # λ moved from its initial value (one λ-step for every two φ-steps after the warm-up)
    assert int(module.phi_steps) == 2 and int(module.hyper_steps_done) == 1
    init = HyperparameterSpace(net.default_hyperparameters()).unconstrained.detach()
    assert not torch.allclose(module.space.unconstrained.detach(), init)
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    # BatchNorm: running statistics updated by the φ-steps (train mode) only, never by λ-steps or validation
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert all(int(bn.num_batches_tracked) == 2 for bn in bns)
    assert not torch.allclose(net.module.bn1.running_mean, torch.zeros_like(net.module.bn1.running_mean))
    assert (tmp_path / "lightning_logs" / "version_0" / "hparam_schedule.csv").is_file()


def test_phn_custom_objectives_on_a_custom_target(tmp_path: Path) -> None:
    example = load_example(1, "docs_example_phn")
    module, datamodule, classifier = example.main(max_epochs=4, width=16, depth=1, solver="ls", root_dir=str(tmp_path))
    assert isinstance(classifier, example.ResidualMLP)
    assert isinstance(torch.load(tmp_path / "classifier_ray_0.8_0.2.pt", weights_only=False), example.ResidualMLP)
    x, _ = datamodule.splits["test"].tensors
    # the exported network computes what the hypernetwork generates for that ray
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), module(x, [0.8, 0.2]))
    # the objectives were evaluated on the test front (the last run): hard rates under their evaluation names
    metrics = module.trainer.callback_metrics
    for name in ("test/fnr_mean", "test/fpr_mean"):
        assert 0.0 <= float(metrics[name]) <= 1.0
    assert float(metrics["test/hv"]) > 0.5  # an easy problem: most of the unit square is dominated
    # the front trades the two objectives: the ray that weighs misses more misses less, and vice versa
    objectives = module.objective_set
    rays = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    train_x, train_y = datamodule.splits["train"].tensors
    with torch.no_grad():
        outputs = torch.stack([module(train_x, r) for r in rays])
    relaxed = objectives.losses(outputs, (train_x, train_y))
    assert relaxed[0, 0] < relaxed[1, 0] and relaxed[0, 1] > relaxed[1, 1]
    front = module.evaluate(datamodule.val_dataloader(), rays=rays.tolist())
    assert front.names == ("fnr", "fpr") and front.losses.shape == (2, 2)
    assert bool(((front.losses >= 0) & (front.losses <= 1)).all())  # rates (hard FNR/FPR: ties on few examples)


def test_continual_custom_cnn_on_own_task_sequence(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    write_fake_mnist(data_root, n_train=1000, n_test=250, compress=False, layout="torchvision")
    example = load_example(2, "docs_example_cl")
    module, trainer = example.main(
        data_root=str(data_root),
        epochs_per_task=3,
        batch_size=32,
        width=8,
        download=False,
        root_dir=str(tmp_path),
    )
    r = module.acc_matrix
    assert r.shape == (5, 5)
    lower = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    assert bool(torch.isfinite(r[lower]).all()) and bool(torch.isnan(r[~lower]).all())
    assert float(r.diagonal().mean()) > 0.75  # binary tasks: chance is 0.5
    assert float(r[-1].mean()) > 0.6  # after the last task, earlier tasks are still above chance
    # BatchNorm statistics are kept per task, one step count per task
    steps = module.task_norm_stats.get_buffer("features__1__num_batches_tracked")
    assert steps.shape == (5,) and bool((steps > 0).all())
    assert int(module.current_task) == 4 and trainer.current_epoch == 15
