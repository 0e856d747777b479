"""The vectorized output regularizer against hypnettorch's ``calc_fix_target_reg`` (same hypernet, same targets)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")  # hypnettorch's import needs it
from hypnettorch.hnets import HMLP, ChunkedHMLP
from hypnettorch.utils import hnet_regularizer as hreg

from hyperlit.continual.interop import copy_from_hypnettorch
from hyperlit.continual.regularizer import (
    ParameterSnapshot,
    compute_targets,
    gram_is_cheaper,
    gram_regularization_loss,
    hnet_features,
    hnet_flat,
    lookahead_delta,
    output_regularizer,
    regularization_loss,
    sample_previous_tasks,
)
from hyperlit.nn.hypernet import HyperNetwork

SHAPES = {"net.0.weight": [12, 9], "net.0.bias": [12], "net.2.weight": [4, 12], "net.2.bias": [4]}  # P = 172
T, COND, CHUNK_EMB = 5, 6, 3


def _pair(chunked: bool) -> tuple[torch.nn.Module, HyperNetwork, torch.Tensor]:
    """A hypnettorch hypernet, ours with identical parameters, and our embedding matrix (float64)."""
    torch.manual_seed(0)
    shapes = [list(s) for s in SHAPES.values()]
    if chunked:
        ref = ChunkedHMLP(
            shapes,
            chunk_size=50,
            chunk_emb_size=CHUNK_EMB,
            cond_in_size=COND,
            layers=(16, 16),
            num_cond_embs=T,
            verbose=False,
        )
    else:
        ref = HMLP(shapes, cond_in_size=COND, layers=(16, 16), num_cond_embs=T, verbose=False)
    ref = ref.double()
    ours = HyperNetwork(
        SHAPES, cond_dim=COND, hidden=(16, 16), chunk_size=50 if chunked else None, chunk_emb_dim=CHUNK_EMB
    ).double()
    emb = copy_from_hypnettorch(ref, ours)
    return ref, ours, emb


def _perturb(ref: torch.nn.Module, ours: HyperNetwork, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.unconditional_params:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    copy_from_hypnettorch(ref, ours)


def _delta_pairs(ref: torch.nn.Module, ours: HyperNetwork) -> tuple[list, dict]:
    """A random Δθ in hypnettorch's order and the same Δθ under our parameter names."""
    gen = torch.Generator().manual_seed(2)
    d_ref = [0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ref.unconditional_params]
    probe = copy.deepcopy(ours)
    for p in probe.parameters():
        p.data.zero_()
    shadow = copy.deepcopy(ref)
    with torch.no_grad():
        for p, d in zip(shadow.unconditional_params, d_ref):
            p.copy_(d)
    copy_from_hypnettorch(shadow, probe)
    return d_ref, {n: p.detach().clone() for n, p in probe.named_parameters()}


