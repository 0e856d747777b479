"""Training-step time against the number of previous tasks: our vectorized regularizer vs hypnettorch's loop.

Both learners use the *same* hypernetwork (a hypnettorch ``HMLP``/``ChunkedHMLP`` copied into
:class:`~hyperlit.nn.hypernet.HyperNetwork`, see :mod:`hyperlit.continual.interop`), the same target MLP, batch,
stored targets and Adam. One training step = generate the current task's weights, task loss on a batch, output
regularizer over the previous tasks (all of them, or k drawn at random), backward, Adam step.

* ours: ``HyperContinualModule.forward`` + ``HyperContinualModule.regularizer`` — for chunked hypernetworks in both
  forms of ``reg_method``: ``materialize`` (one batched hypernet call for all regularized tasks, their (k, P) weights
  compared with the stored targets) and ``gram`` (the same value from Gram matrices of the output layer, no (k, P)
  tensor); ``auto``, the default, takes the Gram form from k·C ≥ 3(h+1) regularized rows;
* hypnettorch: ``hnet.forward(cond_id=t)`` + ``mnet.forward`` + ``calc_fix_target_reg`` — one hypernet call per
  previous task (Python loop).

Settings: ``toy`` (full hypernet [10, 10] → 1-10-10-1 MLP, the paper's 1-D toy), ``pmnist`` (chunked
hypernet [100, 100], chunk 1,000, embeddings 8/8 → 784-100-100-10 MLP, batch 128, cl.md §8.4 B2) and ``pm10`` (the
official PermutedMNIST-10 sizes: chunked hypernet [25, 25] ELU, chunk 78,000, task embedding 24, chunk embedding 8
→ 1024-1000-1000-100 MLP, 2,126,100 weights, batch 128).

    python examples/benchmarks/cl_regularizer_benchmark.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from hyperlit.continual.interop import copy_from_hypnettorch
from hyperlit.continual.module import HyperContinualModule

SETTINGS = {
    "toy": dict(
        input_dim=1,
        output_dim=1,
        hidden=(10, 10),
        activation="sigmoid",
        task_type="regression",
        hnet_hidden=(10, 10),
        hnet_activation="sigmoid",
        emb_dim=2,
        chunk_size=None,
        batch=32,
    ),
    "pmnist": dict(
        input_dim=784,
        output_dim=10,
        hidden=(100, 100),
        activation="relu",
        task_type="classification",
        hnet_hidden=(100, 100),
        hnet_activation="relu",
        emb_dim=8,
        chunk_size=1000,
        batch=128,
    ),
    "pm10": dict(
        input_dim=1024,
        output_dim=100,
        hidden=(1000, 1000),
        activation="relu",
        task_type="classification",
        hnet_hidden=(25, 25),
        hnet_activation="elu",
        emb_dim=24,
        chunk_size=78000,
        batch=128,
    ),
}
PREVIOUS = {"toy": (2, 10, 50), "pmnist": (2, 10, 50), "pm10": (0, 1, 3, 9)}  # pm10: tasks 1, 2, 4 and 10
ACTIVATIONS = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU, "elu": torch.nn.ELU}


def _timeit(step: Callable[[], None], reps: int, warmup: int = 3) -> float:
    """Median wall time of ``step`` in milliseconds."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def build(setting: str, num_tasks: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from hypnettorch.hnets import HMLP, ChunkedHMLP
    from hypnettorch.mnets import MLP as HMLPTarget

    s = SETTINGS[setting]
    torch.manual_seed(seed)
    act = ACTIVATIONS[s["activation"]]()
    mnet = HMLPTarget(
        s["input_dim"], s["output_dim"], hidden_layers=s["hidden"], activation_fn=act, no_weights=True, verbose=False
    )
    h_act = ACTIVATIONS[s["hnet_activation"]]()
    if s["chunk_size"] is None:
        hnet = HMLP(
            mnet.param_shapes,
            cond_in_size=s["emb_dim"],
            layers=s["hnet_hidden"],
            activation_fn=h_act,
            num_cond_embs=num_tasks,
            verbose=False,
        )
    else:
        hnet = ChunkedHMLP(
            mnet.param_shapes,
            chunk_size=s["chunk_size"],
            chunk_emb_size=8,
            cond_in_size=s["emb_dim"],
            layers=s["hnet_hidden"],
            activation_fn=h_act,
            num_cond_embs=num_tasks,
            verbose=False,
        )
    ours = HyperContinualModule(
        num_tasks=num_tasks,
        input_dim=s["input_dim"],
        output_dim=s["output_dim"],
        hidden=s["hidden"],
        activation=s["activation"],
        task_type=s["task_type"],
        hnet_hidden=s["hnet_hidden"],
        hnet_activation=s["hnet_activation"],
        chunk_size=s["chunk_size"],
        chunk_emb_dim=8,
        emb_dim=s["emb_dim"],
        beta=0.01,
        infer_task=False,
        track_drift=False,
    )
    with torch.no_grad():
        ours.task_embeddings.copy_(copy_from_hypnettorch(hnet, ours.hnet))
    return s, mnet, hnet, ours


