"""The measured CPU plan (``fastddpm.cpu_plan``): every automatic choice has a reason, compile
only when it pays, the layout timed, the compiled engine reused, threads, and bf16 sampling the
same distribution as fp32 on the shipped digits model.  No timed assertions: the decisions are
checked on made-up timings and costs."""
import pytest
import torch

import fastddpm
from fastddpm import cpu_plan
from fastddpm.engine import cached_engines, clear_engine_cache, engine_sample, last_plan
from toy_models import Pointwise
from tolerances import EXACT, FP32, assert_close

CHOICES = ("cuda_graph=", "backend=", "micro_batch=", "threads=", "dtype=", "channels_last=", "compile=")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    """No engines, layouts or compile records from other tests; records go to ``tmp_path``."""
    clear_engine_cache()
    monkeypatch.setattr(cpu_plan, "_record_path", lambda: tmp_path / cpu_plan.RECORD_NAME)
    with cpu_plan.isolated_memory():
        yield
    clear_engine_cache()


def _tiny3():
    torch.manual_seed(0)
    return fastddpm.create_model("tiny", in_channels=3, out_channels=3).eval()


def _fake_forward(monkeypatch, nchw_s, nhwc_s):
    """Timings made up: a forward "takes" ``nhwc_s`` on a channels_last input, ``nchw_s`` otherwise."""
    def timed(forward, x, t, dtype, weights_dtype):
        return nhwc_s if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else nchw_s

    monkeypatch.setattr(cpu_plan, "_forward", timed)


# -- reasons ---------------------------------------------------------------------------------
def test_every_choice_has_a_reason_and_sample_uses_the_plan_on_cpu(one_thread):
    model = _tiny3()
    x = fastddpm.sample(model, 2, steps=3, seed=1, progress=False)  # engine=None: the plan on a CPU
    plan = last_plan()
    assert plan is not None and plan.device.type == "cpu" and not plan.cuda_graph
    lines = plan.explain().splitlines()
    for choice in CHOICES:
        assert sum(line.startswith(choice) for line in lines) == 1, (choice, lines)
    assert all(len(line.split(": ", 1)) == 2 and line.split(": ", 1)[1] for line in lines), lines
    assert plan.threads == 1 and plan.dtype == torch.float32
    expected = fastddpm.sample(model, 2, steps=3, seed=1, progress=False, engine=False)
    assert_close(x, expected, **(EXACT if not plan.channels_last else FP32))


def test_the_plan_leaves_the_global_rng_alone(one_thread):
    model = _tiny3()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    fastddpm.sample(model, 2, steps=3, progress=False)
    assert "compile=None: the eager run" in last_plan().explain()  # the model was timed
    assert torch.equal(torch.rand(3), expected)


def test_multistep_samplers_stay_on_the_eager_loop():
    clear_engine_cache()
    fastddpm.sample(Pointwise(), 2, sampler="dpm++2m", steps=3, progress=False)  # no NotImplementedError
    assert cached_engines() == []


# -- compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cost, compiled", [(1e9, None), (1e-9, "default")])
def test_compile_only_when_the_saving_beats_the_cost(monkeypatch, cost, compiled):
    monkeypatch.setattr(cpu_plan, "_compile_cost", lambda model, key: (cost, "made up"))
    _fake_forward(monkeypatch, 0.01, 0.02)
    choice = cpu_plan.choose(_tiny3(), torch.float32, (2, 3, 8, 8), 10_000, 1)
    assert choice.compile == compiled
    line = next(r for r in choice.reasons if r.startswith("compile="))
    assert "saves ~13.0 s" in line and "made up" in line, line  # 0.01 s x 10000 steps x (1 - 1/1.15)