@pytest.mark.parametrize("chunked", [False, True])
def test_generated_weights_identical(chunked: bool) -> None:
    ref, ours, emb = _pair(chunked)
    expected = ref.forward(cond_id=list(range(T)), ret_format="flattened")
    torch.testing.assert_close(ours.flat(emb), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("task_id", [1, 3])
def test_stored_targets_match_calc_fix_target_reg(chunked: bool, task_id: int) -> None:
    ref, ours, emb = _pair(chunked)
    targets_ref = hreg.get_current_targets(task_id, ref)
    targets = compute_targets(ours, emb[:task_id])
    torch.testing.assert_close(targets, torch.stack([torch.cat([w.flatten() for w in t]) for t in targets_ref]))
    _perturb(ref, ours)  # "training" moves θ away from θ*
    expected = hreg.calc_fix_target_reg(ref, task_id, targets=targets_ref)
    got = regularization_loss(ours, emb[:task_id], targets=targets)
    assert float(expected.detach()) > 1e-3  # a non-trivial value
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunked", [False, True])
def test_online_targets_and_lookahead_match(chunked: bool) -> None:
    ref, ours, emb = _pair(chunked)
    prev_theta = [p.detach().clone() for p in ref.unconditional_params]
    prev_embs = [p.detach().clone() for p in ref.conditional_params]
    theta_star = ParameterSnapshot(ours)
    theta_star.copy_from(ours)
    _perturb(ref, ours)
    d_ref, d_ours = _delta_pairs(ref, ours)
    expected = hreg.calc_fix_target_reg(ref, 3, dTheta=d_ref, prev_theta=prev_theta, prev_task_embs=prev_embs)
    got = regularization_loss(ours, emb[:3], theta_star=theta_star.as_dict(), delta=d_ours)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # and the gradients w.r.t. θ agree too
    g_ref = torch.autograd.grad(expected, list(ref.unconditional_params))
    g_ours = dict(zip([n for n, _ in ours.named_parameters()], torch.autograd.grad(got, list(ours.parameters()))))
    torch.testing.assert_close(g_ours["head.weight"], g_ref[-2 if not chunked else -3], rtol=1e-6, atol=1e-10)


def test_gram_form_equals_calc_fix_target_reg_with_lookahead() -> None:
    """The Gram form against hypnettorch itself: online targets from θ*, look-ahead Δθ, chunks with a remainder."""
    ref, ours, emb = _pair(chunked=True)  # P = 172 in chunks of 50: the last chunk uses 22 of its 50 outputs
    prev_theta = [p.detach().clone() for p in ref.unconditional_params]
    prev_embs = [p.detach().clone() for p in ref.conditional_params]
    theta_star = ParameterSnapshot(ours)
    theta_star.copy_from(ours)
    _perturb(ref, ours)
    d_ref, d_ours = _delta_pairs(ref, ours)
    expected = hreg.calc_fix_target_reg(ref, 3, dTheta=d_ref, prev_theta=prev_theta, prev_task_embs=prev_embs)
    got = gram_regularization_loss(ours, emb[:3], theta_star.as_dict(), delta=d_ours)
    assert float(expected.detach()) > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 50, 43, 300], ids=["full", "remainder", "exact", "one-chunk"])
def test_gram_form_value_and_gradients_equal_the_materialized_sum(chunk_size: int | None) -> None:
    """Same value and the same gradients w.r.t. every hypernet parameter and the (moving) embeddings, float64."""
    torch.manual_seed(0)
    hnet = HyperNetwork(SHAPES, cond_dim=COND, hidden=(16, 7), activation="elu", chunk_size=chunk_size).double()
    theta_star = ParameterSnapshot(hnet)
    theta_star.copy_from(hnet)
    emb_star = torch.randn(4, COND, dtype=torch.float64)
    with torch.no_grad():
        for p in hnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    emb = (emb_star + 0.1 * torch.randn_like(emb_star)).requires_grad_(True)
    delta = {n: 0.01 * torch.randn_like(p) for n, p in hnet.named_parameters()}
    inputs = [emb, *hnet.parameters()]
    star = theta_star.as_dict()
    direct = regularization_loss(hnet, emb, theta_star=star, target_embeddings=emb_star, delta=delta)
    gram = gram_regularization_loss(hnet, emb, star, target_embeddings=emb_star, delta=delta)
    torch.testing.assert_close(gram, direct, rtol=1e-10, atol=0)
    for g_gram, g_direct in zip(torch.autograd.grad(gram, inputs), torch.autograd.grad(direct, inputs)):
        torch.testing.assert_close(g_gram, g_direct, rtol=1e-8, atol=1e-12)
    # at θ = θ*, e = e* the penalty and its gradient are exactly zero
    zero = gram_regularization_loss(hnet, emb_star, {n: p.detach() for n, p in hnet.named_parameters()})
    assert float(zero.detach()) == pytest.approx(0.0, abs=1e-12)


