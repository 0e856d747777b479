"""Cost of Self-Tuning Networks on CPU: STN CNN training step vs the same plain CNN, and vectorized per-example
augmentation vs a per-image torchvision loop (the official code's approach).

    python examples/benchmarks/stn_overhead.py            # paper-sized AlexNet, batch 128
    python examples/benchmarks/stn_overhead.py --quick    # < 2 minutes

The two sides of each ratio are timed alternately in the same loop (so machine load affects both equally); the
median over iterations is reported.

* Training step = forward + cross-entropy + backward + SGD step. Plain: ``AlexNetCNN`` with ``nn.Dropout2d`` /
  ``nn.Dropout`` at fixed rates. STN: ``StnAlexNet`` with per-example hypernet input (15 hyperparameters, perturbed)
  and per-example dropout rates; no augmentation on either side.
* Evaluation forward (no grad) at one λ for the whole batch: the STN layers fold ``W + diag(Vλ̃) W_h`` once.
* Layers (``--layers``, on by default): forward + backward of one ``StnLinear`` (1,024 → 1,024) and one
  ``StnConv2d`` (64 → 64, 3×3, 16×16 maps) with a per-example hypernet input (15 hyperparameters), against
  ``nn.Linear`` / ``nn.Conv2d`` of the same shape.
* Optimizer (``--optimizer``, on by default): an STN φ-step (forward + backward + optimizer step of
  ``StnAlexNet``) with the optimizer as ``torch.optim`` builds it by default (``foreach`` on CPU) against the same
  optimizer built by :func:`hyperlit.optim.build_optimizer` (PyTorch's fused kernel), for Adam and SGD with
  momentum; the optimizer step alone is timed too.
* Augmentation = per-example colour jitter (brightness, contrast, saturation, hue) + cutout. Loop: one
  ``torchvision.transforms.ColorJitter`` built per image with that image's strengths, then the official cutout
  (numpy mask), as in the official ``CustomCIFAR10.__getitem__``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from hyperlit.hparams import HyperparameterSpace
from hyperlit.models.stn_cnn import AlexNetCNN, StnAlexNet, alexnet_hyperparameters
from hyperlit.nn.augment import color_jitter, cutout
from hyperlit.nn.stn import StnConv2d, StnLinear
from hyperlit.optim import build_optimizer


def _official_cutout(img: torch.Tensor, holes: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    for _ in range(holes):
        y, x = rng.integers(h), rng.integers(w)
        y1, y2 = int(np.clip(y - length / 2, 0, h)), int(np.clip(y + length / 2, 0, h))
        x1, x2 = int(np.clip(x - length / 2, 0, w)), int(np.clip(x + length / 2, 0, w))
        mask[y1:y2, x1:x2] = 0.0
    return img * torch.from_numpy(mask)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(fns: tuple[Callable[[], object], Callable[[], object]], iters: int, warmup: int, device: torch.device):
    """Median seconds of each of two callables, timed alternately in one loop (load hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(iters + warmup):
        for fn, store in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                store.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_layers(batch: int, iters: int, device: torch.device) -> list[tuple[str, float, float]]:
    """Forward + backward of one STN layer (per-example λ̃) against the plain layer of the same shape."""
    torch.manual_seed(0)
    hdim = 15
    hnet = torch.randn(batch, hdim, device=device)
    rows = []
    cases = (
        ("linear 1024->1024", StnLinear(1024, 1024, hdim), torch.nn.Linear(1024, 1024), (batch, 1024)),
        (
            "conv 64->64 3x3 16x16",
            StnConv2d(64, 64, 3, hdim, padding=1),
            torch.nn.Conv2d(64, 64, 3, padding=1),
            (batch, 64, 16, 16),
        ),
    )
    for name, stn_layer, plain_layer, shape in cases:
        stn_layer, plain_layer = stn_layer.to(device), plain_layer.to(device)
        x = torch.randn(*shape, device=device, requires_grad=True)

        def plain_fb(layer=plain_layer, x=x) -> None:
            layer(x).square().mean().backward()

        def stn_fb(layer=stn_layer, x=x) -> None:
            layer(x, hnet).square().mean().backward()

        tp, ts = _alternate((plain_fb, stn_fb), iters, 2, device)
        rows.append((name, tp, ts))
    return rows


def bench_step(batch: int, iters: int, width: float) -> tuple[float, float]:
    torch.manual_seed(0)
    plain = AlexNetCNN(width=width).train()
    stn = StnAlexNet(width=width).train()
    space = HyperparameterSpace(alexnet_hyperparameters())
    names = space.names
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_s = torch.optim.SGD(stn.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    gen = torch.Generator().manual_seed(0)
    hp_conv = [n for n in names if n.startswith(("dropout", "fcdropout"))]

    def plain_step() -> None:
        opt_p.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_p.step()

    def stn_step() -> None:
        with torch.no_grad():
            lam = space.perturb(batch, generator=gen)
            values = space.constrained(lam)
        hp = {n: space.get(values, n) for n in hp_conv}  # the dropouts (augmentation is timed separately)
        opt_s.zero_grad(set_to_none=True)
        F.cross_entropy(stn(x, lam, hp, generator=gen), y).backward()
        opt_s.step()

    t_plain, t_stn = [], []
    for i in range(iters + 2):
        for fn, store in ((plain_step, t_plain), (stn_step, t_stn)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # warm-up iterations
                store.append(time.perf_counter() - t0)
    return statistics.median(t_plain), statistics.median(t_stn)


def bench_optimizer(batch: int, iters: int, width: float) -> list[tuple[str, float, float, float, float]]:
    """STN φ-step and optimizer step alone: torch's default implementation vs hyperlit's fused build, alternately."""
    space = HyperparameterSpace(alexnet_hyperparameters())
    hp_conv = [n for n in space.names if n.startswith(("dropout", "fcdropout"))]
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    rows = []
    factories = {
        "Adam lr 1e-3": lambda p: torch.optim.Adam(p, lr=1e-3),
        "SGD momentum 0.9": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    }
    for name, factory in factories.items():
        torch.manual_seed(0)
        nets = [StnAlexNet(width=width).train() for _ in range(2)]
        nets[1].load_state_dict(nets[0].state_dict())
        opts = [factory(nets[0].parameters()), build_optimizer(factory, nets[1].parameters(), "phi_optimizer")]
        assert opts[1].defaults["fused"] is True and opts[0].defaults["fused"] is None
        gen = torch.Generator().manual_seed(0)
        step_times: tuple[list[float], list[float]] = ([], [])
        opt_times: tuple[list[float], list[float]] = ([], [])
        for i in range(iters + 2):
            for net, opt, steps, only in zip(nets, opts, step_times, opt_times):
                with torch.no_grad():
                    lam = space.perturb(batch, generator=gen)
                    values = space.constrained(lam)
                hp = {n: space.get(values, n) for n in hp_conv}
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x, lam, hp, generator=gen), y).backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                if i >= 2:
                    steps.append(t2 - t0)
                    only.append(t2 - t1)
        rows.append(
            (
                name,
                statistics.median(step_times[0]),
                statistics.median(opt_times[0]),
                statistics.median(step_times[1]),
                statistics.median(opt_times[1]),
            )
        )
    return rows


def bench_eval(batch: int, iters: int, width: float) -> tuple[float, float]:
    """Evaluation forward pass (no grad, eval mode) at one λ for the batch: STN layers fold W + diag(Vλ̃) W_h."""
    torch.manual_seed(0)
    plain, stn = AlexNetCNN(width=width).eval(), StnAlexNet(width=width).eval()
    space = HyperparameterSpace(alexnet_hyperparameters())
    x = torch.rand(batch, 3, 32, 32)
    hnet = space.repeat(batch).detach()
    t_plain, t_stn = [], []
    with torch.no_grad():
        for i in range(iters + 1):
            for fn, store in ((lambda: plain(x), t_plain), (lambda: stn(x, hnet), t_stn)):
                t0 = time.perf_counter()
                fn()
                if i >= 1:
                    store.append(time.perf_counter() - t0)
    return statistics.median(t_plain), statistics.median(t_stn)


def bench_augment(batch: int, iters: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32)
    strengths = torch.rand(batch, 4, generator=g) * torch.tensor([1.0, 1.0, 1.0, 0.5])
    length = torch.randint(0, 24, (batch,), generator=g).float()
    holes = torch.randint(0, 4, (batch,), generator=g).float()
    rng = np.random.default_rng(0)

    def loop() -> torch.Tensor:
        out = []
        for b in range(batch):
            bri, con, sat, hue = strengths[b].tolist()
            jitter = transforms.ColorJitter(bri, con, sat, hue)
            out.append(_official_cutout(jitter(x[b]), int(holes[b]), int(length[b]), rng))
        return torch.stack(out)

    def vectorized() -> torch.Tensor:
        s = strengths
        out = color_jitter(x, s[:, 0], s[:, 1], s[:, 2], s[:, 3], generator=g)
        return cutout(out, length, holes, generator=g)

    t_loop, t_vec = [], []
    for i in range(iters + 1):
        for fn, store in ((loop, t_loop), (vectorized, t_vec)):
            t0 = time.perf_counter()
            fn()
            if i >= 1:
                store.append(time.perf_counter() - t0)
    return statistics.median(t_loop), statistics.median(t_vec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 2 minutes)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the AlexNet (1.0 = paper)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    step_iters, aug_iters = (5, 5) if args.quick else (20, 20)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, width {args.width}")
    for name, tp, ts in bench_layers(args.batch, aug_iters, torch.device("cpu")):
        print(
            f"layer fwd+bwd  {name:<22} plain {tp * 1e3:7.2f} ms   STN {ts * 1e3:7.2f} ms   ratio STN/plain {ts / tp:.2f}x"
        )
    tp, ts = bench_step(args.batch, step_iters, args.width)
    print(f"training step  plain CNN {tp * 1e3:8.1f} ms   STN CNN {ts * 1e3:8.1f} ms   ratio STN/plain {ts / tp:.2f}x")
    for name, td, od, tf, of in bench_optimizer(args.batch, step_iters, args.width):
        print(
            f"phi-step {name:<17} torch default {td * 1e3:8.1f} ms (step {od * 1e3:6.1f} ms)   "
            f"hyperlit fused {tf * 1e3:8.1f} ms (step {of * 1e3:6.1f} ms)   "
            f"optimizer share {od / td:.0%} -> {of / tf:.0%}, phi-step speed-up {td / tf:.2f}x"
        )
    ep, es = bench_eval(args.batch, aug_iters, args.width)
    print(f"eval forward   plain CNN {ep * 1e3:8.1f} ms   STN CNN {es * 1e3:8.1f} ms   ratio STN/plain {es / ep:.2f}x")
    tl, tv = bench_augment(args.batch, aug_iters)
    print(f"augmentation   per-image loop {tl * 1e3:8.1f} ms   vectorized {tv * 1e3:8.1f} ms   speed-up {tl / tv:.1f}x")


if __name__ == "__main__":
    main()