def test_repeated_calls_compile_once_the_eager_time_lost_reaches_the_cost(monkeypatch):
    """The ski-rental rule: each call saves ~1.3 s (0.01 s x 1000 steps x (1 - 1/1.15)) against a 5 s
    compile, so the first three calls stay eager and the fourth (~5.2 s lost in all) compiles; another
    input, model or thread count starts its own count, and a short call's loss counts too."""
    monkeypatch.setattr(cpu_plan, "_compile_cost", lambda model, key: (5.0, "made up"))
    _fake_forward(monkeypatch, 0.01, 0.02)
    model, other = _tiny3(), _tiny3()

    def compiles(m=model, shape=(2, 3, 8, 8), steps=1000, threads=1):
        return cpu_plan.choose(m, torch.float32, shape, steps, 1, channels_last=False, threads=threads).compile

    assert [compiles() for _ in range(3)] == [None] * 3
    assert compiles(other) is None and compiles(shape=(4, 3, 8, 8)) is None and compiles(threads=2) is None
    choice = cpu_plan.choose(model, torch.float32, (2, 3, 8, 8), 1000, 1, channels_last=False, threads=1)
    line = next(r for r in choice.reasons if r.startswith("compile="))
    assert choice.compile == "default" and "earlier eager calls in this process lost on this input" in line, line
    assert "~3.9 s that earlier" in line, line
    third = _tiny3()
    assert [compiles(third, steps=100) for _ in range(3)] == [None] * 3  # 0.13 s each, below any compile...
    assert "~0.4 s that earlier" in next(r for r in cpu_plan.choose(
        third, torch.float32, (2, 3, 8, 8), 100, 1, channels_last=False, threads=1).reasons if r.startswith("compile="))


def test_no_compile_when_the_saving_is_below_any_compile(monkeypatch):
    monkeypatch.setattr(cpu_plan, "_compile_cost", lambda model, key: pytest.fail("records read"))
    _fake_forward(monkeypatch, 0.01, 0.02)
    choice = cpu_plan.choose(_tiny3(), torch.float32, (2, 3, 8, 8), 100, 1)
    assert choice.compile is None
    assert "less than any compile takes" in next(r for r in choice.reasons if r.startswith("compile="))


def _count_forwards(monkeypatch) -> list:
    """Every timed forward of the plan takes 10 ms and appends to the returned list."""
    calls = []

    def timed(forward, x, t, dtype, weights_dtype):
        calls.append(1)
        return 0.01

    monkeypatch.setattr(cpu_plan, "_forward", timed)
    return calls


def test_the_forward_is_timed_once_per_process(monkeypatch):
    calls = _count_forwards(monkeypatch)
    model = _tiny3()
    for _ in range(3):  # a short run: one call, an upper bound, kept
        assert cpu_plan.choose(model, torch.float32, (2, 3, 8, 8), 5, 1, channels_last=False).compile is None
    assert len(calls) == 1
    cpu_plan.choose(model, torch.float32, (2, 3, 8, 8), 10_000, 1, channels_last=False)  # needs the exact time
    assert len(calls) == 3
    cpu_plan.choose(model, torch.float32, (2, 3, 8, 8), 10_000, 1, channels_last=False)
    assert len(calls) == 3


def test_compile_cost_from_records(tmp_path):
    model = _tiny3()
    key = cpu_plan.compile_key(model, (2, 3, 8, 8), torch.float32, False, "default", 1)
    assert cpu_plan._compile_cost(model, key)[0] == cpu_plan.COLD_COMPILE_S
    path = tmp_path / cpu_plan.RECORD_NAME
    path.write_text('{"%s": [40.0]}' % key)  # compiled cold once, by another process
    assert cpu_plan._compile_cost(model, key)[0] == pytest.approx(40.0 * cpu_plan.WARM_FRACTION)
    path.write_text('{"%s": [40.0, 3.5]}' % key)  # and once from the warm cache
    assert cpu_plan._compile_cost(model, key)[0] == 3.5
    cpu_plan.record_compile(model, key, 2.0)
    assert cpu_plan._compile_cost(model, key) == (0.0, "already compiled in this process")
    assert '"%s": [40.0, 3.5, 2.0]' % key in path.read_text()
    other = cpu_plan.compile_key(model, (2, 3, 8, 8), torch.float32, False, "default", 2)
    assert other != key  # Inductor's CPU code is compiled for a thread count


