"""DeepEnsembleModule and the hyper-deep ensemble: the vectorised members against K plain networks trained one by
one, per-member L2 and label smoothing against closed forms, evaluation, subsets, exact resume, bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import DigitsDataModule
from hyperlit.ensembles.deep import DeepEnsembleModule, hyper_deep_ensemble, member_seed, random_search_hparams
from hyperlit.ensembles.metrics import ensemble_log_probs
from hyperlit.ensembles.selection import sample_log_uniform
from tests.fault_tolerance_helpers import final_state

K = 3
HP = {"l2": [0.5, 0.0, 2.0], "label_smoothing": [0.0, 0.1, 0.3]}


def _net(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _sgd(p):
    return torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _adam(p):
    return torch.optim.Adam(p, lr=0.01, weight_decay=1e-3)


# -- training == K separate networks -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "member_batches", "grad_clip"), [(_sgd, "shared", 0.5), (_adam, "disjoint", None)], ids=["sgd", "adam"]
)
def test_vectorised_training_equals_k_networks_trained_one_by_one(
    make_trainer, factory, member_batches: str, grad_clip: float | None
) -> None:
    x, y = _data()
    shared = member_batches == "shared"
    module = DeepEnsembleModule(
        _net(),
        ensemble_size=K,
        num_classes=3,
        member_hparams=HP,
        member_batches=member_batches,  # type: ignore[arg-type]
        optimizer=factory,
        grad_clip=grad_clip,
        train_size=None if shared else 100,  # shared: read from the loader's dataset (48)
    )
    start = [module.member_model(k) for k in range(K)]
    loader = DataLoader(TensorDataset(x, y), batch_size=8 if shared else 4 * K)
    make_trainer(max_epochs=1, limit_train_batches=3).fit(module, train_dataloaders=loader)
    assert int(module.steps) == 3 and module.l2_divisor == (48 if shared else 100)

    norms = []
    for k, net in enumerate(start):  # the oracle: plain torch, one member at a time
        opt = factory(net.parameters())
        for _, (xb, yb) in zip(range(3), loader):
            if not shared:  # member-major: member k trains on rows k*4 ... k*4 + 3
                xb, yb = xb.view(K, 4, 5)[k], yb.view(K, 4)[k]
            loss = F.cross_entropy(net(xb), yb, label_smoothing=HP["label_smoothing"][k])
            loss = loss + HP["l2"][k] * sum(p.pow(2).sum() for p in net.parameters()) / module.l2_divisor
            opt.zero_grad()
            loss.backward()
            if grad_clip is not None:
                norms.append(float(nn.utils.clip_grad_norm_(net.parameters(), grad_clip)))
            opt.step()
        stacked = module.stacked_parameters()
        for name, p in net.named_parameters():
            torch.testing.assert_close(stacked[name][k], p, atol=2e-6, rtol=1e-5, msg=f"member {k} {name}")
    if grad_clip is not None:
        assert max(norms) > grad_clip  # the clipping did act
    # the members moved apart from their different initialisations, not together
    w = module.stacked_parameters()["0.weight"]
    assert not torch.allclose(w[0], w[1])


def test_gradient_clipping_is_per_member() -> None:
    module = DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, grad_clip=1.0)
    for p in module.members.parameters():
        p.grad = torch.randn_like(p) * torch.tensor([0.01, 1.0, 10.0]).view(K, *([1] * (p.dim() - 1)))
    expected = []
    for k in range(K):
        grads = [p.grad[k].clone() for p in module.members.parameters()]
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for q, g in zip(params, grads):
            q.grad = g
        nn.utils.clip_grad_norm_(params, 1.0)
        expected.append([q.grad for q in params])
    module.on_before_optimizer_step(None)  # type: ignore[arg-type]
    for k in range(K):
        for p, g in zip(module.members.parameters(), expected[k]):
            torch.testing.assert_close(p.grad[k], g)
    total = [math.sqrt(sum(float(p.grad[k].pow(2).sum()) for p in module.members.parameters())) for k in range(K)]
    assert total[0] < 0.5 and total[1] == pytest.approx(1.0, rel=1e-4) and total[2] == pytest.approx(1.0, rel=1e-4)


# -- losses against closed forms -------------------------------------------------------------------------------------
def test_member_losses_and_l2_gradients_match_closed_forms() -> None:
    hp = {
        "l2": [0.3, 0.0, 1.5],
        "l2_head": [2.0, 0.5, 0.0],
        "l2_head_bias": [0.0, 0.0, 4.0],
        "label_smoothing": [0.0, 0.2, 0.05],
    }
    groups = {"3": "head", "3.bias": "head_bias"}  # the longest matching path wins: 3.bias -> head_bias
    module = DeepEnsembleModule(_net(), K, 3, member_hparams=hp, l2_groups=groups, train_size=50)
    logits = torch.randn(K, 6, 3, requires_grad=True)
    y = torch.randint(0, 3, (K, 6))
    loss, nll = module.member_losses(logits, y)
    params = module.stacked_parameters()
    strength = {"0.weight": "l2", "0.bias": "l2", "3.weight": "l2_head", "3.bias": "l2_head_bias"}
    for k in range(K):
        ce = F.cross_entropy(logits[k], y[k], label_smoothing=hp["label_smoothing"][k])
        penalty = sum(hp[strength[n]][k] * params[n][k].pow(2).sum() for n in params)
        torch.testing.assert_close(loss[k], ce + penalty / 50)
        torch.testing.assert_close(nll[k], F.cross_entropy(logits[k], y[k]))
    names = list(params)
    grads = torch.autograd.grad(loss.sum(), [logits, *(params[n] for n in names)])
    for k in range(K):
        ce = F.cross_entropy(logits[k], y[k], label_smoothing=hp["label_smoothing"][k])
        torch.testing.assert_close(grads[0][k], torch.autograd.grad(ce, logits)[0][k])
        for name, g in zip(names, grads[1:]):  # d/dw c·Σw²/n = 2cw/n, member by member
            torch.testing.assert_close(g[k], 2 * hp[strength[name]][k] * params[name][k] / 50)


# -- evaluation, members, subsets ------------------------------------------------------------------------------------
def test_member_logits_equal_a_loop_over_members_and_init_is_seeded() -> None:
    model = _net(dropout=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = DeepEnsembleModule(model, ensemble_size=K, num_classes=3, seed=7).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the model passed in is untouched
    x = _data(10)[0]
    out = module.member_logits(x)
    assert out.shape == (K, 10, 3)
    params = module.stacked_parameters()
    for k in range(K):
        loop = functional_call(model.eval(), {n: p[k] for n, p in params.items()}, (x,))
        torch.testing.assert_close(out[k], loop)
        torch.testing.assert_close(out[k], module.member_model(k).eval()(x))
        # member k is the model re-initialised under member_seed(7, k)
        ref = _net(dropout=0.5)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(7, k))
            for m in ref.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        for name, p in ref.named_parameters():
            assert torch.equal(params[name][k], p), (k, name)
    assert not torch.allclose(out[0], out[1])
    again = DeepEnsembleModule(_net(dropout=0.5), ensemble_size=K, num_classes=3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(module.members.parameters(), again.members.parameters()))
    other = DeepEnsembleModule(_net(dropout=0.5), ensemble_size=K, num_classes=3, seed=8)
    assert not torch.equal(next(module.members.parameters()), next(other.members.parameters()))
    # train mode: each member draws its own dropout masks (identical members, identical inputs)
    twins = module.subset([1, 1]).train()
    masked = twins(x)
    assert not torch.allclose(masked[0], masked[1])
    twins.eval()
    torch.testing.assert_close(twins(x)[0], twins(x)[1])


def test_subset_with_repeats_weighs_a_repeated_member_twice() -> None:
    module = DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, member_hparams=HP, train_size=10).eval()
    sub = module.subset([2, 0, 2]).eval()
    assert sub.ensemble_size == 3 and int(sub.steps) == 0
    assert sub.member_hparams == {n: [v[2], v[0], v[2]] for n, v in HP.items()}
    torch.testing.assert_close(sub.label_smoothing, torch.tensor([0.3, 0.0, 0.3]))
    x, y = _data(12)
    full = module.member_logits(x)
    probs = sub.predict_step((x, y), 0)
    torch.testing.assert_close(probs, (2 * full[2].softmax(-1) + full[0].softmax(-1)) / 3)
    torch.testing.assert_close(ensemble_log_probs(sub.member_logits(x)).exp(), probs)
    with pytest.raises(IndexError, match="out of range"):
        module.subset([3])


class _Scaled(nn.Module):
    """A layer owning a parameter without ``reset_parameters`` and a (non-BatchNorm) buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((4,), 2.0))
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.offset