def test_hnet_features_feed_the_output_layer_and_gram_choice() -> None:
    hnet = HyperNetwork(SHAPES, cond_dim=COND, hidden=(16, 16), chunk_size=50)
    cond = torch.randn(3, COND)
    feats = hnet_features(hnet, cond)
    assert feats.shape == (3, hnet.num_chunks, 16)
    torch.testing.assert_close(hnet.head(feats).reshape(3, -1)[:, :172], hnet.flat(cond))
    with pytest.raises(ValueError, match="conditions must have shape"):
        hnet_features(hnet, cond[0])
    # 4 chunks, 16 features: the Gram form from k·4 >= 3·17 rows, i.e. k >= 13; never for an unchunked hypernet
    assert not gram_is_cheaper(hnet, 12) and gram_is_cheaper(hnet, 13)
    assert not gram_is_cheaper(HyperNetwork(SHAPES, cond_dim=COND, hidden=(4,)), 1000)


def test_random_subset_is_a_mean_over_the_drawn_tasks() -> None:
    ref, ours, emb = _pair(chunked=True)
    targets_ref = hreg.get_current_targets(4, ref)
    targets = compute_targets(ours, emb[:4])
    _perturb(ref, ours)
    np.random.seed(123)
    expected = hreg.calc_fix_target_reg(ref, 4, targets=targets_ref, batch_size=2)
    np.random.seed(123)
    ids = torch.as_tensor(np.random.choice(4, size=2, replace=False))
    got = regularization_loss(ours, emb[ids], targets=targets[ids])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_sample_previous_tasks_seeded_and_complete() -> None:
    a = sample_previous_tasks(50, 8, torch.Generator().manual_seed(7))
    b = sample_previous_tasks(50, 8, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and len(a.unique()) == 8 and int(a.max()) < 50  # same draw on every process
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    assert torch.equal(sample_previous_tasks(3, 8, gen), torch.arange(3))  # k >= T: all, no random number used
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError, match="k must be"):
        sample_previous_tasks(3, 0)
    with pytest.raises(ValueError, match="previous task"):
        sample_previous_tasks(0, None)


def test_output_regularizer_checks_shapes_and_hnet_flat_names() -> None:
    with pytest.raises(ValueError, match="pred and targets"):
        output_regularizer(torch.zeros(2, 3), torch.zeros(3, 3))
    _, ours, emb = _pair(chunked=False)
    with pytest.raises(KeyError, match="missing"):
        hnet_flat(ours, emb, {"head.weight": ours.head.weight})
    params = {n: p for n, p in ours.named_parameters()}
    torch.testing.assert_close(hnet_flat(ours, emb, params), ours.flat(emb))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_lookahead_equals_the_optimizer_step(kind: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    opt = (torch.optim.Adam if kind == "adam" else torch.optim.SGD)(model.parameters(), lr=0.05)
    for _ in range(3):  # build up Adam moments first
        opt.zero_grad()
        model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
        if kind == "adam" or _ < 2:
            opt.step()
    opt.zero_grad()
    model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
    delta = lookahead_delta(opt, list(model.parameters()), kind)
    shadow_model = copy.deepcopy(model)
    shadow_opt = (torch.optim.Adam if kind == "adam" else torch.optim.SGD)(shadow_model.parameters(), lr=0.05)
    shadow_opt.load_state_dict(opt.state_dict())
    for p, q in zip(shadow_model.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    before = [p.detach().clone() for p in shadow_model.parameters()]
    shadow_opt.step()
    for d, p, b in zip(delta, shadow_model.parameters(), before):
        torch.testing.assert_close(d, p.detach() - b, rtol=1e-9, atol=1e-12)
    assert lookahead_delta(opt, list(model.parameters()), "none") is None
    with pytest.raises(ValueError, match="lookahead"):
        lookahead_delta(opt, list(model.parameters()), "rmsprop")  # type: ignore[arg-type]
