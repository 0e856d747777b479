"""``examples/benchmarks/gpu_check.py``, the prepared device check, run here on the CPU (``--device cpu``).

One subprocess trains two small modules (the best-response hypernetwork and the continual hypernetwork, built from
their example YAMLs) for two batches in both precisions and compares two CPU runs' losses; its printed table and
JSON are checked. The no-CUDA path, the option errors, the tolerance rule and the device-independent random draws
of the correctness check are tested in-process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "benchmarks" / "gpu_check.py"
MODULES = ("br_perweight", "cl_pm10")
PRECISIONS = ("32-true", "bf16-mixed")
STEPS = 2


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    """The script imported as a module (``gpu_check``)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--modules",
            ",".join(MODULES),
            "--steps",
            str(STEPS),
            "--check-steps",
            str(STEPS),
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"gpu_check.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.slow  # the CPU subprocess run of the script (~40 s under load)
def test_cpu_run_prints_one_table_line_per_module_and_precision(cpu_run: tuple) -> None:
    proc, _ = cpu_run
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu_check: device CPU, 1 threads") and "no data sets are read" in lines[0]
    for module in MODULES:
        for precision in PRECISIONS:
            # module, precision, timed steps, steps/s, examples/s, tokens/s (-), peak MiB (- on the CPU), final loss
            row = rf"^{module}\s+{precision}\s+{STEPS}\s+\d+\.\d\d\s+[\d,]+\s+-\s+-\s+\d+\.\d{{4}}$"
            assert sum(bool(re.match(row, line)) for line in lines) == 1, (row, proc.stdout)
        assert re.search(rf"^  PASS {module}\s+max rel diff 0\.00e\+00", proc.stdout, re.M), proc.stdout
    assert lines[-1].startswith("RESULT gpu_check: PASS (4 timed runs, 2 CPU comparisons, 0 errors, 0 skipped, ")


@pytest.mark.slow  # the CPU subprocess run of the script (~40 s under load)
def test_cpu_run_writes_the_json_fields(cpu_run: tuple) -> None:
    _, payload = cpu_run
    assert payload["passed"] is True and payload["synthetic_data"] is True
    assert payload["errors"] == [] and payload["skipped"] == []
    assert payload["rtol"] == 1e-3 and payload["atol"] == 1e-5
    runs = {(r["module"], r["precision"]): r for r in payload["results"]}
    assert set(runs) == {(m, p) for m in MODULES for p in PRECISIONS}
    for (module, _), run in runs.items():
        assert run["device"] == "cpu" and run["unit"] == "examples" and run["peak_mem_mib"] is None
        assert run["steps"] == run["timed_steps"] == STEPS
        assert run["steps_per_s"] > 0 and run["examples_per_s"] == pytest.approx(run["steps_per_s"] * run["per_step"])
        assert run["per_step"] == {"br_perweight": 100, "cl_pm10": 128}[module]  # the YAMLs' batch sizes
        assert math.isfinite(run["final_loss"]) and run["final_loss"] == run["losses"][-1]
    assert run["config"] == "examples/cl_permuted_mnist.yaml" and run["class"] == "HyperContinualModule"
    assert [c["module"] for c in payload["checks"]] == list(MODULES)
    for check in payload["checks"]:
        assert check["pass"] is True and len(check["cpu_losses"]) == STEPS
        assert check["device_losses"] == check["cpu_losses"] and check["max_rel_diff"] == 0.0