def test_tied_weights_buffers_and_custom_initialisation() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), _Scaled())
    net[2].weight = net[0].weight  # tied
    with pytest.warns(UserWarning, match=r"\['3'\].*no reset_parameters"):
        module = DeepEnsembleModule(net, ensemble_size=K, num_classes=4).eval()
    assert module.members[2].weight is module.members[0].weight  # still tied, stacked once
    assert set(module.stacked_parameters()) == {"0.weight", "0.bias", "2.bias", "3.gain"}
    assert module.members[3].offset.shape == (K, 4)
    assert torch.equal(module.members[3].gain, torch.full((K, 4), 2.0))  # kept: no reset_parameters
    x = torch.randn(5, 4)
    out = module.member_logits(x)
    for k in range(K):
        member = module.member_model(k)
        assert member[2].weight is member[0].weight
        torch.testing.assert_close(out[k], member(x))

    def init(m: nn.Module) -> None:
        nn.init.normal_(m[0].weight, std=3.0)

    custom = DeepEnsembleModule(nn.Sequential(nn.Linear(4, 3)), ensemble_size=K, num_classes=3, init_fn=init, seed=2)
    for k in range(K):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(2, k))
            expected = torch.randn(3, 4) * 3.0
        torch.testing.assert_close(custom.members[0].weight[k], expected)


