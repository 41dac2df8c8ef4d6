"""The CPU sampling benchmark runs in seconds and writes what it promises.

``benchmarks/bench_sample_cpu.py --smoke`` in-process (n=1, 3 steps, 2 warm calls, no
compile rows) into ``tmp_path``; then the goals on made-up numbers.  No timed assertions.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_sample_cpu  # noqa: E402

ROWS = ("diffusers", "ddpm_pytorch", "fastddpm", "fastddpm_eager", "fastddpm_before", "fastddpm_bf16")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench_cpu")
    bench_sample_cpu.main(["--smoke", "--model", "fastddpm", "--out-dir", str(out), "--name", "smoke"])
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text()


def test_metadata(smoke):
    meta = smoke[0]["meta"]
    for key in ("device", "torch", "commit", "time_utc", "threads", "fastddpm", "diffusers",
                "denoising-diffusion-pytorch", "model", "inductor cache", "load average at start", "cpu bf16"):
        assert key in meta, key
    assert "the same object in every row" in meta["model"] and "extrapolated from 3 steps" in meta["s/1000"]
    assert len(meta["goals"]) == 5


def test_rows_are_measured_on_one_model(smoke):
    rows = {r["row"]: r for r in smoke[0]["rows"]}
    assert set(rows) == set(ROWS)
    base = rows["diffusers"]["rounds s/1000"]
    for name, r in rows.items():
        assert r["n"] == 1 and r["steps"] == 3 and r["reps"] == 2, r
        assert r["min"] <= r["median s/1000"] <= r["max"] and r["first call s/1000"] > 0
        rounds = r["rounds s/1000"]
        assert len(rounds) == 3 and rounds[0] == r["first call s/1000"] and sorted(rounds[1:]) == [r["min"], r["max"]]
        assert r["x diffusers (warm)"] == pytest.approx((base[1] / rounds[1] + base[2] / rounds[2]) / 2)
        assert r["x diffusers (first call)"] == pytest.approx(base[0] / rounds[0])
    assert rows["fastddpm"]["plan"].startswith("dtype=float32") and "bfloat16" in rows["fastddpm_bf16"]["plan"]


def test_markdown_table(smoke):
    md = smoke[1]
    header = "| " + " | ".join(bench_sample_cpu.COLUMNS) + " |"
    assert header in md and "- goals:" in md
    lines = md.splitlines()
    assert len(lines) - lines.index(header) - 2 == len(ROWS)


def _r(row, n, warm, first=None):
    first = first or warm
    return {"row": row, "n": n, "median s/1000": warm, "first call s/1000": first,
            "rounds s/1000": [first, warm, warm * 1.5, warm * 0.5]}  # a load change hits all rows alike


def test_goals_on_made_up_numbers():
    results = [_r("diffusers", 1, 10.0), _r("fastddpm", 1, 7.0, first=10.2), _r("diffusers_compile", 1, 8.0),
               _r("fastddpm_compile", 1, 7.0), _r("diffusers", 16, 100.0), _r("fastddpm", 16, 80.0, first=90.0),
               _r("fastddpm_bf16", 16, 45.0), _r("fastddpm_bf16_compile", 16, 60.0),
               _r("diffusers", 64, 400.0), _r("fastddpm", 64, 300.0, first=260.0), _r("fastddpm_before", 64, 420.0)]
    bench_sample_cpu.add_ratios(results)
    goals = bench_sample_cpu.goals(results)
    assert goals[0].split(": ", 1)[1].startswith("met (n=1: 0.98x")  # 10 / 10.2: within the 5% noise
    assert goals[1].split(": ", 1)[1].startswith("met (n=1: 1.43x, n=16: 1.25x, n=64: 1.33x")
    assert goals[2].split(": ", 1)[1].startswith("met (n=1: 1.14x")  # 8 / 7, both compiled
    assert goals[3].split(": ", 1)[1].startswith("met (n=16: 2.22x")  # the best bf16 row
    assert goals[4].split(": ", 1)[1].startswith("met (n=64: 1.62x")  # 420 / 260, both first calls
    results[1]["rounds s/1000"][0] = 11.0
    bench_sample_cpu.add_ratios(results)
    assert bench_sample_cpu.goals(results)[0].split(": ", 1)[1].startswith("not met")
