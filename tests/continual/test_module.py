"""HyperContinualModule: heads, task switching, targets, frozen embeddings, optimizers, forgetting vs. no
forgetting, chunking."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch

from datamodules import PermutedMNISTDataModule, Regression1DDataModule
from hyperlit.continual import EWCContinualModule, HyperContinualModule
from hyperlit.nn.functional import call_with_weights
from tests.continual.conftest import optimizers

Trainers = Callable[..., pl.Trainer]

TOY = dict(
    num_tasks=3,
    input_dim=1,
    output_dim=1,
    hidden=(10, 10),
    activation="sigmoid",
    task_type="regression",
    hnet_hidden=(10, 10),
    hnet_activation="sigmoid",
    emb_dim=2,
    **optimizers(1e-2),
    infer_task=False,
)


def _toy_run(make_trainer: Trainers, beta: float, steps: int, num_tasks: int = 3) -> HyperContinualModule:
    pl.seed_everything(42)
    dm = Regression1DDataModule(num_tasks=num_tasks, steps_per_task=steps, batch_size=32)
    model = HyperContinualModule(**{**TOY, "beta": beta, "num_tasks": num_tasks})
    make_trainer(max_epochs=num_tasks).fit(model, dm)
    return model


@pytest.mark.parametrize("heads", ["generated", "multihead", "separate"])
def test_heads_and_batched_task_outputs(heads: str) -> None:
    m = HyperContinualModule(num_tasks=3, input_dim=6, output_dim=4, hidden=(5,), heads=heads, hnet_hidden=(7,))
    head_numel = 5 * 4 * m.num_heads + 4 * m.num_heads
    total = sum(p.numel() for p in m.target.parameters())
    assert m.hnet.num_target_params == (total - head_numel if heads == "separate" else total)
    assert [p.requires_grad for p in m.target.parameters()] == [False, False] + [heads == "separate"] * 2
    x = torch.randn(8, 6)
    out = m.task_outputs(x, torch.arange(3))  # one vmapped call for all tasks
    assert out.shape == (3, 8, 4)
    for t in range(3):
        torch.testing.assert_close(out[t], m(x, t), rtol=1e-5, atol=1e-6)
    if heads != "generated":  # each task reads its own slice of the (generated or separate) output layer
        weights = m.hnet(m.task_embeddings[1])
        full = call_with_weights(m.target, weights, x).view(8, 3, 4)
        torch.testing.assert_close(m(x, 1), full[:, 1])


def test_unknown_and_out_of_order_tasks_raise() -> None:
    m = HyperContinualModule(num_tasks=3, input_dim=4, output_dim=2, hidden=(5,), hnet_hidden=(6,))
    with pytest.raises(KeyError, match="unknown task id 3"):
        m(torch.randn(2, 4), 3)
    with pytest.raises(KeyError, match="unknown task id -1"):
        m.start_task(-1)
    with pytest.raises(ValueError, match="in order"):
        m.start_task(1)
    m.start_task(0)
    with pytest.raises(ValueError, match="in order"):
        m.start_task(2)
    with pytest.raises(ValueError, match="lookahead"):
        HyperContinualModule(lookahead="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reg_num_tasks"):
        HyperContinualModule(reg_num_tasks=0)


@pytest.mark.parametrize("online", [False, True])
def test_task_boundary_snapshots_targets(online: bool) -> None:
    m = HyperContinualModule(
        num_tasks=4, input_dim=4, output_dim=2, hidden=(5,), hnet_hidden=(6,), chunk_size=7, online_targets=online
    )
    m.start_task(0)
    m.start_task(1)
    m.start_task(2)
    assert torch.equal(m.emb_star, m.task_embeddings.detach())
    before = m.generated_weights(torch.arange(2)).detach()
    assert float(m.regularizer(2)) == pytest.approx(0.0, abs=1e-10)  # θ = θ*: no penalty
    if not online:
        assert m.reg_targets.shape == (2, m.hnet.num_target_params)
        torch.testing.assert_close(m.reg_targets, before)
    with torch.no_grad():
        m.hnet.head.weight.add_(0.1)
    expected = (m.generated_weights(torch.arange(2)) - before).pow(2).sum(1).mean()
    torch.testing.assert_close(m.regularizer(2), expected)
    # drift of task 0/1's generated weights since the end of their training
    torch.testing.assert_close(m.weight_drift(), (m.generated_weights(torch.arange(2)) - before).norm(dim=1))


@pytest.mark.parametrize("lookahead", ["none", "adam"])
def test_gram_and_materialized_regularizers_train_identically(make_trainer: Trainers, lookahead: str) -> None:
    """Three tasks, the same batches: the Gram form and the materialized sum give the same hypernetwork."""
    models = {}
    for method in ("gram", "materialize"):
        pl.seed_everything(42)
        dm = Regression1DDataModule(num_tasks=3, steps_per_task=15, batch_size=32)
        toy = {**TOY, "beta": 0.5, "chunk_size": 30, "lookahead": lookahead, "train_old_embeddings": True}
        models[method] = HyperContinualModule(**toy, reg_method=method)
        make_trainer(max_epochs=3).fit(models[method], dm)
    gram, direct = models["gram"], models["materialize"]
    assert len(gram.reg_targets) == 0 and len(direct.reg_targets) == 2  # no stored targets in the Gram form
    hnet_floats = sum(p.numel() for p in gram.hnet.parameters())
    assert gram.target_memory_bytes() == 4 * (hnet_floats + gram.task_embeddings.numel())  # θ* and e*
    assert direct.target_memory_bytes() == 4 * 2 * direct.hnet.num_target_params  # two stored target vectors
    # the old embeddings moved under the regularizer during task 2 (so the Gram form saw e ≠ e*)
    assert float((gram.task_embeddings[0] - gram.emb_star[0]).abs().max().detach()) > 1e-4
    for (name, a), b in zip(gram.named_parameters(), direct.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_reg_method_auto_picks_the_cheaper_form_per_task() -> None:
    big = dict(num_tasks=12, input_dim=4, output_dim=2, hidden=(5,), hnet_hidden=(6,), heads="multihead", beta=0.1)
    m = HyperContinualModule(**big, chunk_size=10)  # P = 4·5+5+5·24+24 = 169: 17 chunks; 3·(6+1) = 21 rows
    assert m.theta_star is not None
    assert [m.uses_gram(t) for t in range(4)] == [False, False, True, True]  # k·17 >= 21 from k = 2
    capped = HyperContinualModule(**big, chunk_size=10, reg_num_tasks=1)
    assert not capped.uses_gram(11)  # one regularized task per step: 17 rows
    full = HyperContinualModule(**big)  # an unchunked hypernet never takes it, and keeps no snapshot
    assert full.theta_star is None and not full.uses_gram(11)
    with pytest.raises(ValueError, match="reg_method must be"):
        HyperContinualModule(**big, reg_method="fast")  # type: ignore[arg-type]


def test_evaluation_generates_the_weights_once_per_epoch(make_trainer: Trainers, monkeypatch) -> None:
    """A test epoch over 3 tasks × several batches with task inference generates weights in one hypernet call,
    and scores exactly what generating them per batch scores."""
    from tests.continual.conftest import TinyTasks, optimizers

    dm = TinyTasks(num_tasks=3, eval_batch_size=4)  # 3 batches per task
    kwargs = dict(num_tasks=3, input_dim=4, output_dim=2, hidden=(8,), hnet_hidden=(8,), chunk_size=20, emb_dim=2)
    model = HyperContinualModule(**kwargs, **optimizers(1e-2))  # type: ignore[arg-type]
    make_trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(model, datamodule=dm)
    calls = []
    flat = model.hnet.flat
    monkeypatch.setattr(model.hnet, "flat", lambda cond: calls.append(len(cond)) or flat(cond))
    make_trainer().test(model, datamodule=dm, verbose=False)
    cached = model.test_scores.clone()
    assert calls == [3] and model._eval_weights is None  # one call for the 3 seen tasks; freed after the epoch
    monkeypatch.setattr(model, "_evaluation_weights", lambda tasks: None)  # generate per batch instead
    make_trainer().test(model, datamodule=dm, verbose=False)
    assert len(calls) > 3
    torch.testing.assert_close(model.test_scores, cached, rtol=0, atol=0)
    assert bool((cached[0] > 0.7).all())  # a real score: the tasks were learned


def test_official_xavier_initialisation() -> None:
    kwargs = dict(num_tasks=3, input_dim=6, output_dim=2, hidden=(5,), hnet_hidden=(7, 4), chunk_size=20, emb_dim=3)
    m = HyperContinualModule(**kwargs, hnet_init="xavier", emb_init_std=0.5)  # type: ignore[arg-type]
    for name, p in m.hnet.named_parameters():
        if p.dim() == 1:
            assert bool((p == 0).all()), name
        elif name != "chunk_embeddings":
            fan_out, fan_in = p.shape
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.5 * bound, name
    assert 0.2 < float(m.task_embeddings.std()) < 1.0  # N(0, 0.5²): 9 draws
    torch.manual_seed(0)
    a = HyperContinualModule(**kwargs, hnet_init="xavier")  # type: ignore[arg-type]
    torch.manual_seed(0)
    b = HyperContinualModule(**kwargs)  # type: ignore[arg-type]
    b_state = {k: v.clone() for k, v in b.state_dict().items()}
    b.reset_hypernetwork()  # the same draws after the default init's: the constructor option is this call
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert not torch.equal(b_state["hnet.head.weight"], b.hnet.head.weight.detach())
    with pytest.raises(ValueError, match="hnet_init must be"):
        HyperContinualModule(**kwargs, hnet_init="kaiming")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drop hnet_out_init_std"):
        HyperContinualModule(**kwargs, hnet_init="xavier", hnet_out_init_std=0.01)  # type: ignore[arg-type]


def test_compression_ratio_counts_embeddings() -> None:
    m = HyperContinualModule(
        num_tasks=5, input_dim=784, output_dim=10, hidden=(100, 100), hnet_hidden=(25, 25), chunk_size=1000, emb_dim=8
    )
    c = m.compression()
    n_hnet = sum(p.numel() for p in m.hnet.parameters())
    assert c["compression_ratio"] == pytest.approx((n_hnet + 5 * 8) / 89610)
    assert c["compression_ratio_no_emb"] == pytest.approx(n_hnet / 89610)
    assert c["compression_ratio"] < 1


def test_old_embeddings_frozen_and_fresh_optimizer_state_per_task(make_trainer: Trainers) -> None:
    pl.seed_everything(0)
    dm = Regression1DDataModule(num_tasks=2, steps_per_task=15)
    m = HyperContinualModule(**{**TOY, "num_tasks": 2, "beta": 0.01})
    trainer = make_trainer(max_epochs=2)
    trainer.fit(m, dm)
    assert int(m.current_task) == 1 and int(m.step_in_task) == 15 and int(m.total_steps) == 30
    assert trainer.global_step == 2 * 30  # one step per optimizer and batch
    torch.testing.assert_close(m.task_embeddings[0], m.emb_star[0], rtol=0, atol=0)  # untouched during task 1
    assert not torch.equal(m.task_embeddings[1], m.emb_star[1])
    hnet_opt, emb_opt = trainer.optimizers
    assert all(int(hnet_opt.state[p]["step"]) == 15 for p in m.hnet.parameters())  # Adam restarted at task 1
    assert int(emb_opt.state[m.task_embeddings]["step"]) == 15  # both optimizers restarted
    moving = HyperContinualModule(**{**TOY, "num_tasks": 2, "beta": 0.01, "train_old_embeddings": True})
    make_trainer(max_epochs=2).fit(moving, Regression1DDataModule(num_tasks=2, steps_per_task=15))
    assert not torch.equal(moving.task_embeddings[0], moving.emb_star[0])


def test_toy_forgetting_without_regularizer_quick(make_trainer: Trainers) -> None:
    """Cheap variant of the 1-D toy test (the paper's setting is the slow test below).

    β = 0.05 and 500 steps per task keep every final MSE ≤ 0.05; without the regularizer the first task is
    already forgotten after the second one (so that run stops there), by far more than 10×.
    """
    kept = _toy_run(make_trainer, beta=0.05, steps=500)
    final = kept.acc_matrix[2]  # MSE after the last task
    assert bool((final <= 0.05).all()), final
    forgot = _toy_run(make_trainer, beta=0.0, steps=300, num_tasks=2)
    assert float(forgot.acc_matrix[0, 0]) <= 0.01  # task 0 had been learned ...
    assert float(forgot.acc_matrix[1, 0]) >= 10 * float(final[0])  # ... and is then forgotten


@pytest.mark.slow
def test_toy_paper_setting(make_trainer: Trainers) -> None:
    """Official toy setting (β = 0.005, 4,001 iterations per task): every final MSE ≤ 0.01; β = 0 forgets task 1."""
    kept = _toy_run(make_trainer, beta=0.005, steps=4001)
    final = kept.acc_matrix[2]
    assert bool((final <= 0.01).all()), final
    forgot = _toy_run(make_trainer, beta=0.0, steps=4001)
    assert float(forgot.acc_matrix[2, 0]) >= 10 * float(final[0])


def test_chunked_hypernet_smaller_than_target_learns_three_permuted_tasks(
    make_trainer: Trainers, fake_mnist_dir
) -> None:
    pl.seed_everything(0)
    dm = PermutedMNISTDataModule(
        data_dir=str(fake_mnist_dir), num_tasks=3, pad_to_32=False, val_size=100, steps_per_task=60, batch_size=32
    )
    m = HyperContinualModule(
        num_tasks=3,
        input_dim=784,
        output_dim=10,
        hidden=(100, 100),
        hnet_hidden=(25, 25),
        chunk_size=1000,
        emb_dim=8,
        hnet_out_init_std=0.01,
        beta=0.01,
    )
    assert m.compression()["compression_ratio"] < 1
    make_trainer(max_epochs=3).fit(m, dm)
    final = m.acc_matrix[2]
    assert bool((final >= 0.9).all()), final  # chance is 0.1
    assert bool((m.task_inference_matrix[2] > 1 / 3).all())  # entropy-based inference beats guessing


@pytest.mark.slow
def test_permuted_mnist_real_hypernet_vs_fine_tuning(make_trainer: Trainers, real_data_dir) -> None:
    """Real MNIST, 5 permuted tasks, target MLP 784-100-100-10, reduced iterations (500 per task).

    The hypernetwork keeps its mean final accuracy within 2 points of its mean during accuracy; fine-tuning
    (β = 0, same hypernetwork, same data order) ends at least 5 points lower.
    """

    def run(beta: float) -> HyperContinualModule:
        pl.seed_everything(0)
        dm = PermutedMNISTDataModule(
            data_dir=str(real_data_dir),
            num_tasks=5,
            pad_to_32=False,
            val_size=5000,
            eval_size=2000,
            steps_per_task=500,
            batch_size=128,
            eval_batch_size=1000,
        )
        m = HyperContinualModule(
            num_tasks=5,
            input_dim=784,
            output_dim=10,
            hidden=(100, 100),
            hnet_hidden=(100, 100),
            chunk_size=2000,
            emb_dim=8,
            hnet_out_init_std=0.01,
            beta=beta,
        )
        make_trainer(max_epochs=5).fit(m, dm)
        return m

    hnet = run(0.05).cl_summary()
    finetune = run(0.0).cl_summary()
    assert hnet["during_mean"] > 0.9
    assert hnet["final_mean"] >= hnet["during_mean"] - 0.02, hnet
    assert finetune["final_mean"] <= hnet["final_mean"] - 0.05, (hnet, finetune)


def test_optimizers_in_order_with_their_parameters() -> None:
    m = HyperContinualModule(num_tasks=3, input_dim=4, output_dim=2, hidden=(5,), hnet_hidden=(6,), heads="separate")
    hnet_opt, emb_opt = m.configure_optimizers()
    assert isinstance(hnet_opt, torch.optim.Adam) and isinstance(emb_opt, torch.optim.Adam)
    assert [g["lr"] for g in (*hnet_opt.param_groups, *emb_opt.param_groups)] == [1e-3, 1e-3]  # the defaults
    assert hnet_opt.defaults["betas"] == (0.9, 0.999)
    ids = lambda opt: {id(p) for g in opt.param_groups for p in g["params"]}  # noqa: E731
    assert ids(hnet_opt) == {id(p) for p in m.hnet.parameters()}
    head = m.target.net[-1]
    assert ids(emb_opt) == {id(m.task_embeddings), id(head.weight), id(head.bias)}  # embeddings + separate heads
    custom = HyperContinualModule(
        num_tasks=2,
        hnet_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4),
        emb_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    a, b = custom.configure_optimizers()
    assert isinstance(a, torch.optim.AdamW) and a.defaults["lr"] == 3e-4 and isinstance(b, torch.optim.SGD)


@pytest.mark.parametrize("which", ["hnet_optimizer", "emb_optimizer", "ewc"])
def test_negative_learning_rate_raises_at_configure_optimizers(which: str) -> None:
    """torch's own constructor validates the factory's lr (issue 14: per-group lrs used to bypass the check)."""
    bad = lambda p: torch.optim.Adam(p, lr=-1e-3)  # noqa: E731
    if which == "ewc":
        m = EWCContinualModule(num_tasks=2, input_dim=4, output_dim=2, hidden=(5,), optimizer=bad)
    else:
        m = HyperContinualModule(num_tasks=2, input_dim=4, output_dim=2, hidden=(5,), hnet_hidden=(6,), **{which: bad})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        m.configure_optimizers()


def test_gradient_clipping_is_joint_over_both_optimizers(make_trainer: Trainers) -> None:
    """With SGD(lr=1) the step is minus the clipped gradient: its norm over θ and the embeddings together is the
    clip value (clipping each optimizer's parameters separately would give √2 times it)."""
    clip = 1e-3
    sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    m = HyperContinualModule(**{**TOY, "num_tasks": 1, "hnet_optimizer": sgd, "emb_optimizer": sgd, "grad_clip": clip})
    before = [p.detach().clone() for p in (*m.hnet.parameters(), m.task_embeddings)]
    make_trainer(max_epochs=1).fit(m, Regression1DDataModule(num_tasks=1, steps_per_task=1))
    after = [p.detach() for p in (*m.hnet.parameters(), m.task_embeddings)]
    hnet_step = torch.cat([(a - b).flatten() for a, b in zip(after[:-1], before[:-1])]).norm()
    emb_step = (after[-1] - before[-1]).norm()
    assert float(hnet_step) > 0 and float(emb_step) > 0
    assert float(torch.stack([hnet_step, emb_step]).norm()) == pytest.approx(clip, rel=1e-4)