def test_a_compiled_engine_is_reused_across_calls(monkeypatch, one_thread):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(cpu_plan, "COLD_COMPILE_S", 0.0)  # compiling "pays" at once
    monkeypatch.setattr(cpu_plan, "MIN_COMPILE_S", 0.0)
    model = Pointwise().eval()
    expected = fastddpm.sample(model, 3, steps=5, seed=1, progress=False, engine=False)
    got = fastddpm.sample(model, 3, steps=5, seed=1, progress=False)
    assert last_plan().compile == "default", last_plan().explain()
    assert_close(got, expected, **FP32)
    frames = counters["frames"]["ok"]
    again = fastddpm.sample(model, 3, steps=5, seed=1, progress=False)
    assert "already compiled in this process" in last_plan().explain()
    assert counters["frames"]["ok"] == frames and len(cached_engines()) == 1
    assert torch.equal(again, got)
    assert cpu_plan._records()  # the compile's time was recorded for the next process


def test_isolated_memory_swaps_every_cache_and_a_given_memory_goes_on(monkeypatch):
    """``isolated_memory`` swaps in every process cache of the plan (each module-level private dict
    or set), new or the given ones, and puts the process's back after the block: a given memory
    keeps its ski-rental count across blocks (1.3 s lost a call against a 5 s compile: the fourth
    compiles), and neither the process's memory nor a new one sees it."""
    monkeypatch.setattr(cpu_plan, "_compile_cost", lambda model, key: (5.0, "made up"))
    _fake_forward(monkeypatch, 0.01, 0.02)
    model = _tiny3()
    caches = {k: v for k, v in vars(cpu_plan).items()
              if k.startswith("_") and not k.startswith("__") and isinstance(v, (dict, set))}

    def compiles():
        return cpu_plan.choose(model, torch.float32, (2, 3, 8, 8), 1000, 1, channels_last=False, threads=1).compile

    row = {}
    for _ in range(3):
        with cpu_plan.isolated_memory(row) as memory:
            assert memory is row and set(row) == set(caches), (set(row), set(caches))
            assert all(getattr(cpu_plan, k) is row[k] is not caches[k] for k in caches)
            assert compiles() is None
        assert all(getattr(cpu_plan, k) is v for k, v in caches.items())
    with cpu_plan.isolated_memory():
        assert compiles() is None  # a new memory: nothing lost yet
    assert not any(caches.values())  # the process's memory saw none of it
    with cpu_plan.isolated_memory(row):
        assert compiles() == "default"


# -- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("nchw_s, nhwc_s, picked", [(0.02, 0.01, True), (0.01, 0.02, False), (0.0100, 0.0099, False)])
def test_layout_is_the_faster_one_beyond_the_margin(monkeypatch, nchw_s, nhwc_s, picked):
    _fake_forward(monkeypatch, nchw_s, nhwc_s)
    choice = cpu_plan.choose(_tiny3(), torch.float32, (4, 3, 8, 8), 1000, 1, compile=False)
    assert choice.channels_last is picked
    assert any(r.startswith(f"channels_last={picked}: timed at batch 4") for r in choice.reasons), choice.reasons
    again = cpu_plan.choose(_tiny3(), torch.float32, (4, 3, 8, 8), 1000, 1, compile=False)  # another model
    assert not any("earlier call" in r for r in again.reasons)


def test_layout_is_measured_once_per_process_and_not_for_short_runs(monkeypatch):
    calls = _count_forwards(monkeypatch)
    model = _tiny3()
    short = cpu_plan.choose(model, torch.float32, (4, 3, 8, 8), 5, 1, compile=False)
    assert not short.channels_last and "not measured, the run is short" in " ".join(short.reasons)
    assert len(calls) == 1
    cpu_plan.choose(model, torch.float32, (4, 3, 8, 8), 1000, 1, compile=False)
    measured = len(calls)
    assert measured > 2
    again = cpu_plan.choose(model, torch.float32, (4, 3, 8, 8), 1000, 1, compile=False)
    assert len(calls) == measured and "measured by an earlier call" in " ".join(again.reasons)