def test_without_cuda_says_so_and_exits_0(
    gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in ([], ["--device", "cuda", "--modules", "stn_ptb"]):
        assert gpu_check.main(argv) == 0
        assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA
    assert gpu_check.NO_CUDA.startswith("gpu_check: no CUDA device")


def test_unknown_module_is_refused(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--device", "cpu", "--modules", "br_perweight,nope"])
    assert info.value.code == 2
    assert "unknown --modules ['nope']; known: ['stn_cifar10'" in capsys.readouterr().err


def test_spent_budget_skips_the_timed_runs(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu", "--modules", "br_perweight", "--budget", "0", "--check-steps", "0"]) == 0
    out = capsys.readouterr().out
    for precision in ("32-true", "bf16-mixed"):
        assert re.search(rf"^br_perweight\s+{precision}\s+SKIPPED \(--budget 0 s spent\)$", out, re.M), out
    assert "RESULT gpu_check: PASS (0 timed runs, 0 CPU comparisons, 0 errors, 2 skipped, " in out


def test_registry_builds_every_module_from_its_yaml(gpu_check: ModuleType) -> None:
    names = [c.name for c in gpu_check.CHECKS]
    assert names == [
        "stn_cifar10",
        "stn_ptb",
        "br_perweight",
        "phn_ls",
        "phn_epo",
        "cosmos",
        "cl_pm10",
        "dstn_cifar10",
        "implicit_perweight",
        "unrolled_perweight",
        "batch_ensemble_wrn",
        "hbe_wrn",
    ]
    for check in gpu_check.CHECKS:
        config = gpu_check.load_config(check)
        assert (gpu_check.EXAMPLES / check.config).is_file()
        for key, value in check.overrides.items():
            assert config["model"]["init_args"][key] == value
    assert gpu_check.load_config(gpu_check.CHECKS[3])["model"]["init_args"]["solver"] == "ls"
    br = gpu_check.CHECKS[2]
    assert gpu_check.load_config(br)["model"]["init_args"]["train_steps"] == 10  # the YAML's, for the timed runs
    assert gpu_check.load_config(br, comparison=True)["model"]["init_args"]["train_steps"] == 2


def test_compare_applies_the_tolerance(gpu_check: ModuleType) -> None:
    ok, worst = gpu_check.compare([1.0, 2.0], [1.0009, 2.0], rtol=1e-3, atol=0.0)
    assert ok and worst == pytest.approx(9e-4)
    assert not gpu_check.compare([1.0, 2.0], [1.0011, 2.0], rtol=1e-3, atol=0.0)[0]
    assert gpu_check.compare([0.0], [1e-6], rtol=1e-3, atol=1e-5)[0]  # atol covers losses near zero
    assert not gpu_check.compare([1.0, 2.0], [1.0], rtol=1e-3, atol=1e-5)[0]  # a run that stopped early
    assert not gpu_check.compare([1.0], [float("nan")], rtol=1e-3, atol=1e-5)[0]
    assert not gpu_check.compare([], [], rtol=1e-3, atol=1e-5)[0]  # nothing logged is not a pass


def test_check_draws_every_random_number_on_the_cpu(gpu_check: ModuleType) -> None:
    from hyperlit.base import HyperlitModule

    rand, rng = torch.rand, HyperlitModule.rng
    with gpu_check.same_draws_on_every_device():
        module = HyperlitModule(seed=3)
        module.to("meta")  # a non-CPU device: the module's generator stays a CPU generator
        assert module.rng.device.type == "cpu"
        expected = torch.Generator().manual_seed(3)
        drawn = torch.rand(2, 3, generator=module.rng, device="meta", dtype=torch.float64)
        assert drawn.device.type == "meta" and drawn.shape == (2, 3) and drawn.dtype == torch.float64
        rand(2, 3, generator=expected, dtype=torch.float64)  # the meta draw advanced the CPU generator the same
        assert torch.equal(torch.randn(4, generator=module.rng), torch.randn(4, generator=expected))
        on_cpu = torch.randint(0, 9, (5,), generator=torch.Generator().manual_seed(1), device="cpu")
        assert torch.equal(on_cpu, torch.randint(0, 9, (5,), generator=torch.Generator().manual_seed(1)))
    assert torch.rand is rand and HyperlitModule.rng is rng  # restored


def test_comparison_turns_tf32_off_and_restores_it(gpu_check: ModuleType) -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with gpu_check.no_tf32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
