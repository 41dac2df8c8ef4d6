"""The command line, end to end on tiny runs."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm.cli import DEMO_MODEL, main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """A 4-step run that every test reads and none changes (test_resume_continues copies it)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--data", "digits", "--preset", "tiny", "--steps", "4", "--batch-size", "8",
                 "--out", str(out), "--checkpoint-every", "2", "--log-every", "2", "--timesteps", "50",
                 "--channels-last", "--nonfinite", "skip"])
    assert code == 0
    return out


def test_train_writes_a_run(run_dir):
    assert (run_dir / "checkpoints" / "step_0000004.safetensors").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["diffusion"]["config"]["num_timesteps"] == 50
    train = config["train_config"]
    assert (train["channels_last"], train["nonfinite"], train["compile"]) == (True, "skip", "no")
    assert (run_dir / "metrics.jsonl").read_text().strip()


def test_resume_continues(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # the shared run stays at step 4 for the other tests
    code = main(["train", "--data", "digits", "--preset", "tiny", "--steps", "6", "--batch-size", "8",
                 "--out", str(run), "--checkpoint-every", "2", "--log-every", "2", "--timesteps", "50",
                 "--resume"])
    assert code == 0
    assert (run / "checkpoints" / "step_0000006.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(4) <= 1  # continued, not restarted


def test_sample_png_npz_gif(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "step_0000004.safetensors")
    assert main(["sample", "--checkpoint", ckpt, "-n", "4", "--out", str(tmp_path / "s.png"), "--quiet",
                 "--gif", str(tmp_path / "r.gif"), "--scale", "2"]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 16
    assert Image.open(tmp_path / "r.gif").n_frames > 1
    assert main(["sample", "--checkpoint", ckpt, "-n", "3", "--steps", "10", "--out", str(tmp_path / "s.npz"),
                 "--quiet", "--sampler", "ddim"]) == 0
    arr = np.load(tmp_path / "s.npz")["images"]
    assert arr.shape == (3, 8, 8, 1) and arr.dtype == np.uint8


def test_export_and_demo(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoints" / "step_0000004.safetensors")
    release = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", ckpt, "--out", str(release)]) == 0
    assert main(["demo", "--checkpoint", str(release), "-n", "4", "--steps", "5", "--out",
                 str(tmp_path / "demo.png"), "--quiet"]) == 0
    assert "sampling time:" in capsys.readouterr().out
    assert (tmp_path / "demo.png").is_file()


def test_demo_plan_options_and_explain(tmp_path, capsys):
    out = str(tmp_path / "demo.png")
    assert main(["demo", "-n", "2", "--steps", "3", "--out", out, "--quiet", "--explain", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "sampling plan:" in text and "compile=None:" in text and "dtype=torch.float32: the model's" in text
    assert main(["demo", "-n", "2", "--steps", "3", "--out", out, "--quiet", "--explain", "--dtype", "bfloat16",
                 "--compile", "no"]) == 0
    text = capsys.readouterr().out
    assert "dtype=torch.bfloat16: requested" in text and "compile=None: requested" in text
    # a multistep sampler: --compile asks for the engine, which has the solvers too
    assert main(["demo", "-n", "2", "--steps", "3", "--out", out, "--quiet", "--explain", "--sampler", "dpm++2m",
                 "--compile", "no"]) == 0
    text = capsys.readouterr().out
    assert "sampling plan:" in text and "for multistep_step on cpu" in text and "compile=None: requested" in text


def test_the_shipped_demo_model_loads():
    from fastddpm.checkpoint import load_model

    model, process = load_model(DEMO_MODEL)
    assert model.config.image_size == 16 and model.config.in_channels == 1
    assert process.num_steps == 1000
    x = torch.zeros(2, 1, 16, 16)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_visual_commands(tmp_path):
    assert main(["plot-schedule", "--out", str(tmp_path / "s.png")]) == 0
    with Image.open(tmp_path / "s.png") as img:  # two panels side by side, drawn on
        assert img.format == "PNG" and img.size[0] >= 2 * img.size[1] * 0.9
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10
    assert main(["forward-strip", "-n", "2", "--out", str(tmp_path / "f.png")]) == 0
    assert Image.open(tmp_path / "f.png").size[0] > Image.open(tmp_path / "f.png").size[1]


@pytest.mark.parametrize("argv, message", [
    (["sample", "--checkpoint", "nope.safetensors", "-n", "2", "--out", "x.png"], "nope.safetensors"),
    (["train", "--data", "digits", "--preset", "huge", "--steps", "1", "--out", "x"], "unknown --preset"),
    (["train", "--data", "/no/such/folder", "--steps", "1", "--out", "x"], "not found"),
    (["train", "--data", "digits", "--steps", "1", "--out", "x", "--compile", "fast"], "--compile: invalid choice"),
    (["demo", "--dtype", "float16", "--out", "x.png"], "--dtype: invalid choice"),
    (["demo", "--threads", "0", "--out", "x.png"], "--threads: expected an int >= 1"),
])
def test_errors_are_clear(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits with its usage error on stderr
        code, err = e.code, capsys.readouterr().err
    else:
        err = capsys.readouterr().err
    assert code == 2 and message in err


def test_bad_output_suffix(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoints" / "step_0000004.safetensors")
    assert main(["sample", "--checkpoint", ckpt, "-n", "1", "--steps", "2", "--out", str(tmp_path / "x.jpg"),
                 "--quiet"]) == 2
    assert "--out must end in .png, .npz or .npy" in capsys.readouterr().err


def _train_in_a_process(out, *extra):
    """``fastddpm train`` in a fresh interpreter (its own RNG state, imports and threads)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "fastddpm", "train", "--data", "digits", "--preset", "tiny", "--steps", "1",
            "--batch-size", "16", "--seed", "0", "--timesteps", "50", "--out", str(out), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_seed_makes_two_processes_write_identical_checkpoints(tmp_path):
    from safetensors.torch import load_file

    tensors = []
    for name in ("a", "b"):
        done = _train_in_a_process(tmp_path / name)
        assert done.returncode == 0, done.stderr
        tensors.append(load_file(tmp_path / name / "checkpoints" / "step_0000001.safetensors"))
    a, b = tensors
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_create_model_seed_fixes_the_weights_and_leaves_the_global_rng():
    from fastddpm.models import create_model

    state = torch.get_rng_state()
    one, two, other = (create_model("tiny", seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)
    with pytest.raises(ValueError, match="seed"):
        create_model("tiny", seed=-1)


def test_keep_last_flag(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--preset", "tiny", "--steps", "4", "--batch-size", "4",
                 "--out", str(out), "--checkpoint-every", "1", "--timesteps", "50", "--keep-last", "3"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.safetensors")) == [
        f"step_000000{s}.safetensors" for s in (2, 3, 4)]


def test_sigterm_checkpoints_and_prints_the_resume_command(tmp_path):
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--preset", "tiny", "--steps", "100000", "--batch-size", "4", "--timesteps",
            "50", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fastddpm", *argv], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # some steps in (the handlers are installed just before the first step)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    (ckpt,) = (out / "checkpoints").glob("step_*.safetensors")
    step = int(ckpt.stem.split("_")[1])
    assert step > 0 and f"stopped by SIGTERM at step {step}" in stdout
    resume = shlex.split(stdout.strip().splitlines()[-1])
    assert resume == ["fastddpm", *argv, "--resume"]


def test_export_never_replaces_a_training_checkpoint_unless_forced(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "step_0000004.safetensors"
    other = tmp_path / "other.safetensors"
    shutil.copy(ckpt, other)
    before = ckpt.read_bytes()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt)]) == 2
    assert "is the --checkpoint itself" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(other)]) == 2
    assert "is a training checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == before and other.read_bytes() == before
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(other), "--force"]) == 0
    from fastddpm.checkpoint import read_metadata

    assert read_metadata(other)["kind"] == "model"
    release = tmp_path / "release.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(release)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(release)]) == 0  # a release may be replaced


def _error_of(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, capsys.readouterr().err


def test_bad_inputs_are_refused_before_any_work(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = str(run_dir / "checkpoints" / "step_0000004.safetensors")
    sample = ["sample", "--checkpoint", ckpt, "-n", "2", "--quiet"]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.png").mkdir()
    cases = [
        (sample + ["--out", "a_file/s.png"], "its folder 'a_file' is not a folder"),
        (sample + ["--out", "no/such/s.png"], "its folder 'no/such' does not exist"),
        (sample + ["--out", "a_dir.png"], "--out 'a_dir.png' is a folder"),
        (sample + ["--gif", "r.mp4"], "--gif must end in .gif"),
        (sample + ["--scale", "0"], "argument --scale: expected an int in [1, 64], got '0'"),
        (sample + ["--scale", "100000"], "argument --scale: expected an int in [1, 64]"),
        (sample + ["--eta", "0.5"], "--eta is DDIM's: give --sampler ddim"),
        (sample + ["--steps", "51"], "--steps 51 is more than the model's process has (50)"),
        (sample + ["--device", "bogus"], "--device 'bogus' is not a device"),
        (["demo", "--steps", "2000", "--quiet"], "--steps 2000 is more than"),
        (["forward-strip", "-n", "0"], "argument -n: expected an int >= 1"),
        (["eval", "--samples", "x.npz", "--batch-size", "0"], "argument --batch-size: expected an int >= 1"),
        (["plot-schedule", "--out", "s.txt"], "--out must end in .png"),
        (["forward-strip", "--out", "f.jpg"], "--out must end in .png"),
        (["train", "--data", "digits", "--steps", "1", "--out", "r", "--image-size", "0"],
         "argument --image-size: expected an int >= 1"),
        (["train", "--data", "digits", "--steps", "1", "--out", "r", "--timesteps", "20"],
         "linear schedule with num_timesteps=20"),
        (["export", "--checkpoint", ckpt, "--out", "x.pt"], "--out must end in .safetensors"),
    ]
    if not torch.cuda.is_available():
        cases.append((sample + ["--device", "cuda"], "no CUDA GPU is available here"))
    for argv, message in cases:
        code, err = _error_of(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.png", "a_file"]  # nothing written


def test_resume_edge_cases_say_what_happens(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--preset", "tiny", "--batch-size", "4", "--timesteps", "50",
            "--out", str(out)]
    assert main(args + ["--steps", "2", "--resume"]) == 0
    assert "--resume: no checkpoint in" in capsys.readouterr().out
    code, err = _error_of(args + ["--steps", "1", "--resume"], capsys)
    assert code == 2 and "--steps 1 is not beyond the checkpoint's step 2" in err
    code, err = _error_of(args + ["--steps", "3"], capsys)
    assert code == 2 and "--resume on the command line" in err


def test_threads_and_help_defaults(tmp_path, capsys):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--help"], capture_output=True, text=True)
    assert "(default: 0.9999)" in done.stdout and "--threads" in done.stdout
    n = torch.get_num_threads()
    try:
        assert main(["plot-schedule", "--out", str(tmp_path / "s.png"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_gif_frames_follow_the_steps_taken(tmp_path):
    gif = tmp_path / "r.gif"
    assert main(["demo", "-n", "1", "--steps", "50", "--out", str(tmp_path / "d.png"), "--gif", str(gif),
                 "--quiet", "--scale", "1"]) == 0
    assert Image.open(gif).n_frames == 50  # every step of 50, not every 20th of T = 1000


def test_sample_uses_a_bounded_micro_batch_by_default(run_dir, tmp_path, monkeypatch):
    import fastddpm.sampling

    seen = []
    real = fastddpm.sampling.sample

    def recording(model, n, **kw):
        seen.append((n, kw["batch_size"]))
        return real(model, 2, **{**kw, "batch_size": None})  # sample only 2, whatever n is

    monkeypatch.setattr(fastddpm.sampling, "sample", recording)
    ckpt = str(run_dir / "checkpoints" / "step_0000004.safetensors")
    assert main(["sample", "--checkpoint", ckpt, "-n", "20000", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--quiet"]) == 0
    assert main(["sample", "--checkpoint", ckpt, "-n", "3", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--quiet"]) == 0
    assert seen == [(20000, 256), (3, 3)]


@pytest.mark.parametrize("bias", [float("inf"), 1e30])
def test_a_diverged_model_is_not_sampled_silently(run_dir, tmp_path, capsys, bias):
    from fastddpm.checkpoint import load_model, save_model

    model, process = load_model(run_dir / "checkpoints" / "step_0000004.safetensors")
    with torch.no_grad():
        model.conv_out.bias.fill_(bias)
    bad = save_model(tmp_path / "bad.safetensors", model, process)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(bad), "-n", "2", "--steps", "3", "--out", str(out), "--quiet"]) == 2
    assert "not finite or beyond" in capsys.readouterr().err and not out.exists()
