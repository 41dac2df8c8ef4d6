"""The GPU check: correctness first, then the headline numbers, in two
commands that fit the lent GPU machine (each at most 9.5 minutes, 12 in all;
see the device tool's README).  Run from the repository root there:

    python scripts/gpu_check.py check    # command 1: set-up, every GPU and op test
    python scripts/gpu_check.py bench    # command 2, straight after: ops, attention, W1 sampling
    python scripts/gpu_check.py --plan   # the stages, their time budgets and the files (no GPU needed)
    python scripts/gpu_check.py train    # a later window: training speed and quality

Each stage runs under its own time limit, and its results are in the output
folder (``$OUT``, default ``/tmp/gpu_check_out``) as soon as it ends, so a
stage stopped at its limit costs only its own numbers.  What comes back, at
most 8 files: ``gpu_check.log`` (everything printed, the versions first),
``gpu_tests.xml`` (the tests' junit report) and a JSON + markdown pair per
benchmark (device, driver, torch/triton/CUDA versions and the commit in each).

Set-up builds nothing when it can help it: a ``fastddpm/_C*.so`` built on a
CPU machine against the device's torch (``make device-stack``: torch 2.11.0,
Python 3.12, sm_90) travels in the call's ``carry`` and is used if it loads
with its CUDA kernels and was compiled from these sources (its ``source_hash``);
otherwise the extension is built here.  The peers'
wheels (``scripts/fetch_device_wheels.sh`` into ``.whl/``, carried too) are
installed to ``/tmp/site``.  The Triton and C++ backends are required
(``FASTDDPM_REQUIRE_BACKENDS=cpp,triton``): a missing one fails the tests.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = "/tmp/site"
COMMAND_LIMIT_S = 570  # 9.5 minutes: one call of the device tool, with a margin under its 10
TOTAL_LIMIT_S = 720  # 12 minutes of the session's 15, machine start-up aside
LOG = "gpu_check.log"
JUNIT = "gpu_tests.xml"


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # which of the two commands runs it
    budget_s: int  # its time limit
    what: str
    argv: tuple[str, ...] = ()  # run with the Python that runs this script; () for set-up
    files: tuple[str, ...] = field(default=())  # what it leaves in $OUT

    def args(self, out: str) -> list[str]:
        return [a.replace("{OUT}", out) for a in self.argv]


# The tests: every GPU-marked test, every op and backend test (marker "ops"), every heavy case.
TEST_SELECTION = "gpu or heavy or ops"

STAGES = (
    Stage("setup", "check", 60, "versions; carried wheels to /tmp/site; load the carried _C or build it (sm_90)"),
    Stage("tests", "check", 290, f"pytest -m '{TEST_SELECTION}', 6 processes, 120 s per test",
          ("-m", "pytest", "tests", "-q", "-m", TEST_SELECTION, "--heavy", "-p", "no:cacheprovider", "-rfEs",
           "-n", "6", "--dist", "load", "--timeout", "120", "--junitxml", "{OUT}/" + JUNIT),
          (JUNIT,)),
    Stage("ready", "bench", 15, "set-up again where the machine is fresh (seconds on the warm one)"),
    Stage("ops", "bench", 50, "fused q_sample/loss/step at 16M and 64M elements against copy bandwidth",
          ("benchmarks/bench_ops.py", "--device", "cuda", "--sizes", "16M,64M", "--reps", "10",
           "--name", "ops_cuda", "--out-dir", "{OUT}"),
          ("ops_cuda.json", "ops_cuda.md")),
    Stage("attention", "bench", 60, "Triton flash attention against SDPA at the U-Nets' shapes (bf16)",
          ("benchmarks/bench_attention.py", "--dtype", "bf16", "--reps", "10", "--out-dir", "{OUT}"),
          ("attention_bf16.json", "attention_bf16.md")),
    Stage("sample", "bench", 245, "W1: the 35.7M Ho U-Net, 20 steps timed and scaled to 1000, n=1 and 256, "
          "against the diffusers loop eager and compiled",
          ("benchmarks/bench_sample.py", "--device", "cuda", "--preset", "ddpm_cifar10", "--sizes", "1,256",
           "--steps", "20", "--rows", "diffusers,diffusers_compile,engine_fast", "--reps", "3",
           "--max-row-seconds", "20", "--first-call-timeout", "150", "--name", "sample_cuda", "--out-dir", "{OUT}"),
          ("sample_cuda.json", "sample_cuda.md")),
    # a later window (not in the 12-minute plan): training speed and the training quality check
    Stage("ready", "train", 60, "set-up (seconds on a warm machine)"),
    Stage("train", "train", 360, "bench_train: the fast training step against the diffusers-style loop",
          ("benchmarks/bench_train.py", "--device", "cuda", "--first-call-timeout", "240", "--name", "train_cuda",
           "--out-dir", "{OUT}"),
          ("train_cuda.json", "train_cuda.md")),
    Stage("quality", "train", 150, "bench_train --quality: fused training against the reference, same FD",
          ("benchmarks/bench_train.py", "--device", "cuda", "--quality", "--name", "train_quality_cuda",
           "--out-dir", "{OUT}"),
          ("train_quality_cuda.json", "train_quality_cuda.md")),
)
WINDOW = ("check", "bench")  # the two commands of one 12-minute window
COMMANDS = WINDOW + ("train",)


def plan() -> dict:
    """The window's stages, their budgets per command and in all, and the files that come back."""
    window = [s for s in STAGES if s.command in WINDOW]
    files = [LOG] + [f for s in window for f in s.files]
    per_command = {c: sum(s.budget_s for s in window if s.command == c) for c in WINDOW}
    return dict(stages=[dict(name=s.name, command=s.command, budget_s=s.budget_s, what=s.what, files=list(s.files))
                        for s in window],
                command_s=per_command, total_s=sum(per_command.values()), files=files,
                command_limit_s=COMMAND_LIMIT_S, total_limit_s=TOTAL_LIMIT_S)


