"""Training throughput (tokens/second) of the STN LSTM against ``torch.nn.LSTM`` of the same size.

Measured side by side in one process, forward + backward on random BPTT windows (time first):

* ``lstm layers``: a 2-layer LSTM stack alone — ``torch.nn.LSTM(num_layers=2)`` (fused kernel; cuDNN on a GPU),
  the plain :class:`~hyperlit.nn.stn_lstm.DropConnectLSTM` layers (fused kernel on DropConnect-masked weights) and
  the :class:`~hyperlit.nn.stn_lstm.StnLSTM` layers (structured best response; input projection in one matmul,
  recurrence stepped in Python) with 7 hypernet inputs;
* ``language model``: the whole training step of the PTB model (embedding, dropouts, DropConnect, tied decoder
  over the vocabulary, cross-entropy + AR/TAR): plain (``hdim=0``) against STN (7 hyperparameters).

Usage::

    python examples/benchmarks/stn_lstm_throughput.py --quick          # < 2 minutes on 2 CPU cores
    python examples/benchmarks/stn_lstm_throughput.py                  # the paper's size: 650 units, 40 × 70
    python examples/benchmarks/stn_lstm_throughput.py --device cuda    # on a GPU (cuDNN for the nn.LSTM baseline)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from hyperlit.models.stn_lstm_lm import LM_HPARAMS, StnLSTMLanguageModel, lm_training_loss
from hyperlit.nn.stn_lstm import DropConnectLSTM, StnLSTM


def _time(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_layers(hidden: int, batch: int, bptt: int, reps: int, device: torch.device) -> dict[str, float]:
    x = torch.randn(bptt, batch, hidden, device=device)
    lam = torch.randn(batch, len(LM_HPARAMS), device=device)
    ref = nn.LSTM(hidden, hidden, num_layers=2).to(device)
    plain = nn.ModuleList(DropConnectLSTM(hidden, hidden) for _ in range(2)).to(device)
    stn = nn.ModuleList(StnLSTM(hidden, hidden, len(LM_HPARAMS)) for _ in range(2)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def run_ref() -> None:
        ref(x)[0].sum().backward()

    def run_plain() -> None:
        h = x
        for layer in plain:
            h, _ = layer(h, None, 0.05, gen)
        h.sum().backward()

    def run_stn() -> None:
        h = x
        for layer in stn:
            h, _ = layer(h, None, lam, 0.05, gen)
        h.sum().backward()

    tokens = bptt * batch
    return {
        name: tokens / _time(fn, reps, device)
        for name, fn in (("torch.nn.LSTM", run_ref), ("DropConnectLSTM (plain)", run_plain), ("StnLSTM", run_stn))
    }


def bench_lm(hidden: int, batch: int, bptt: int, vocab: int, reps: int, device: torch.device) -> dict[str, float]:
    tokens = torch.randint(0, vocab, (bptt, batch), device=device)
    targets = torch.randint(0, vocab, (bptt, batch), device=device)
    hp = {n: torch.full((batch,), 0.05, device=device) for n in LM_HPARAMS}
    lam = torch.randn(batch, len(LM_HPARAMS), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, hdim in (("plain LM (fused LSTM)", 0), ("STN LM (7 hyperparameters)", len(LM_HPARAMS))):
        model = StnLSTMLanguageModel(vocab, hidden, hidden, hdim=hdim).to(device).train()

        def step(model: StnLSTMLanguageModel = model) -> None:
            res = model(tokens, lam, hp, gen)
            loss, _ = lm_training_loss(res, targets, hp["alpha"][0], hp["beta"][0])
            loss.backward()

        out[name] = bptt * batch / _time(step, reps, device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (< 2 minutes)")
    parser.add_argument("--hidden", type=int, default=None, help="units per layer = embedding size (default 650)")
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--bptt", type=int, default=70)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    hidden = args.hidden or (200 if args.quick else 650)
    reps = args.reps or (3 if args.quick else 5)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {where}; hidden = embedding = {hidden}, batch {args.batch}, bptt {args.bptt}, "
        f"vocab {args.vocab}, median of {reps} forward+backward passes"
    )
    for title, results in (
        ("2-layer LSTM stack", bench_layers(hidden, args.batch, args.bptt, reps, device)),
        ("language-model training step", bench_lm(hidden, args.batch, args.bptt, args.vocab, reps, device)),
    ):
        base = next(iter(results.values()))
        print(f"\n{title}")
        print(f"  {'model':<30}{'tokens/s':>12}{'vs first':>10}")
        for name, tps in results.items():
            print(f"  {name:<30}{tps:>12,.0f}{tps / base:>9.2f}x")


if __name__ == "__main__":
    main()
