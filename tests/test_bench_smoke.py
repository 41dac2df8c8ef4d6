"""The sampling benchmark runs on a CPU and writes what it promises.

``benchmarks/bench_sample.py`` in-process at its smallest (n=1, 3 steps, three
rows) into ``tmp_path``; then the pure-Python parts (speed-ups, goals, the
bf16 peak table) on made-up numbers.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_sample  # noqa: E402
import common  # noqa: E402

ROWS = ("diffusers", "fastddpm_reference", "engine_eager")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench")
    bench_sample.main(["--device", "cpu", "--smoke", "--sizes", "1", "--steps", "3", "--rows", ",".join(ROWS),
                       "--out-dir", str(out), "--name", "smoke"])
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text()


def test_json_has_the_metadata(smoke_results):
    meta = smoke_results[0]["meta"]
    for key in ("device", "torch", "commit", "time_utc", "fastddpm", "diffusers", "denoising-diffusion-pytorch",
                "preset", "bf16 peak TFLOP/s", "mem_MB"):
        assert key in meta, key
    assert meta["preset"] == "small"
    assert meta["params fastddpm"] == meta["params diffusers"] == 773_377  # the same architecture
    assert "extrapolated" in meta["s/1000 steps"] and "3 steps" in meta["s/1000 steps"]
    assert meta["GFLOP per image per forward"] > 0
    assert len(meta["goals"]) == 3 and all(("met" in g) or ("n/a" in g) for g in meta["goals"])


def test_json_rows_are_measured(smoke_results):
    rows = {r["row"]: r for r in smoke_results[0]["rows"]}
    assert set(rows) == set(ROWS)
    for name in ("diffusers", "fastddpm_reference"):
        r = rows[name]
        assert r["n"] == 1 and r["steps timed"] == 3
        assert r["s/1000 steps"] == pytest.approx(r["median_ms"] * 1e-3 * 1000 / 3)
        assert r["images/s"] == pytest.approx(1 / r["s/1000 steps"])
        assert r["TFLOP/s"] > 0 and r["% bf16 peak"] is None  # no peak known for a CPU
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert "mem_MB" in r and r["first call s"] > 0
    assert rows["fastddpm_reference"]["x diffusers"] == pytest.approx(
        rows["diffusers"]["s/1000 steps"] / rows["fastddpm_reference"]["s/1000 steps"])
    engine = rows["engine_eager"]  # fastddpm.engine is part of the package: its row is measured, never a note
    assert "note" not in engine, engine["note"]
    assert engine["n"] == 1 and engine["steps timed"] == 3 and engine["s/1000 steps"] > 0
    assert engine["plan"].startswith("dtype=float32")  # the engine said how it ran


def test_markdown_has_the_table(smoke_results):
    md = smoke_results[1]
    header = "| " + " | ".join(bench_sample.COLUMNS) + " |"
    assert header in md
    lines = md.splitlines()
    table = lines[lines.index(header) + 2:]
    assert len(table) == len(ROWS)
    assert any(line.startswith("| diffusers loop, eager fp32 | 1 | 3 |") for line in table)
    assert "- goals:" in md


def _row(name, n, seconds, pct=None):
    return {"row": name, "label": name, "n": n, "s/1000 steps": seconds, "TFLOP/s": 1.0, "% bf16 peak": pct}


def test_speedups_and_goals_on_made_up_numbers():
    results = [_row("diffusers", 1, 30.0), _row("diffusers_compile", 1, 2.0), _row("fastddpm_reference", 1, 20.0),
               _row("engine_graph", 1, 4.0), _row("engine_fast", 1, 1.0), _row("engine_fast", 256, 9.0, pct=41.0),
               {"row": "engine_bf16", "label": "x", "n": 1, "note": "failed"}]
    bench_sample.add_speedups(results)
    fast = results[4]
    assert fast["x diffusers"] == 30.0 and fast["x diffusers+compile"] == 2.0 and fast["x ddpm-pytorch"] is None
    assert results[3]["x prev stage"] == 5.0  # engine_graph over fastddpm_reference
    assert fast["x prev stage"] is None  # engine_bf16 did not run
    assert results[0]["x diffusers"] is None  # not over itself
    goals = bench_sample.goals(results)
    assert goals[0].split(": ")[-1].startswith("met (30.00x")
    assert goals[1].split(": ")[-1].startswith("met (2.00x")
    assert goals[2].split(": ")[-1].startswith("met (41.0%")
    results[4]["s/1000 steps"] = 1.5
    assert "not met" in bench_sample.goals(results)[1]


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", None),
                                        ("x86_64 (2 threads)", None)])
def test_bf16_peak_table(monkeypatch, name, peak):
    monkeypatch.setattr(common, "device_name", lambda device: name)
    assert common.bf16_peak_tflops("cpu") == peak
