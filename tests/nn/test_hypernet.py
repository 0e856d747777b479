"""Contracts of the generic :class:`~hyperlit.nn.HyperNetwork`: equivalence with the target, shapes, sizes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlit.nn import HyperNetwork, batched_call, call_with_weights, target_shapes


def _targets() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return {
        "linear": (nn.Linear(6, 4), torch.randn(5, 6)),
        "conv2d": (nn.Conv2d(3, 4, kernel_size=3, padding=1, stride=2), torch.randn(2, 3, 9, 9)),
        "lstm": (nn.LSTM(4, 5, num_layers=2, batch_first=True), torch.randn(2, 7, 4)),
    }


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["linear", "conv2d", "lstm"])
@pytest.mark.parametrize("hidden", [(), (7,), (16, 16)])
def test_output_set_to_target_parameters_reproduces_target_exactly(kind: str, hidden: tuple[int, ...]) -> None:
    target, x = _targets()[kind]
    hnet = HyperNetwork(target, cond_dim=3, hidden=hidden, out_init_std=0.0, init_bias_from_target=True)
    cond = torch.randn(4, 3)
    weights = hnet(cond)
    expected = target(x)
    single = call_with_weights(target, {n: w[2] for n, w in weights.items()}, x)
    assert torch.equal(_first(single), _first(expected))
    batched = batched_call(target, weights, x)
    assert _first(batched).shape == (4, *_first(expected).shape)
    for k in range(4):  # vmap batches the matmuls: equal up to float rounding
        torch.testing.assert_close(_first(batched)[k], _first(expected))
    if kind == "lstm":  # the (h, c) states too
        for got, want in zip(batched[1], expected[1]):
            torch.testing.assert_close(got[1], want)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "lstm"])
def test_set_output_bias_after_training_reproduces_target(kind: str) -> None:
    target, x = _targets()[kind]
    hnet = HyperNetwork(target, cond_dim=2, hidden=(8,))
    nn.init.zeros_(hnet.head.weight)
    hnet.set_output_bias(dict(target.named_parameters()))
    out = call_with_weights(target, hnet(torch.randn(2)), x)
    assert torch.equal(_first(out), _first(target(x)))


def test_paper_parameter_counts() -> None:
    """Lorraine & Duvenaud's three MNIST hypernets for a 784-10 linear model (7,850 weights)."""
    target = nn.Linear(784, 10)
    glob = HyperNetwork(target, cond_dim=1, hidden=(50,), activation="relu")
    local = HyperNetwork(target, cond_dim=1, hidden=())
    factorized = HyperNetwork(target, cond_dim=7850, hidden=(10,), activation="none")
    assert glob.num_target_params == 7850
    assert glob.num_parameters() == 400_450
    assert local.num_parameters() == 15_700
    assert factorized.num_parameters() == 164_860


@pytest.mark.parametrize(
    ("hidden", "activation", "chunk_size"),
    [((32, 32), "relu", None), ((), "none", None), ((3,), "none", None), ((16,), "elu", 10)],
    ids=["heads", "linear", "factorized", "chunked"],
)
def test_shapes_and_batching(hidden: tuple[int, ...], activation: str, chunk_size: int | None) -> None:
    target = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    hnet = HyperNetwork(target, cond_dim=4, hidden=hidden, activation=activation, chunk_size=chunk_size)
    shapes = target_shapes(target)
    cond = torch.randn(6, 4)
    out = hnet(cond)
    assert list(out) == list(shapes)
    for name, shape in shapes.items():
        assert out[name].shape == (6, *shape)
    single = hnet(cond[3])
    for name, shape in shapes.items():
        assert single[name].shape == shape
        torch.testing.assert_close(single[name], out[name][3])
    assert hnet.flat(cond).shape == (6, hnet.num_target_params)
    # batching: each row depends only on its own condition
    perm = torch.randperm(6)
    torch.testing.assert_close(hnet.flat(cond[perm]), hnet.flat(cond)[perm])


