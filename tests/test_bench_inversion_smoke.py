"""The inversion benchmark, small: it runs on a CPU and writes what it promises.

``benchmarks/bench_inversion.py --smoke`` in-process on the shipped digits model (4 held-out digits,
5 and 10 steps, the clip on and off) into ``tmp_path``.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_inversion  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("inversion")
    assert bench_inversion.main(["--smoke", "--out-dir", str(out), "--name", "smoke"]) == 0
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text()


def test_every_row_is_measured(smoke):
    data, md = smoke
    rows = data["rows"]
    assert {(r["images"], r["steps"], r["clip"]) for r in rows} == {
        ("heldout", s, c) for s in (5, 10) for c in (True, False)}
    for r in rows:
        assert r["n"] == 4 and 0 <= r["mse_median"] <= r["mse_max"] and r["mse_mean"] > 0 and r["mse_std"] >= 0
        assert r["invert_s_per_image"] > 0 and r["sample_s_per_image"] > 0
    # the shipped model gives its digits back from their inversion (clipped, 10 steps: MSE ~0.005)
    assert next(r for r in rows if r["steps"] == 10 and r["clip"])["mse_mean"] < 0.03
    assert "| heldout | 10 | True |" in md


def test_the_run_is_recorded(smoke):
    data, _ = smoke
    meta = data["meta"]
    assert meta["commit"] and meta["model"] == "digits_small.safetensors" and meta["threads"] == 1
    assert len(meta["verdicts"]) == 2 and "held-out split" in meta["images"]