# -- exact resume ------------------------------------------------------------------------------------------------------
def _digits_ensemble() -> DeepEnsembleModule:
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 10))
    return DeepEnsembleModule(
        net,
        ensemble_size=K,
        num_classes=10,
        member_hparams={"l2": [0.1, 1.0, 0.0], "label_smoothing": [0.0, 0.1, 0.0]},
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        seed=3,
    )


def _digits_trainer(root, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        limit_train_batches=4,
        limit_val_batches=1,
        **kwargs,
    )


def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(0)
        model = _digits_ensemble()
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = _digits_trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
        reference = final_state(trainer, model)
        assert int(model.steps) == 8 and model.l2_divisor == len(trainer.datamodule.train_set)
        path = tmp_path / "ckpt" / "step=6.ckpt"  # in the middle of the second epoch
        pl.seed_everything(1)  # neither the global generator nor a fresh initialisation may matter
        resumed = DeepEnsembleModule(
            nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 10)),
            ensemble_size=K,
            num_classes=10,
            member_hparams={"l2": [0.1, 1.0, 0.0], "label_smoothing": [0.0, 0.1, 0.0]},
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
            seed=4,
        )
        resumed_trainer = _digits_trainer(tmp_path / "resumed")
        resumed_trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=32), ckpt_path=path)
        state = final_state(resumed_trainer, resumed)
    finally:
        torch.set_num_threads(threads)
    assert state["global_step"] == reference["global_step"] == 8
    assert state["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=0, msg=key)
    (opt_ref,), (opt_res,) = reference["optimizers"], state["optimizers"]
    assert opt_ref["param_groups"] == opt_res["param_groups"]
    for pid, st in opt_ref["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(opt_res["state"][pid][name], value, rtol=0, atol=0)
    assert torch.equal(state["generators"]["rng"], reference["generators"]["rng"])


# -- hyper-deep ensembles ----------------------------------------------------------------------------------------------
def test_random_search_hparams_are_deterministic_in_range_and_start_with_the_default() -> None:
    ranges = {"l2": (0.01, 100.0), "label_smoothing": (1e-5, 0.2)}
    a = random_search_hparams(ranges, 6, seed=3)
    assert a == random_search_hparams(ranges, 6, seed=3)
    assert a != random_search_hparams(ranges, 6, seed=4)
    for name, (low, high) in ranges.items():
        assert len(a[name]) == 6 and all(low <= v <= high for v in a[name])
        assert a[name] == pytest.approx(sample_log_uniform(ranges, 6, 3)[name].tolist())
    b = random_search_hparams(ranges, 6, seed=3, include_default={"l2": 2.0, "label_smoothing": 0.0})
    assert b["l2"][0] == 2.0 and b["label_smoothing"][0] == 0.0 and len(b["l2"]) == 6
    assert b["l2"][1:] == pytest.approx(sample_log_uniform(ranges, 5, 3)["l2"].tolist())
    DeepEnsembleModule(_net(), ensemble_size=6, num_classes=3, member_hparams=b)  # usable as member_hparams
    with pytest.raises(KeyError, match="include_default"):
        random_search_hparams(ranges, 4, include_default={"l2": 1.0})


def test_hyper_deep_ensemble_selects_the_planted_best_member() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=g)
    y = x[:, :3].argmax(1)
    hp = random_search_hparams({"l2": (0.1, 10.0)}, 4, seed=0)
    pool = DeepEnsembleModule(nn.Linear(5, 3), ensemble_size=4, num_classes=3, member_hparams=hp, train_size=60)
    with torch.no_grad():
        pool.members.weight[2] = 0.0
        pool.members.weight[2, :, :3] = 20 * torch.eye(3)  # member 2 is nearly always right and confident
        pool.members.bias[2] = 0.0
    ensemble, selected = hyper_deep_ensemble(pool, DataLoader(TensorDataset(x, y), batch_size=16), ensemble_size=2)
    assert set(selected) == {2}  # every other member only adds probability mass on wrong classes
    assert ensemble.ensemble_size == len(selected) and ensemble.member_hparams == {"l2": [hp["l2"][2]] * len(selected)}
    for member in ensemble.member_logits(x):
        torch.testing.assert_close(member, pool.member_logits(x)[2])


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_input_raises_with_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"BatchNorm.*GroupNorm.*BatchEnsemble"):
        DeepEnsembleModule(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), num_classes=3)
    DeepEnsembleModule(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False)), num_classes=4)
    with pytest.raises(ValueError, match=r"has 2 values, one per member"):
        DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, member_hparams={"l2": [0.1, 0.2]})
    with pytest.raises(KeyError, match=r"dropout"):
        DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, member_hparams={"dropout": [0.1] * K})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, member_hparams={"label_smoothing": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"add \['l2_head'\]"):
        DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, l2_groups={"3": "head"})
    with pytest.raises(ValueError, match=r"match no parameter"):
        DeepEnsembleModule(_net(), K, 3, l2_groups={"head": "head"}, member_hparams={"l2_head": [1.0] * K})
    with pytest.raises(ValueError, match=r"pass num_classes"):
        DeepEnsembleModule(_net())
    with pytest.raises(ValueError, match=r"member_batches"):
        DeepEnsembleModule(_net(), num_classes=3, member_batches="split")  # type: ignore[arg-type]
    module = DeepEnsembleModule(_net(), ensemble_size=K, num_classes=3, member_batches="disjoint")
    x, y = _data(10)
    with pytest.raises(ValueError, match=r"divisible by 3"):
        module.training_logits(x, y)
    with pytest.raises(ValueError, match=r"expected \(N, num_classes\)"):
        DeepEnsembleModule(_net(), ensemble_size=K, num_classes=4).member_logits(x)
    with pytest.raises(RuntimeError, match=r"pass train_size"):
        DeepEnsembleModule(_net(), K, 3, member_hparams={"l2": [1.0] * K}).member_losses(
            torch.zeros(K, 2, 3), y[:6].view(K, 2)
        )