def bench(setting: str, prev: int, reps: int, k: int | None) -> dict[str, float]:
    """Step times (ms) with ``prev`` previous tasks: ours (all tasks; chunked: both forms), ours (k random, the
    default form), hypnettorch's loop."""
    from hypnettorch.utils import hnet_regularizer as hreg

    s, mnet, hnet, ours = build(setting, prev + 1)
    x = torch.randn(s["batch"], s["input_dim"])
    if s["task_type"] == "classification":
        y = torch.randint(0, s["output_dim"], (s["batch"],))
        loss_fn = torch.nn.functional.cross_entropy
    else:
        y = torch.randn(s["batch"], 1)
        loss_fn = torch.nn.functional.mse_loss
    beta = 0.01
    # ours: task switch computes the stored targets of all previous tasks in one call
    for t in range(prev + 1):
        ours.start_task(t)
    if prev > 0:  # stored targets for the materialized form (the default may have chosen the Gram form)
        with torch.no_grad():
            ours.register_buffer("reg_targets", ours.hnet.flat(ours.task_embeddings[:prev]).detach())
    reg_beta = beta if prev > 0 else 0.0  # the first task has nothing to regularize
    opt = torch.optim.Adam([{"params": list(ours.hnet.parameters())}, {"params": [ours.task_embeddings]}], lr=1e-4)

    def ours_step(num: int | None, method: str = "auto") -> Callable[[], None]:
        ours.hparams.reg_num_tasks = num
        ours.hparams.reg_method = method

        def step() -> None:
            opt.zero_grad()
            loss = loss_fn(ours(x, prev), y)
            if prev > 0:
                loss = loss + reg_beta * ours.regularizer(prev)
            loss.backward()
            opt.step()

        return step

    chunked = s["chunk_size"] is not None
    t_ours = _timeit(ours_step(None, "materialize"), reps)
    t_gram = _timeit(ours_step(None, "gram"), reps) if chunked and prev > 0 else float("nan")
    ours.hparams.reg_method = "auto"
    t_auto = t_gram if chunked and prev > 0 and ours.uses_gram(prev) else t_ours
    t_sub = _timeit(ours_step(k), reps) if k is not None and k < prev else t_auto
    targets = hreg.get_current_targets(prev, hnet) if prev > 0 else None
    h_opt = torch.optim.Adam(hnet.parameters(), lr=1e-4)

    def hnt_step() -> None:
        h_opt.zero_grad()
        out = mnet.forward(x, weights=hnet.forward(cond_id=prev))
        loss = loss_fn(out, y)
        if prev > 0:
            loss = loss + reg_beta * hreg.calc_fix_target_reg(hnet, prev, targets=targets)
        loss.backward()
        h_opt.step()

    t_hnt = _timeit(hnt_step, reps)
    return {"ours": t_ours, "gram": t_gram, "auto": t_auto, "ours_k": t_sub, "hypnettorch": t_hnt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 2 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--k", type=int, default=8, help="size of the random subset of previous tasks")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None, help="default: all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = {"toy": 30 if args.quick else 200, "pmnist": 3 if args.quick else 20, "pm10": 2 if args.quick else 10}
    settings = args.settings or (["toy", "pmnist"] if args.quick else list(SETTINGS))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; median step time in ms")
    print("T = previous tasks regularized; ours (all) = materialized form, gram = Gram form, default = reg_method auto")
    print(
        f"{'setting':8} {'T':>4} | {'ours (all)':>10} {'gram':>8} {'default':>8} {'ours (k=' + str(args.k) + ')':>11}"
        f" {'hypnettorch':>11} | {'speedup':>7}"
    )
    base: dict[str, float] = {}
    for setting in settings:
        for prev in PREVIOUS[setting]:
            r = bench(setting, prev, reps[setting], args.k)
            base.setdefault(setting, r["auto"])
            print(
                f"{setting:8} {prev:>4} | {r['ours']:>10.2f} {r['gram']:>8.2f} {r['auto']:>8.2f} {r['ours_k']:>11.2f}"
                f" {r['hypnettorch']:>11.2f} | {r['hypnettorch'] / r['auto']:>6.1f}x",
                flush=True,
            )
        last = PREVIOUS[setting][-1]
        print(
            f"{'':8} ours T={last} / ours T={PREVIOUS[setting][0]}: {r['auto'] / base[setting]:.2f}x, "
            f"k={args.k}: {r['ours_k'] / base[setting]:.2f}x"
        )


if __name__ == "__main__":
    main()
