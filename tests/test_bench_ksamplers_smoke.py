"""The k-sampler benchmark, small: it runs on a CPU and writes what it promises.

``benchmarks/bench_ksamplers.py --smoke`` in-process (Euler and Euler ancestral at 5 calls from
fastddpm, diffusers and k-diffusion, Heun at 5 from fastddpm) on 80 samples of the shipped digits
model into ``tmp_path``; then the verdict, the budgets and the row parser on made-up numbers.
"""
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ksamplers  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("ksamplers")
    assert bench_ksamplers.main(["--smoke", "--n", "80", "--out-dir", str(out), "--name", "smoke"]) == 0
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text(), out / "smoke.png"


def _rows(data):
    return {(r["impl"], r["sampler"], r["budget"]): r for r in data["rows"]}


def test_every_smoke_row_is_measured(smoke):
    data, md, _ = smoke
    rows = _rows(data)
    assert set(rows) == set(bench_ksamplers.SMOKE_ROWS)
    for r in rows.values():
        assert "note" not in r, r
        assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["seconds"] > 0 and r["bare_call_seconds"] > 0 and r["overhead"] > -1
        assert r["seconds_per_call"] == pytest.approx(r["seconds"] / r["model_calls"])
        assert r["model_calls"] == 5 and r["seeds"] == "0" and r["fd_range"]
    assert rows[("fastddpm", "heun", 5)]["steps"] == 3  # two-stage: 2 * 3 - 1 calls
    assert data["meta"]["samples per row"] == 80 and data["meta"]["commit"]
    assert "| fastddpm | heun | 5 | 3 | 5 |" in md


@pytest.mark.parametrize("sampler", ["euler", "euler-a"])
def test_fastddpm_and_its_peers_make_the_same_images(smoke, sampler):
    """Same x_T (and for Euler ancestral the same noise), same math: the same images, so the same
    scores (the step-for-step agreement itself is tests/test_ksamplers.py)."""
    rows = _rows(smoke[0])
    ours = rows[("fastddpm", sampler, 5)]
    for peer in ("diffusers", "k-diffusion"):
        theirs = rows[(peer, sampler, 5)]
        assert ours["fd"] == pytest.approx(theirs["fd"], rel=1e-3), peer
        assert ours["precision"] == pytest.approx(theirs["precision"], abs=1 / 80 + 1e-9), peer


def test_the_verdict_and_the_plot_are_written(smoke):
    data, md, png = smoke
    (key,) = [k for k in data["meta"] if k.startswith("verdict")]
    assert data["meta"][key].startswith("best fastddpm sampler per budget: 5: ") and key in md
    img = Image.open(png)
    assert img.format == "PNG" and img.size == (900, 640)
    colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 20  # more than a blank frame


def _row(impl, sampler, budget, fd, overhead):
    return dict(impl=impl, sampler=sampler, budget=budget, model_calls=budget, fd=fd, overhead=overhead)


def test_verdict_on_made_up_numbers():
    ours = [_row("fastddpm", "euler", 10, 12.0, 0.01), _row("fastddpm", "heun", 10, 9.0, 0.02),
            _row("fastddpm", "euler", 5, 30.0, 0.0)]
    peers = [_row("diffusers", "euler", 10, 12.0, 0.05), _row("k-diffusion", "heun", 10, 9.0, 0.04)]
    text = bench_ksamplers.verdict(ours + peers)
    assert text.startswith("best fastddpm sampler per budget: 5: euler FD 30.00 (5 calls), 10: heun FD 9.00")
    assert "met: 3/3 fastddpm rows within 3%" in text and "ahead of every one of the 2 peer rows" in text
    assert "not met" not in text
    # over 3%, or a peer with less overhead: not met, and which
    text = bench_ksamplers.verdict(ours + peers + [_row("fastddpm", "dpm2", 10, 20.0, 0.06)])
    assert "not met: 3/4 fastddpm rows within 3% of a bare model call (worst fastddpm dpm2 10: +6.0%)" in text
    text = bench_ksamplers.verdict(ours + [_row("k-diffusion", "euler", 10, 12.0, 0.005)])
    assert "not met" in text and "behind k-diffusion euler 10 (+0.5% vs +1.0%)" in text
    assert bench_ksamplers.verdict(peers).startswith("not evaluated")


def test_budgets_are_sigma_steps():
    assert [bench_ksamplers.sigma_steps("euler", b) for b in (5, 10, 35)] == [5, 10, 35]
    assert [bench_ksamplers.sigma_steps("heun", b) for b in (5, 8, 10, 15, 20, 35)] == [3, 5, 6, 8, 11, 18]


def test_rows_are_parsed_and_checked():
    assert bench_ksamplers.parse_rows("k-diffusion:dpm++sde:20, fastddpm:euler:10") == [
        ("fastddpm", "euler", 10), ("k-diffusion", "dpm++sde", 20)]  # in the table's order
    assert bench_ksamplers.parse_rows("diffusers:*:5") == [
        ("diffusers", s, 5) for s in bench_ksamplers.DIFFUSERS_SCHEDULERS]
    assert len(bench_ksamplers.parse_rows("*:*:10")) == 9 + 9 + 6 + 9  # fastddpm(-clip), diffusers, k-diffusion
    for bad in ("fastddpm:euler", "fastddpm:euler:x", "fastddpm:euler:7", "diffusers:dpm++sde:10", ""):
        with pytest.raises(ValueError, match="--rows"):
            bench_ksamplers.parse_rows(bad)


@pytest.mark.parametrize("argv", [["--seeds", "0,0"], ["--peer-seeds", "-1"], ["--bare-calls", "0"],
                                  ["--rows", "fastddpm:euler:7"]])
def test_bad_arguments_stop_before_any_row(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_ksamplers.main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