def test_linear_hypernet_is_affine_and_factorized_has_rank_r() -> None:
    target = nn.Linear(6, 5)
    lin = HyperNetwork(target, cond_dim=4, hidden=())
    c1, c2 = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(lin.flat(0.3 * c1 + 0.7 * c2), 0.3 * lin.flat(c1) + 0.7 * lin.flat(c2))
    fac = HyperNetwork(target, cond_dim=12, hidden=(3,), activation="none")
    jac = torch.func.jacrev(fac.flat)(torch.randn(12))
    assert jac.shape == (35, 12)
    assert torch.linalg.matrix_rank(jac).item() == 3
    mlp = HyperNetwork(target, cond_dim=12, hidden=(3,), activation="tanh")
    c = torch.randn(12)
    assert not torch.allclose(mlp.flat(2 * c) - mlp.flat(c), mlp.flat(c) - mlp.flat(torch.zeros(12)), atol=1e-4)


def test_chunked_equals_manual_chunks_and_compresses() -> None:
    target = nn.Linear(100, 20)  # 2,020 target parameters
    hnet = HyperNetwork(target, cond_dim=2, hidden=(8,), chunk_size=50, chunk_emb_dim=4)
    assert hnet.num_chunks == 41
    cond = torch.randn(3, 2)
    flat = hnet.flat(cond)
    manual = torch.cat(
        [
            hnet.head(hnet.trunk(torch.cat([cond, hnet.chunk_embeddings[i].expand(3, -1)], dim=-1)))
            for i in range(hnet.num_chunks)
        ],
        dim=-1,
    )[:, :2020]
    torch.testing.assert_close(flat, manual)
    expected_params = (2 + 4) * 8 + 8 + 8 * 50 + 50 + 41 * 4
    assert hnet.num_parameters() == expected_params
    assert hnet.compression_ratio() == pytest.approx(expected_params / 2020)
    assert hnet.compression_ratio() < 1
    assert hnet.compression_ratio(extra=10) == pytest.approx((expected_params + 10) / 2020)


def test_exclude_keeps_parameters_out_of_the_hypernet() -> None:
    target = nn.ModuleDict({"body": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    hnet = HyperNetwork(target, cond_dim=1, hidden=(), exclude=("head",))
    assert hnet.names == ["body.weight", "body.bias"]
    assert hnet.num_target_params == 20


def test_gradients_reach_the_condition() -> None:
    target = nn.Linear(3, 2)
    hnet = HyperNetwork(target, cond_dim=2, hidden=(5,), activation="tanh")
    cond = torch.randn(2, dtype=torch.float64, requires_grad=True)
    hnet = hnet.double()
    x = torch.randn(4, 3, dtype=torch.float64)

    def f(c: torch.Tensor) -> torch.Tensor:
        return call_with_weights(target.double(), hnet(c), x).square().sum()

    assert torch.autograd.gradcheck(f, (cond,))


@pytest.mark.parametrize("bad", [torch.randn(3), torch.randn(2, 5), torch.randn(2, 3, 4), torch.randn(0)])
def test_bad_condition_shapes_raise(bad: torch.Tensor) -> None:
    hnet = HyperNetwork(nn.Linear(3, 2), cond_dim=4, hidden=(5,))
    with pytest.raises(ValueError, match="condition must have shape"):
        hnet(bad)


def test_bad_arguments_raise() -> None:
    target = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="cond_dim"):
        HyperNetwork(target, cond_dim=0)
    with pytest.raises(ValueError, match="hidden"):
        HyperNetwork(target, cond_dim=1, hidden=(0,))
    with pytest.raises(ValueError, match="chunk_size"):
        HyperNetwork(target, cond_dim=1, chunk_size=0)
    with pytest.raises(ValueError, match="activation"):
        HyperNetwork(target, cond_dim=1, hidden=(3,), activation="swishy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-chunked"):
        HyperNetwork(target, cond_dim=1, chunk_size=4, init_bias_from_target=True)
    with pytest.raises(ValueError, match="no parameters"):
        HyperNetwork(nn.ReLU(), cond_dim=1)
    hnet = HyperNetwork(target, cond_dim=1, hidden=())
    with pytest.raises(KeyError, match="bias"):
        hnet.set_output_bias({"weight": torch.zeros(2, 3)})