def print_plan(p: dict) -> None:
    for c in WINDOW:
        print(f"python scripts/gpu_check.py {c}   ({p['command_s'][c]} s of at most {COMMAND_LIMIT_S})")
        for s in p["stages"]:
            if s["command"] == c:
                print(f"  {s['name']:10s} {s['budget_s']:4d} s  {s['what']}")
    print(f"total {p['total_s']} s of at most {TOTAL_LIMIT_S}; files in $OUT: {', '.join(p['files'])}")
    later = [s for s in STAGES if s.command not in WINDOW]
    print("a later window: python scripts/gpu_check.py train   (" +
          ", ".join(f"{s.name} {s.budget_s} s" for s in later) + ")")


# -- running ------------------------------------------------------------------------------
class Log:
    """Everything printed, to the terminal and to $OUT/gpu_check.log as it happens."""

    def __init__(self, out: Path):
        self.file = open(out / LOG, "a", buffering=1)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")


def run(argv: list[str], env: dict, log: Log, limit_s: float) -> int:
    """Run ``argv`` with its output logged; stopped (TERM, then KILL) at ``limit_s``."""
    log(f"+ {' '.join(argv)}   (limit {limit_s:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def stop():
        log(f"TIME LIMIT: {limit_s:.0f} s reached, stopping {argv[1] if len(argv) > 1 else argv[0]}")
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(limit_s, stop)
    timer.start()
    for line in proc.stdout:
        log(line.rstrip("\n"))
    code = proc.wait()
    timer.cancel()
    log(f"  exit {code} after {time.monotonic() - t0:.0f} s")
    return code


def environment_lines(env: dict) -> list[str]:
    code = ("import subprocess, torch, triton, numpy, sys\n"
            "print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__,"
            " '| cuda', torch.version.cuda, '| numpy', numpy.__version__)\n"
            "print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')\n"
            "try:\n"
            "    r = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],"
            " capture_output=True, text=True).stdout.strip()\n"
            "except OSError:\n"
            "    r = 'no nvidia-smi'\n"
            "print('driver', r or '?')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (out.stdout + out.stderr).strip().splitlines() + [f"commit {commit or '?'}"]


def setup(env: dict, log: Log, limit_s: float) -> int:
    t0 = time.monotonic()
    for line in environment_lines(env):
        log(line)
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if wheels and Path(SITE, "diffusers").is_dir():
        log(f"the carried wheels are installed in {SITE}")
    elif wheels:
        code = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], env, log, limit_s)
        if code != 0:
            log("installing the carried wheels failed: the peer tests will fail")
    else:
        log("no .whl/ carried: diffusers and denoising-diffusion-pytorch tests will be skipped")
    probe = [sys.executable, "-c", "import fastddpm._C, fastddpm.ops.cpp as c; assert c.has_cuda(), 'no CUDA kernels'; "
             "stale = c.stale_build(); assert stale is None, stale; "
             "print('fastddpm._C with CUDA kernels, of these sources:', fastddpm._C.__file__)"]
    if subprocess.run(probe, cwd=ROOT, env=env).returncode == 0:
        return 0
    log("the carried fastddpm._C does not load with CUDA kernels here, or was built from other sources: building it")
    build_env = env | {"FASTDDPM_REQUIRE_CUDA": "1", "FASTDDPM_CUDA_ARCHS": env.get("FASTDDPM_CUDA_ARCHS", "9.0"),
                       "MAX_JOBS": env.get("MAX_JOBS", "16")}
    code = run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], build_env, log,
               max(10.0, limit_s - (time.monotonic() - t0)))
    return code or subprocess.run(probe, cwd=ROOT, env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=COMMANDS)
    parser.add_argument("--plan", action="store_true", help="print the stages and budgets, run nothing")
    parser.add_argument("--json", action="store_true", help="with --plan: as JSON")
    parser.add_argument("--only", default=None, help="comma-separated stages of the command to run (a rerun)")
    a = parser.parse_args(argv)
    if a.plan:
        p = plan()
        print(json.dumps(p, indent=1)) if a.json else print_plan(p)
        return 0
    if a.command is None:
        parser.error("name a command (check, bench) or --plan")
    stages = [s for s in STAGES if s.command == a.command]
    if a.only:
        names = a.only.split(",")
        unknown = [n for n in names if n not in {s.name for s in stages}]
        if unknown:
            parser.error(f"--only: {unknown} are not stages of {a.command} ({', '.join(s.name for s in stages)})")
        stages = [s for s in stages if s.name in names]

    out = Path(os.environ.get("OUT") or "/tmp/gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", FASTDDPM_REQUIRE_BACKENDS="cpp,triton",
               PYTHONPATH=os.pathsep.join(p for p in (SITE, str(ROOT), env.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTDDPM_BACKEND", None)
    failed = []
    for s in stages:
        log(f"== {s.name}: {s.what} (budget {s.budget_s} s)")
        if s.name in ("setup", "ready"):
            code = setup(env, log, s.budget_s)
        else:
            code = run([sys.executable, *s.args(str(out))], env, log, s.budget_s)
        if code != 0:
            failed.append(f"{s.name} (exit {code})")
        missing = [f for f in s.files if not (out / f).exists()]
        if missing:
            log(f"  {s.name} left no {', '.join(missing)}")
    log(f"gpu_check {a.command}: {'FAILED ' + ', '.join(failed) if failed else 'all stages passed'}; "
        f"files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
