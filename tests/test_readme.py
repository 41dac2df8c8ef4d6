"""The README's commands, run as written at a small scale: the run and sample commands of
"Command line" and the shipped model's recipe, with steps divided by 1000, the ``tiny`` preset,
a short process and a short sampler (the commands' own flags and paths otherwise)."""
import re
import shlex
from pathlib import Path

import pytest
import torch

from fastddpm.cli import main

README = Path(__file__).parent.parent / "README.md"
SCALE = 1000


def _blocks_after(heading: str) -> list[str]:
    """The commands of the ```bash blocks of a README section, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        commands += [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [c for c in commands if c]


def _small(command: str) -> list[str]:
    """``command`` (``fastddpm ...``, after any ``VAR=value``) at the test's scale, as argv."""
    argv = [a for a in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S*", a)]
    assert argv[0] == "fastddpm", command
    argv = argv[1:]
    out = []
    for i, a in enumerate(argv):
        if argv[0] == "train" and i > 0 and argv[i - 1] in ("--steps", "--warmup-steps"):
            a = str(max(1, int(a) // SCALE))
        a = re.sub(r"step_(\d{7})", lambda m: f"step_{int(m.group(1)) // SCALE:07d}", a)
        out.append({"small": "tiny", "64": "8"}.get(a, a) if argv[i - 1] in ("--preset", "--batch-size") else a)
    if argv[0] == "train":
        out += ["--checkpoint-every", str(1000 // SCALE), "--timesteps", "50", "--log-every", "1"]
    if argv[0] in ("sample", "demo"):
        out = _short_sampler(out) + ["--quiet"]
    return out


def _short_sampler(argv: list[str]) -> list[str]:
    """At most 10 sampling steps and 128 images (more than the 64 features eval needs)."""
    argv = list(argv)
    for flag, most in (("--steps", 10), ("-n", 128)):
        if flag in argv:
            i = argv.index(flag) + 1
            argv[i] = str(min(int(argv[i]), most))
        else:
            argv += [flag, str(most)]
    return argv


def _run_all(commands, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    for command in commands:
        assert main(_small(command)) == 0, command


def test_command_line_run_resume_and_sample(tmp_path, monkeypatch):
    commands = [c for c in _blocks_after("## Command line")
                if re.match(r"fastddpm (train|sample) .*runs/digits", c) and "..." not in c]
    assert [c.split()[1] for c in commands] == ["train", "train", "sample"]
    _run_all(commands, tmp_path, monkeypatch)
    assert (tmp_path / "samples.png").is_file()


def test_the_shipped_model_recipe(tmp_path, monkeypatch):
    commands = _blocks_after("model that ships in the package")
    assert [c.split()[2 if c.startswith("OMP") else 1] for c in commands] == ["train", "export"]
    (tmp_path / "fastddpm" / "assets").mkdir(parents=True)
    _run_all(commands, tmp_path, monkeypatch)
    from fastddpm.checkpoint import load_model

    model, process = load_model(tmp_path / "fastddpm" / "assets" / "digits_small.safetensors")
    assert process.num_steps == 50


@pytest.mark.filterwarnings("error:.*rank-deficient")  # the eval example must sample enough images
def test_the_other_command_line_examples(tmp_path, monkeypatch):
    """Every other ``fastddpm`` line of "Command line" that names no placeholder but CKPT (a small run's
    checkpoint here), in its order (``eval`` reads what ``sample`` wrote)."""
    commands = [c for c in _blocks_after("## Command line")
                if c.startswith("fastddpm ") and "..." not in c and "runs/digits" not in c]
    assert {c.split()[1] for c in commands} >= {"sample", "demo", "plot-schedule", "forward-strip", "eval"}
    _run_all(["fastddpm train --data digits --preset small --steps 2000 --batch-size 64 --out run"], tmp_path,
             monkeypatch)
    ckpt = "run/checkpoints/step_0002000.safetensors"  # at full scale, as the commands are written
    _run_all([c.replace("CKPT", ckpt) for c in commands], tmp_path, monkeypatch)
    for name in ("samples.npz", "reverse.gif", "samples.png", "schedules.png", "forward.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.heavy
def test_the_readme_run_ends_in_recognisable_digits(tmp_path, monkeypatch):
    """The "Command line" run as written but 20x shorter (300 + 100 steps, the small preset, batch 64,
    the 1000-step process), sampled with 100 steps: the shipped digits classifier is about as sure of
    its samples as of real digits, and far surer than of speckle.  (About 3 minutes on 2 cores.)"""
    import numpy as np

    from fastddpm.data import ArrayDataset, digits_dataset
    from fastddpm.metrics import digits_classifier_split, load_digits_classifier

    train, resume, sample = [c for c in _blocks_after("## Command line")
                             if re.match(r"fastddpm (train|sample) .*runs/digits", c) and "..." not in c]

    def shorter(command, scale=20):
        argv = shlex.split(command)[1:]
        if "--steps" in argv:
            i = argv.index("--steps") + 1
            argv[i] = str(int(argv[i]) // scale)
        return [re.sub(r"step_(\d{7})", lambda m: f"step_{int(m.group(1)) // scale:07d}", a) for a in argv]

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    assert main(shorter(train) + ["--log-every", "50", "--checkpoint-every", "100"]) == 0
    assert main(shorter(resume) + ["--log-every", "50", "--checkpoint-every", "100"]) == 0
    argv = shorter(sample)
    argv[argv.index("--out") + 1] = "samples.npz"
    assert main(argv + ["--steps", "100", "--quiet"]) == 0

    classifier = load_digits_classifier()

    def confidence(images):
        with torch.no_grad():
            return torch.softmax(classifier(images), dim=1).max(dim=1).values.mean().item()

    samples = ArrayDataset(Path("samples.npz")).float_images()
    real = digits_dataset().images[digits_classifier_split()[1]]  # the classifier's held-out digits
    noise = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    ours, digits, speckle = confidence(samples), confidence(real), confidence(noise)
    assert samples.shape == (64, 1, 16, 16) and np.isfinite(ours)
    assert ours >= 0.8 * digits and ours >= speckle + 0.15, (ours, digits, speckle)


def test_where_things_are_names_files_that_exist():
    """The README's map of the tree: every path it spells out (with a folder) is there."""
    import re

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Where things are"):text.index("## Tests")]
    paths = set(re.findall(r"`([\w./]+/[\w.]+\.(?:py|h|cpp|cu))`", section))
    assert len(paths) > 20
    root = README.parent
    missing = sorted(p for p in paths if not (root / p).exists() and not (root / "fastddpm" / p).exists())
    assert not missing, missing
