"""The GPU check script (scripts/gpu_check.py) stays valid without a GPU:
its plan fits the lent machine's window, every stage's command line is one
its benchmark accepts, and the files it promises are the ones the stages write."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load("scripts/gpu_check.py", "gpu_check")


def test_plan_fits_the_window(gpu_check):
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "--plan", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    plan = json.loads(out)
    assert set(plan["command_s"]) == {"check", "bench"}
    assert all(s <= 570 for s in plan["command_s"].values()), plan["command_s"]
    assert plan["total_s"] == sum(plan["command_s"].values()) <= 720
    assert len(plan["files"]) <= 8 and len(set(plan["files"])) == len(plan["files"])
    assert [s["name"] for s in plan["stages"]] == ["setup", "tests", "ready", "ops", "attention", "sample"]
    text = subprocess.run([sys.executable, "scripts/gpu_check.py", "--plan"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60).stdout
    assert f"total {plan['total_s']} s" in text and "gpu_check.py check" in text and "gpu_check.py bench" in text


@pytest.mark.parametrize("stage", ["ops", "attention", "sample", "train", "quality"])
def test_benchmark_stages_are_accepted_by_their_benchmarks(gpu_check, stage):
    s = next(s for s in gpu_check.STAGES if s.name == stage)
    argv = s.args("/tmp/out")
    bench = load(argv[0], f"gpu_check_{stage}")
    args = bench.build_parser().parse_args(argv[1:])
    assert args.out_dir == "/tmp/out"
    name = getattr(args, "name", None) or f"attention_{args.dtype}"
    if stage in ("train", "quality"):
        assert args.quality == (stage == "quality")
    assert set(s.files) == {f"{name}.json", f"{name}.md"}
    if stage == "sample":
        assert set(args.rows.split(",")) <= set(bench.ROWS) and args.preset == "ddpm_cifar10"
        assert [int(n) for n in args.sizes.split(",")] == [1, 256]


def test_tests_stage_selects_every_op_test(gpu_check):
    """Every test module of an op or backend carries the "ops" marker the GPU check selects."""
    s = next(s for s in gpu_check.STAGES if s.name == "tests")
    assert "ops" in gpu_check.TEST_SELECTION and "gpu" in gpu_check.TEST_SELECTION
    assert "{OUT}/gpu_tests.xml" in s.argv and s.files == ("gpu_tests.xml",)
    per_op = sorted((ROOT / "tests" / "ops").glob("test_*.py"))  # one conformance file per op, the backends' own
    assert {p.stem for p in per_op} >= {"test_q_sample", "test_diffusion_loss", "test_ddpm_step", "test_multistep_step",
                                         "test_attention", "test_noise_backends", "test_cpp_backend",
                                         "test_triton_backend"}
    others = [ROOT / "tests" / f"{name}.py" for name in ("test_op_schemas", "test_backends", "test_engine",
                                                          "test_noise", "test_patching")]
    for path in per_op + others:
        assert "pytestmark = pytest.mark.ops" in path.read_text(), path.name


def test_unknown_stage_is_refused(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["check", "--only", "ops"])


def test_a_stage_past_its_limit_is_stopped_and_its_output_kept(gpu_check, tmp_path):
    log = gpu_check.Log(tmp_path)
    code = gpu_check.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                         {"PATH": "/usr/bin:/bin"}, log, limit_s=2)
    text = (tmp_path / "gpu_check.log").read_text()
    assert code != 0 and "started" in text and "TIME LIMIT: 2 s" in text
