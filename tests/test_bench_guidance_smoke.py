"""The guidance benchmark, small: it runs on a CPU and writes what it promises.

``benchmarks/bench_guidance.py --smoke`` in-process on the shipped class-conditional digits model
(4 samples per class, DDPM-20 and dpm++2m-5, n = 1 and 4 for the speed rows) into ``tmp_path``.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_guidance  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("guidance")
    assert bench_guidance.main(["--smoke", "--out-dir", str(out), "--name", "smoke"]) == 0
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text(), out / "smoke.png"


def test_every_quality_row_is_measured(smoke):
    data, md, png = smoke
    rows = [r for r in data["rows"] if r["part"] == "quality"]
    assert {(r["sampler"], r["w"]) for r in rows} == {(s, w) for s in ("ddpm", "dpm++2m") for w in bench_guidance.SCALES}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    # the shipped model makes the requested digit when guided
    assert max(r["accuracy"] for r in rows if r["sampler"] == "dpm++2m") >= 0.9
    assert png.is_file() and "| quality | dpm++2m |" in md


def test_speed_rows_compare_guided_unguided_and_the_diffusers_loop(smoke):
    data, _, _ = smoke
    rows = [r for r in data["rows"] if r["part"] == "speed"]
    assert {(r["impl"], r["n"]) for r in rows} == {(impl, n) for n in (1, 4) for impl in (
        "fastddpm unguided", "fastddpm guided", "fastddpm guided (UNet2DModel)", "diffusers guided (UNet2DModel)")}
    for r in rows:
        assert r["s_per_sample"] > 0 and r["p20"] <= r["s_per_sample"] <= r["p80"]
    # the same x_T and scheduler: the same images as the diffusers-style guided loop
    assert all(r["max_abs_diff"] < 1e-3 for r in rows if "max_abs_diff" in r)
    assert len(data["meta"]["verdicts"]) == 3 and data["meta"]["commit"]
