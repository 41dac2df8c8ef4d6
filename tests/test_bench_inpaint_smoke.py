"""The inpainting benchmark, small: it runs on a CPU and writes what it promises.

``benchmarks/bench_inpaint.py --smoke`` in-process on the shipped digits model (12 held-out digits,
8 steps, masks bottom and random, one seed) into ``tmp_path``.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_inpaint  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("inpaint")
    assert bench_inpaint.main(["--smoke", "--out-dir", str(out), "--name", "smoke"]) == 0
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text(), out / "smoke.png"


def test_every_row_is_measured_and_known_pixels_are_exact(smoke):
    data, md, png = smoke
    rows = data["rows"]
    assert {(r["mask"], r["method"]) for r in rows} == {(m, k) for m in ("bottom", "random") for k in bench_inpaint.METHODS}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["fd"] > 0 and r["known_max_change"] == 0.0
        assert r["model_calls"] == {"zero": 0, "mean": 0, "replace": 8, "repaint": 14}[r["method"]]
    assert png.is_file() and "| bottom | repaint |" in md
    assert data["meta"]["verdicts"][0].startswith("goal repaint >= replace >= baselines") and data["meta"]["commit"]


def test_masks_keep_what_they_say():
    for kind in bench_inpaint.MASKS:
        m = bench_inpaint.make_mask(kind, 3)
        assert m.shape == (3, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert bench_inpaint.make_mask("bottom", 1)[0, 0, 8:].sum() == 0 and bench_inpaint.make_mask("left", 1)[0, 0, :, :8].sum() == 0
    assert bench_inpaint.make_mask("centre", 1).sum() == 256 - 64
    with pytest.raises(ValueError, match="mask kind"):
        bench_inpaint.make_mask("top", 1)
