"""DeltaStnLanguageModelModule (Δ-STN LSTM LM): ε = 0 is the general network, the linearized response step, the
split of the two updates, the carried state, the decay of both optimizers, exact resume, CLI and the CPU config."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.ptb import PTBDataModule
from hyperlit.cli import main as cli_main
from hyperlit.models.stn_lstm_lm import lm_training_loss
from hyperlit.tuning.delta_stn_lm import DeltaStnLanguageModelModule
from hyperlit.tuning.stn_lm import StnLanguageModelModule
from tests.datamodules.ptb_fakedata import WORDS, write_fake_ptb
from tests.fault_tolerance_helpers import final_state
from tests.test_fault_tolerance import _assert_same_state
from tests.tuning.test_bilevel import sgd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VOCAB = len(WORDS) + 1
HP = {"alpha": 0.5, "beta": 0.5, "dropouto": 0.2, "dropouti": 0.2, "dropouth": 0.2, "dropoute": 0.1, "wdrop": 0.3}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_ptb(tmp_path_factory.mktemp("ptb_delta_lm"))


def _dm(root: Path, tmp_path: Path) -> PTBDataModule:
    return PTBDataModule(
        data_dir=str(root), cache_dir=str(tmp_path / "hf"), batch_size=3, bptt=6, eval_batch_size=2, test_batch_size=2
    )


def _module(**kwargs: object) -> DeltaStnLanguageModelModule:
    args: dict[str, object] = {
        "vocab_size": VOCAB,
        "embedding_size": 8,
        "hidden_size": 8,
        "init": HP,
        "phi_optimizer": sgd(5.0, 0.0),
        "response_optimizer": sgd(5.0, 0.0),
        "plot_schedule": False,
    }
    args.update(kwargs)
    module = DeltaStnLanguageModelModule(**args)  # type: ignore[arg-type]
    with torch.no_grad():  # a non-trivial response
        for layer in module.net.stn_layers():
            layer.hyper_bottleneck.normal_(0, 0.5)
    return module


def _window(index: int = 0, steps: int = 5, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, VOCAB, (steps, batch), generator=gen),
        torch.randint(0, VOCAB, (steps, batch), generator=gen),
        index,
    )


def _theta(module: DeltaStnLanguageModelModule) -> set[int]:
    return {id(p) for p in module.response_parameters()}


# -- ε = 0: the general network -----------------------------------------------------------------------------------
def test_general_step_and_evaluation_equal_the_stn_lm_without_response() -> None:
    """Step (a) (ε = 0) and evaluation are the plain STN LM with Θ = 0 (V = 0) at the general weights, also for
    the second window (carried state)."""
    delta = _module().double()
    stn = StnLanguageModelModule(vocab_size=VOCAB, embedding_size=8, hidden_size=8, init=HP, plot_schedule=False)
    stn = stn.double()
    stn.load_state_dict(delta.state_dict())
    with torch.no_grad():
        for layer in stn.net.stn_layers():
            layer.hyper_bottleneck.zero_()
    stn.rng.set_state(delta.rng.get_state())
    for index in (0, 1):
        batch = _window(index, seed=index)
        got = delta.general_loss(batch)
        expected = stn.train_loss(batch, stn.space.repeat(3))
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        assert got.item() > 0
    torch.testing.assert_close(delta.states.get("train", 2, 3), stn.states.get("train", 2, 3), atol=1e-12, rtol=0)
    delta.eval()
    stn.eval()
    tokens = _window(seed=5)[0]
    torch.testing.assert_close(delta.eval_forward(tokens, None).logits, stn.eval_forward(tokens, None).logits)


def test_linearized_prediction_is_f0_plus_a_directional_derivative() -> None:
    """Step (b)'s outputs equal ``f(0) + (f(dε) − f(−dε)) / 2d`` (same dropout masks, same carried state)."""
    module = _module().double()
    inputs, _, _ = _window()
    state = [(torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)) for _ in range(2)]
    lam = module.space.perturb(3, generator=torch.Generator().manual_seed(1))
    eps = module.hnet_input(lam).detach()
    assert eps.abs().min() > 0
    hp = module.hparam_dict(lam)

    def f(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = module.net(inputs, h, hp, generator=torch.Generator().manual_seed(3), state=state)
        return out.logits, out.raw, out.dropped

    out = module.response_forward(inputs, eps, hp, state, generator=torch.Generator().manual_seed(3))
    d = 1e-6
    for got, base, plus, minus in zip((out.logits, out.raw, out.dropped), f(0 * eps), f(d * eps), f(-d * eps)):
        torch.testing.assert_close(got, base + (plus - minus) / (2 * d), atol=1e-7, rtol=1e-6)
    assert not torch.allclose(out.logits, f(eps)[0], atol=1e-6)  # the network is not linear in ε
    module.linearize = False
    plain = module.response_forward(inputs, eps, hp, state, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain.logits, f(eps)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("linearize", [True, False])
def test_general_step_reaches_only_w0_and_response_step_only_theta(linearize: bool) -> None:
    module = _module(linearize=linearize)
    theta = _theta(module)
    batch = _window()
    module.general_loss(batch).backward()
    for p in module.net.parameters():
        if id(p) in theta:
            assert p.grad is None or not p.grad.any()
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)
    module.response_loss(batch, module.sample_train_lambda(3)).backward()
    for p in module.net.parameters():
        if id(p) in theta:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None
    assert module.space.unconstrained.grad is None  # λ moves only in the λ-step


def test_response_step_starts_from_the_general_steps_carried_state_and_stores_none() -> None:
    module = _module().double()
    module.general_loss(_window(0, seed=0))
    start = module.states.get("train", 1, 3)
    batch = _window(1, seed=1)
    module.general_loss(batch)
    after_a = module.states.get("train", 2, 3)
    lam = module.space.perturb(3, generator=torch.Generator().manual_seed(2))
    rng = module.rng.get_state()
    loss = module.response_loss(batch, lam)
    assert module.states.get("train", 2, 3) is after_a  # step (b) stored nothing
    module.rng.set_state(rng)
    hp = module.hparam_dict(lam)
    out = module.response_forward(batch[0], module.hnet_input(lam).detach(), hp, start, generator=module.rng)
    expected = lm_training_loss(out, batch[1], *module.net.regularization_strengths(hp))[0]
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    module.rng.set_state(rng)
    out0 = module.response_forward(batch[0], module.hnet_input(lam).detach(), hp, None, generator=module.rng)
    assert not torch.allclose(out0.logits, out.logits)  # the carried state matters


def test_hyper_step_sees_the_centred_input() -> None:
    """The λ-step and ``forward`` see ε (:meth:`hnet_input` overridden once): value zero at λ̂, gradient that of
    ``h(λ)``."""
    module = _module().double().eval()
    lam = module.space.repeat(3).clone().requires_grad_()
    eps = module.hnet_input(lam)
    assert not eps.any()
    (g,) = torch.autograd.grad(eps.sum(), lam)
    (h,) = torch.autograd.grad(module.space.hnet_input(lam).sum(), lam)
    torch.testing.assert_close(g, h)
    inputs, targets, _ = batch = _window()
    loss = module.hyper_loss(batch, lam)
    assert loss.requires_grad
    logits = module.net(inputs, torch.zeros(3, 7, dtype=torch.float64)).logits  # V ≠ 0: only ε = 0 gives this
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))
    torch.testing.assert_close(module(inputs).logits, logits)