def test_the_channels_last_plan_samples_what_the_eager_loop_does(monkeypatch, one_thread):
    _fake_forward(monkeypatch, 0.02, 0.01)  # channels_last "wins"
    model = _tiny3()
    got = fastddpm.sample(model, 2, steps=200, seed=4, progress=False, compile=False)
    assert last_plan().channels_last
    expected = fastddpm.sample(model, 2, steps=200, seed=4, progress=False, engine=False)
    assert_close(got, expected, atol=1e-4, rtol=1e-4)  # 200 steps of fp32 rounding in another layout


# -- models the plan must not call ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["callable", "training"])
def test_the_plan_never_calls_a_plain_callable_or_a_training_model(kind):
    calls = []

    class Counting(Pointwise):
        def forward(self, x, t):
            calls.append(1)
            return super().forward(x, t)

    module = Counting().train()
    model = module if kind == "training" else (lambda x, t: module(x, t))
    fastddpm.sample(model, 2, steps=4, image_size=6, channels=2, progress=False)
    assert len(calls) == 4
    explain = last_plan().explain()
    assert "compile=None: not timed" in explain and "channels_last=False: not timed" in explain


# -- threads, dtype, bad input --------------------------------------------------------------
def test_threads_are_set_for_the_call_and_restored():
    before = torch.get_num_threads()
    seen = []
    fastddpm.sample(Pointwise(), 2, steps=2, progress=False, threads=1,
                    callback=lambda i, t, x: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and last_plan().threads == 1 and "threads=1: requested" in last_plan().explain()
    fastddpm.sample(Pointwise(), 2, steps=2, progress=False, threads=1, engine=False,
                    callback=lambda i, t, x: seen.append(torch.get_num_threads()))
    assert seen == [1] * 4 and torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(threads=0), ValueError, "threads must be a positive int"),
    (dict(threads=1.5), ValueError, "threads must be a positive int"),
    (dict(threads=0, engine=False), ValueError, "threads must be a positive int"),
    (dict(engine="yes"), TypeError, "engine must be True, False or None"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastddpm.sample(Pointwise(), 2, steps=2, progress=False, **kwargs)


def test_bf16_is_an_option_with_its_reason(one_thread):
    model = _tiny3()
    x = engine_sample(model, 2, steps=3, seed=0, progress=False, dtype=torch.bfloat16)
    plan = last_plan()
    assert plan.dtype == torch.bfloat16 and x.dtype == torch.float32
    assert plan.channels_last and "low precision runs best in NHWC" in plan.explain()
    expected = fastddpm.sample(model, 2, steps=3, seed=0, progress=False, engine=False)
    assert (x - expected).abs().max() < 0.1  # 3 steps of bf16 model outputs: close, not equal
    fp32_line = next(r for r in engine_sample(model, 2, steps=3, progress=False, return_plan=True)[1].reasons
                     if r.startswith("dtype="))
    assert "unless low precision is asked for" in fp32_line


@pytest.mark.heavy
def test_bf16_samples_the_digits_distribution_of_fp32(one_thread):
    """The shipped digits model sampled in bf16 and fp32 on a CPU (same noise, 50 respaced steps,
    256 images): the two sets are close in the digits classifier's feature space, and as close
    to the data as each other (Fréchet distance)."""
    import warnings

    from fastddpm.cli import DEMO_MODEL
    from fastddpm.metrics import evaluate, fid

    model, process = fastddpm.load_model(DEMO_MODEL, device="cpu")
    kw = dict(steps=50, seed=3, progress=False, process=process, compile=False)
    fp32 = engine_sample(model, 256, dtype=torch.float32, **kw)
    bf16 = engine_sample(model, 256, dtype=torch.bfloat16, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        between = fid(fp32, bf16)
        fd32, fd16 = evaluate(fp32)["fd"], evaluate(bf16)["fd"]
    assert between < 15.0, between  # two random halves of the data: 13-33
    assert fd16 < 1.25 * fd32 + 5.0, (fd16, fd32)


def test_plan_overrides_ask_for_the_engine():
    clear_engine_cache()
    fastddpm.sample(Pointwise(), 2, steps=2, progress=False, compile=False, channels_last=False)
    assert len(cached_engines()) == 1 and last_plan().compile is None
    with pytest.raises(TypeError, match="need engine=True"):
        fastddpm.sample(Pointwise(), 2, steps=2, progress=False, engine=False, compile=False)
