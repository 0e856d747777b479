"""Every benchmark script's ``--quick`` mode runs to the end and prints its result table (so the scripts cannot rot).

Benchmarks are not tests: their figures are recorded in ``docs/benchmarks.md``. These slow tests only check that
each script still runs on the current library and prints the lines its documentation quotes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "examples" / "benchmarks"

# (script, extra arguments, needs the real data, a string its output must contain)
SCRIPTS = [
    ("stn_overhead.py", ["--threads", "1"], False, "ratio STN/plain"),
    ("stn_vs_hpo.py", [], True, "RESULT"),
    ("stn_lstm_throughput.py", ["--threads", "1"], False, "tokens/s"),
    ("best_response_benchmark.py", [], False, "median over seeds"),
    ("pareto_benchmark.py", ["--threads", "1"], True, "RESULT fronts"),
    ("pareto_comparison.py", ["--threads", "1"], True, "RESULT pareto_comparison"),
    ("pareto_epo_variants.py", ["--threads", "1"], True, "RESULT speed"),
    ("cl_regularizer_benchmark.py", [], False, "ours T=50 / ours T=2"),
    ("cl_permuted_mnist_baselines.py", [], True, "hypernetwork (beta="),
    ("cl_permuted_mnist10.py", ["--threads", "1"], True, "RESULT tasks=3"),
    ("cl_split_cifar10.py", ["--threads", "1"], True, "RESULT tasks=2"),
    ("cl_split_mnist.py", ["--threads", "1"], True, "RESULT splitmnist tasks=5"),
    ("ewc_fisher_speed.py", ["--quick"], False, "RESULT fisher"),
    ("br_defaults_sweep.py", [], False, "RESULT (2 problems"),
    ("ld_toy.py", [], True, "RESULT λ̂ ="),
    ("perweight_l2_hpo.py", ["--threads", "1"], True, "RESULT linear unrolled"),
    ("hypergradient_cost.py", [], False, "RESULT hidden=0 implicit/step="),
    ("ensembles_benchmark.py", [], True, "RESULT ensembles_benchmark"),
    (
        "gpu_check.py",
        ["--device", "cpu", "--threads", "1", "--modules", "br_perweight,cl_pm10"],
        False,
        "RESULT gpu_check: PASS",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "needs_data", "expected"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_benchmark_quick_mode_runs(
    script: str, args: list[str], needs_data: bool, expected: str, request: pytest.FixtureRequest
) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    if needs_data:
        env["HYPERLIT_DATA_DIR"] = str(request.getfixturevalue("real_data_dir"))
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert expected in proc.stdout, f"{script} --quick did not print {expected!r}:\n{proc.stdout[-3000:]}"


def test_every_benchmark_script_is_covered() -> None:
    """A new script in examples/benchmarks/ must be added to SCRIPTS (and so get its slow ``--quick`` run)."""
    on_disk = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert on_disk == {s[0] for s in SCRIPTS}
