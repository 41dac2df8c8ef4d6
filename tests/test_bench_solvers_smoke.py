"""The quality-per-model-call benchmark, small: it runs on a CPU and writes what it promises.

``benchmarks/bench_solvers.py --smoke`` in-process (DDPM-20, DPM-Solver++ 2M at 5 calls from
fastddpm and from diffusers, UniPC at 5) on 80 samples of the shipped digits model into
``tmp_path``; then the verdict and the row parser on made-up numbers.
"""
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_solvers  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("solvers")
    assert bench_solvers.main(["--smoke", "--n", "80", "--out-dir", str(out), "--name", "smoke"]) == 0
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text(), out / "smoke.png"


def test_every_smoke_row_is_measured(smoke):
    data, md, _ = smoke
    rows = {(r["impl"], r["sampler"], r["steps"]): r for r in data["rows"]}
    assert set(rows) == set(bench_solvers.SMOKE_ROWS)
    for r in rows.values():
        assert "note" not in r, r
        assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["seconds"] > 0
    assert data["meta"]["samples per row"] == 80 and data["meta"]["commit"]
    assert all(r["seeds"] == "0" and r["fd_range"] for r in rows.values())
    assert "| fastddpm | unipc | 5 |" in md


def test_fastddpm_and_diffusers_make_the_same_images(smoke):
    """Same x_T, same solver: the same images, so the same scores (the step-for-step
    agreement itself is tests/test_multistep.py)."""
    rows = {(r["impl"], r["sampler"], r["steps"]): r for r in smoke[0]["rows"]}
    ours, theirs = rows[("fastddpm", "dpm++2m", 5)], rows[("diffusers", "dpm++2m", 5)]
    assert ours["fd"] == pytest.approx(theirs["fd"], rel=1e-3)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1 / 80 + 1e-9)


def test_the_goal_line_is_written_against_the_longest_ddpm_run(smoke):
    data, md, _ = smoke
    (key,) = [k for k in data["meta"] if k.startswith("goal:")]
    assert data["meta"][key].startswith(("met", "not met")) and "DDPM-20" in data["meta"][key]
    assert key in md


def test_the_plot_is_a_png_with_lines(smoke):
    img = Image.open(smoke[2])
    assert img.format == "PNG" and img.size == (760, 480)
    colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 20  # more than a blank frame


def _row(impl, sampler, steps, fd, seconds):
    return dict(impl=impl, sampler=sampler, steps=steps, model_calls=steps, fd=fd, seconds=seconds)


def test_verdict_on_made_up_numbers():
    base = _row("fastddpm", "ddpm", 1000, 10.0, 3000.0)
    fast = _row("fastddpm", "dpm++2m", 10, 10.5, 20.0)
    assert bench_solvers.verdict([base, fast]).startswith("met: fastddpm dpm++2m 10")
    # too far from DDPM-1000's FD, too many calls, or too slow: not met
    assert bench_solvers.verdict([base, _row("fastddpm", "dpm++2m", 10, 11.5, 20.0)]).startswith("not met")
    assert bench_solvers.verdict([base, _row("fastddpm", "ddim", 50, 9.0, 50.0)]).startswith("not met")
    assert bench_solvers.verdict([base, _row("fastddpm", "dpm++2m", 10, 10.5, 200.0)]).startswith("not met")
    # diffusers faster at the goal: not met
    assert bench_solvers.verdict([base, fast, _row("diffusers", "unipc", 10, 10.0, 15.0)]).startswith("not met")
    assert bench_solvers.verdict([fast]).startswith("not evaluated")


def test_rows_are_parsed_and_checked():
    assert bench_solvers.parse_rows("fastddpm:ddpm:100, diffusers:dpm++2m-sde:20") == [
        ("fastddpm", "ddpm", 100), ("diffusers", "dpm++2m-sde", 20)]
    for bad in ("fastddpm:ddpm", "fastddpm:ddpm:x", "fastddpm:ddpm:7", ""):
        with pytest.raises(ValueError, match="--rows"):
            bench_solvers.parse_rows(bad)


def test_a_row_over_seeds_reports_mean_range_and_median(monkeypatch):
    fds = {0: 10.0, 1: 14.0, 2: 30.0}
    monkeypatch.setattr(bench_solvers, "run_row", lambda *a: (a[-1], {0: 3.0, 1: 1.0, 2: 2.0}[a[-1]]))
    row = bench_solvers.measure_row(None, None, "fastddpm", "unipc", 10, 8, [0, 1, 2],
                                    lambda seed: {"fd": fds[seed], "precision": 0.5, "recall": seed / 2})
    assert row == {"seeds": "0,1,2", "fd": 18.0, "fd_range": "10-30", "precision": 0.5, "recall": 0.5,
                   "seconds": 2.0}


@pytest.mark.parametrize("argv", [["--seeds", "0,0"], ["--seeds", "-1"], ["--seeds", "a"], ["--rows", "fastddpm:ddpm:7"]])
def test_bad_arguments_stop_before_any_row(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_solvers.main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
