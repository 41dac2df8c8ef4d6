"""The training benchmark runs on a CPU and writes what it promises.

``benchmarks/bench_train.py`` in-process at its smallest (the ``tiny`` preset,
batch 4, two fastddpm rows, 2 timed steps) into ``tmp_path``; then the
pure-Python parts (comparisons, shares, goals) on made-up numbers and the
peers' architectures from the presets.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_train  # noqa: E402
import train_rows  # noqa: E402

from fastddpm import ops  # noqa: E402
from fastddpm.models.presets import create_model  # noqa: E402

ROWS = ("reference", "fused_ops")
HAS_CPP = "cpp" in ops.available_backends("q_sample", "cpu")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench")
    bench_train.main(["--device", "cpu", "--preset", "tiny", "--batch", "4", "--rows", ",".join(ROWS),
                      "--steps", "2", "--warmup", "0", "--out-dir", str(out), "--name", "smoke"])
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text()


def test_json_has_the_metadata(smoke_results):
    meta = smoke_results[0]["meta"]
    for key in ("device", "torch", "commit", "time_utc", "fastddpm", "diffusers", "denoising-diffusion-pytorch",
                "preset", "batch", "fused backend", "bf16 peak TFLOP/s", "FLOPs", "seed"):
        assert key in meta, key
    assert meta["preset"] == "tiny" and meta["batch"] == 4 and meta["fused backend"] == "cpp"
    assert meta["bf16 peak TFLOP/s"] is None  # no peak known for a CPU
    goal_keys = [k for k in meta if k.startswith("goal")]
    assert len(goal_keys) == 2
    # no diffusers row here: the speedup goal cannot be judged; no CPU peak: neither can the other
    assert all(meta[k].startswith("not evaluated") for k in goal_keys), meta


def test_json_rows_are_measured(smoke_results):
    rows = {r["row"]: r for r in smoke_results[0]["rows"]}
    assert list(rows) == list(ROWS)
    measured = [rows["reference"]] + ([rows["fused_ops"]] if HAS_CPP else [])
    for r in measured:
        assert r["batch"] == 4 and r["reps"] >= 2 and r["family"] == "fastddpm"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["images/s"] == pytest.approx(4 / (r["median_ms"] * 1e-3))
        assert r["GFLOP/step"] > 0 and r["TFLOP/s"] > 0
        assert r["params (M)"] == pytest.approx(sum(p.numel() for p in create_model("tiny").parameters()) / 1e6)
        assert "% bf16 peak" not in r and "x diffusers" not in r
        assert "peak_mem_MB" in r and r["precision"] == "fp32"
    if HAS_CPP:
        fused = rows["fused_ops"]
        assert fused["GFLOP/step"] == rows["reference"]["GFLOP/step"]  # one count for the family
        assert fused["x prev"] == pytest.approx(rows["reference"]["median_ms"] / fused["median_ms"])
        assert "cpp" in fused["path"]
    else:
        assert rows["fused_ops"]["note"].startswith("skipped")


def test_markdown_has_the_table(smoke_results):
    md = smoke_results[1]
    header = "| " + " | ".join(bench_train.COLUMNS) + " |"
    assert header in md
    lines = md.splitlines()
    table = lines[lines.index(header) + 2:]
    assert [line.split(" | ")[0] for line in table] == [f"| {r}" for r in ROWS]
    assert "- preset: tiny" in md and "- goal >= 2x diffusers-style fp32: not evaluated" in md


def _row(name, ms, tflops=None, family=None):
    family = family or ("fastddpm" if name in bench_train.STAGE_BY_NAME else name)
    return {"row": name, "family": family, "median_ms": ms, "images/s": 128 / (ms * 1e-3), "TFLOP/s": tflops}


def test_comparisons_and_goals_on_made_up_numbers():
    rows = [_row("diffusers", 400.0, 100.0), _row("ddp", 500.0, 80.0), _row("reference", 320.0, 125.0),
            _row("fused_ops", 300.0, 130.0), {"row": "bf16_cl", "note": "failed: x"},
            _row("compile", 100.0, 400.0), _row("fused_attn", 80.0, 500.0)]
    bench_train.add_comparisons(rows, peak_tflops=1000.0)
    by = {r["row"]: r for r in rows}
    assert "x diffusers" not in by["diffusers"]  # not over itself
    assert by["fused_attn"]["x diffusers"] == pytest.approx(5.0)
    assert by["fused_attn"]["% bf16 peak"] == pytest.approx(50.0)
    assert by["compile"]["x prev"] == pytest.approx(3.0)  # over fused_ops: bf16_cl did not run
    assert "x prev" not in by["reference"] and "x prev" not in by["ddp"]
    shares = [by[n]["share %"] for n in ("fused_ops", "compile", "fused_attn")]
    assert sum(shares) == pytest.approx(100.0) and all(s > 0 for s in shares)

    goals = bench_train.goals(rows, "NVIDIA H100 80GB HBM3", 1000.0)
    speed, peak = goals.values()
    assert speed.startswith("met: 5.00x (fused_attn)") and peak.startswith("met: 50.0% (fused_attn)")
    by["fused_attn"]["x diffusers"], by["fused_attn"]["% bf16 peak"] = 1.9, 34.0
    speed, peak = bench_train.goals(rows, "NVIDIA H200", 989.0).values()
    assert speed.startswith("not met") and peak.startswith("not met") and "goals are for an H100" in speed


def test_no_share_when_the_stages_barely_differ():
    rows = [_row("reference", 100.0), _row("fused_ops", 99.0)]
    bench_train.add_comparisons(rows, peak_tflops=None)
    assert rows[1]["x prev"] == pytest.approx(100 / 99) and "share %" not in rows[1]
    assert "% bf16 peak" not in rows[1]


def test_a_missing_backend_is_a_skipped_row():
    cfg = train_rows.BenchConfig(device=torch.device("cpu"), preset="tiny", batch=2, fused_backend="reference",
                                 attention_backend="no-such-backend")
    with pytest.raises(train_rows.Skipped, match="no-such-backend"):
        train_rows.stage_backends(train_rows.STAGE_BY_NAME["fused_attn"], cfg)


@pytest.mark.heavy
def test_every_fastddpm_stage_runs(tmp_path, one_thread):
    """bf16 + channels_last and torch.compile (Inductor on the CPU, about a minute) through the
    Trainer's options; on a GPU also the fused attention."""
    stages = ["reference", "fused_ops", "bf16_cl", "compile"] + (["fused_attn"] if torch.cuda.is_available() else [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_train.main(["--device", device, "--preset", "tiny", "--batch", "4", "--rows", ",".join(stages),
                      "--steps", "2", "--warmup", "1", "--out-dir", str(tmp_path), "--name", "stages"])
    rows = {r["row"]: r for r in json.loads((tmp_path / "stages.json").read_text())["rows"]}
    assert list(rows) == stages
    for name, row in rows.items():
        assert "note" not in row or not row["note"], (name, row.get("note"))
        assert row["median_ms"] > 0, name