def test_nonmonotone_decay_divides_both_weight_optimizers() -> None:
    module = _module(nonmono=1, lr_decay=4.0)
    groups = [{"lr": 30.0}, {"lr": 0.01}, {"lr": 0.01}, {"lr": 20.0}]
    opts = [SimpleNamespace(param_groups=[g]) for g in groups]
    module.optimizers = lambda: opts  # type: ignore[method-assign]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    for loss in (5.0, 4.0):
        module._nonmonotone_decay(loss)
    assert [g["lr"] for g in groups] == [30.0, 0.01, 0.01, 20.0]
    module._nonmonotone_decay(6.0)  # 6.0 > min([5.0, 4.0][:-1])
    assert [g["lr"] for g in groups] == [7.5, 0.01, 0.01, 5.0]


# -- training through Lightning --------------------------------------------------------------------------------------
def _trainer(root: Path, **kwargs: object) -> pl.Trainer:
    args: dict[str, object] = {
        "accelerator": "cpu",
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
        "limit_train_batches": 5,
        "limit_val_batches": 2,
        "enable_checkpointing": False,
    }
    args.update(kwargs)
    return pl.Trainer(**args)  # type: ignore[arg-type]


def test_fit_then_resume_from_the_epoch_checkpoint_is_exact(fake_root: Path, tmp_path: Path) -> None:
    """Four optimizers, both weight groups and λ move; resuming at the end of epoch 1 reproduces epoch 2 exactly."""

    def module() -> DeltaStnLanguageModelModule:
        return _module(warmup_epochs=0, warmup_steps=2, tune=["dropouto", "wdrop", "alpha"], seed=3)

    pl.seed_everything(0)
    model = module()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer = _trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(model, datamodule=_dm(fake_root, tmp_path))
    reference = final_state(trainer, model)
    assert len(trainer.optimizers) == 4 and int(model.phi_steps) == 10 and int(model.hyper_steps_done) == 4
    moved = {n for n, v in model.state_dict().items() if not torch.equal(v, start[n])}
    assert "space.unconstrained" in moved and "net.rnns.0.weight_hh" in moved
    assert "net.rnns.0.hyper_bottleneck" in moved and "net.encoder.response_weight" in moved
    assert math.isfinite(float(trainer.callback_metrics["val/ppl"]))
    pl.seed_everything(1)
    resumed = module()
    resumed_trainer = _trainer(tmp_path / "resumed")
    resumed_trainer.fit(resumed, datamodule=_dm(fake_root, tmp_path), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    _assert_same_state(reference, final_state(resumed_trainer, resumed))
    loaded = DeltaStnLanguageModelModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch=1.ckpt")
    assert loaded.linearize and loaded.space.names == ["alpha", "dropouto", "wdrop"]
    assert {"linearize", "vocab_size", "tune"} <= set(loaded.hparams)
    torch.testing.assert_close(loaded.space.unconstrained, model.space.unconstrained)


# -- CLI and the example config -----------------------------------------------------------------------------------
def test_model_help_lists_the_new_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--model", "hyperlit.tuning.delta_stn_lm.DeltaStnLanguageModelModule", "--model.help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for arg in ("--model.linearize", "--model.response_optimizer", "--model.response_lr_scheduler"):
        assert arg in out, arg
    for arg in ("--model.vocab_size", "--model.phi_optimizer", "--model.tune", "--model.nonmono"):  # inherited
        assert arg in out, arg


def test_cpu_config_runs_on_generated_files(fake_root: Path, tmp_path: Path) -> None:
    cli_main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "delta_stn_ptb_cpu.yaml"),
            f"--data.init_args.data_dir={fake_root}",
            f"--data.init_args.cache_dir={tmp_path / 'hf'}",
            "--data.init_args.batch_size=4",
            "--data.init_args.bptt=8",
            f"--model.init_args.vocab_size={VOCAB}",
            "--model.init_args.embedding_size=8",
            "--model.init_args.hidden_size=8",
            "--trainer.fast_dev_run=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
