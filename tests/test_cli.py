"""The ``ddpm`` command end to end, in subprocesses as a user runs it (argument errors in this
process, through ``main``)."""

import json
import subprocess
import sys

import pytest

import ddpm_lib
from ddpm_lib.cli import main


def ddpm(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lib", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ddpm_in_process(*args, capsys):
    """``main(args)`` here: (exit code, stderr). argparse's errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def train_tiny_digits(run, steps, *extra):
    """`ddpm train` on the digits for a few steps of 16, with a tiny sample grid."""
    return ddpm(
        "train", "--data", "digits", "--out", run, "--steps", steps, "--batch-size", 16,
        "--sample-n", 4, "--sample-steps", 2, "--quiet", *extra,
    )  # fmt: skip


def test_help_and_version():
    out = ddpm("--help")
    assert out.returncode == 0 and "usage: ddpm" in out.stdout
    assert ddpm_lib.__version__ in ddpm("--version").stdout
    train_help = ddpm("train", "--help").stdout
    from ddpm_lib.training import TrainConfig

    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in train_help, name


def test_train_sample_info_on_digits(tmp_path):
    run = tmp_path / "run"
    out = train_tiny_digits(run, steps=4)
    assert out.returncode == 0, out.stderr
    ckpt = run / "ckpt_00000004.pt"
    assert ckpt.is_file() and (run / "config.json").is_file()

    grid = tmp_path / "grid.png"
    out = ddpm(
        "sample",
        "--checkpoint",
        ckpt,
        "--n",
        "9",
        "--sampler",
        "ddim",
        "--steps",
        "5",
        "--out",
        grid,
        "--save-tensor",
        tmp_path / "x.pt",
        "--judge",
    )
    assert out.returncode == 0, out.stderr
    assert grid.stat().st_size > 0 and "% clear (p >= 0.9)" in out.stdout  # the judgement
    import torch

    x = torch.load(tmp_path / "x.pt", weights_only=True)
    assert x.shape == (9, 1, 8, 8) and x.min() >= -1 and x.max() <= 1

    out = ddpm("info", ckpt)
    assert out.returncode == 0 and "step         4" in out.stdout and "unet" in out.stdout

    # ddpm bpd = the library's variational_bound on the same digits with the same seed.
    out = ddpm("bpd", "--checkpoint", ckpt, "--n", "6", "--batch-size", "4", "--seed", "3")
    assert out.returncode == 0, out.stderr
    reported = json.loads(out.stdout.splitlines()[-1])
    from ddpm_lib import load_checkpoint, load_dataset, model_from_checkpoint
    from ddpm_lib.metrics import variational_bound

    model, schedule = model_from_checkpoint(load_checkpoint(ckpt))
    x0 = load_dataset("digits", split="test", n=6).tensors[0]
    expected = variational_bound(
        model, schedule, x0, levels=17, batch_size=4, generator=torch.Generator().manual_seed(3),
        progress=False,
    ).summary()  # fmt: skip
    assert reported["levels"] == 17 and reported["split"] == "test" and reported["n"] == 6
    assert abs(reported["bpd"] - expected["bpd"]) < 1e-5, (reported, expected)

    out = train_tiny_digits(run, 6, "--resume")
    assert out.returncode == 0 and "resuming from" in out.stdout and "at step 4" in out.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--steps", "0"], "steps"),
        (["train", "--steps", "ten"], "--steps"),
        (["train", "--data", "imagenet"], "data"),
        (["train", "--ema-decay", "1.5"], "ema_decay"),
        (["train", "--model-config", "{oops"], "--model-config"),
        (["train", "--no-such-option"], "unrecognized"),
        (["sample", "--checkpoint", "/no/such/file.pt"], "/no/such/file.pt"),
        (["sample"], "--checkpoint"),
        (["info", "/no/such/file.pt"], "/no/such/file.pt"),
        (["sample", "--checkpoint", "x.pt", "--n", "0"], "n must"),
        (["bpd", "--checkpoint", "x.pt", "--split", "val"], "split must"),
        (["bpd", "--checkpoint", "x.pt", "--variance", "tiny"], "variance must"),
        (["bpd"], "--checkpoint"),
    ],
)
def test_wrong_arguments_exit_non_zero_with_one_line(args, expected, capsys):
    # In this process (a subprocess costs 5 s of imports each); an exception that escaped
    # main() would fail the test, as a traceback would from the command.
    code, stderr = ddpm_in_process(*args, capsys=capsys)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr


def test_sampling_a_corrupt_checkpoint_fails_cleanly(tmp_path):
    bad = tmp_path / "ckpt_00000001.pt"
    bad.write_bytes(b"\x80\x02garbage")
    out = ddpm("sample", "--checkpoint", bad, "--out", tmp_path / "g.png")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert str(bad) in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv0,user_value,expected",
    [
        ("-m", None, "PASSIVE"),  # python -m ddpm_lib (and torchrun -m ddpm_lib)
        ("/venv/bin/ddpm", None, "PASSIVE"),  # the console script
        ("-m", "ACTIVE", "ACTIVE"),  # the user's own choice wins
        ("my_script.py", None, None),  # a library user's environment is left alone
    ],
)
def test_the_command_runs_torch_with_passive_openmp_threads(argv0, user_value, expected):
    """OpenMP reads OMP_WAIT_POLICY when torch loads, so importing ddpm_lib sets it first."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    code = (
        f"import sys; sys.argv[0] = {argv0!r}; import ddpm_lib, os, torch; "
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


@pytest.mark.parametrize(
    "first,expected",
    [
        ("import ipykernel", "PASSIVE"),  # a notebook: the book's chapters, Colab
        ("import ipykernel, torch", None),  # torch loaded first: too late, left alone
    ],
)
def test_a_notebook_runs_torch_with_passive_openmp_threads(first, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"{first}; import ddpm_lib, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


# --- mistakes caught before any work, in this process (no subprocess start-up) -------------------


@pytest.fixture(scope="module")
def moons_checkpoint(tmp_path_factory):
    from ddpm_lib.training import Trainer, default_config

    out = tmp_path_factory.mktemp("moons")
    config = default_config(
        "moons", steps=2, batch_size=16, sample_n=2, sample_steps=2, out=str(out)
    )
    return Trainer(config, progress=False, log=None).train()["checkpoint"]


def run_main(capsys, *args):
    from ddpm_lib.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_sampling(monkeypatch):
    import ddpm_lib.cli

    monkeypatch.setattr(ddpm_lib.cli, "sample", lambda *a, **k: pytest.fail("sampled"))


def test_an_output_that_is_an_input_is_refused(tmp_path, moons_checkpoint, capsys, no_sampling):
    from pathlib import Path

    before = Path(moons_checkpoint).read_bytes()
    cases = [
        (["sample", "--checkpoint", moons_checkpoint, "--out", tmp_path / "g.png",
          "--save-tensor", moons_checkpoint], "save_tensor"),
        (["sample", "--checkpoint", moons_checkpoint, "--out", tmp_path / "g.png",
          "--save-tensor", tmp_path / "g.png"], "save_tensor"),
        (["bpd", "--checkpoint", moons_checkpoint, "--save-terms", moons_checkpoint],
         "save_terms"),
    ]  # fmt: skip
    for args, name in cases:
        code, _, err = run_main(capsys, *args)
        assert code == 1 and err.startswith(f"ddpm {args[0]}: error: {name} "), err
        assert len(err.strip().splitlines()) == 1
    assert Path(moons_checkpoint).read_bytes() == before


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--out", "grid.svgz"], "out must end in one of .png, .jpg"),
        (["--save-tensor", "no/such/folder/x.pt"], "save_tensor: the folder no/such/folder does"),
        (["--eta", "inf"], "eta must be a finite number"),
        (["--sampler", "euler"], "sampler must be one of"),
        (["--spacing", "log"], "spacing must be one of"),
        (["--sampler", "dpm++2m", "--eta", "0.5"], "eta applies to sampler='ddim' only"),
        (["--judge"], "judge applies to 8x8 digits only, but"),
    ],
)
def test_sample_mistakes_are_refused_before_sampling(
    tmp_path, moons_checkpoint, capsys, no_sampling, extra, expected
):
    args = ["sample", "--checkpoint", moons_checkpoint, "--out", tmp_path / "g.png", *extra]
    code, _, err = run_main(capsys, *args)
    assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    "extra", [["--sampler", "dpm++2m"], ["--sampler", "heun", "--spacing", "uniform"]]
)
def test_sample_with_an_ode_solver(tmp_path, capsys, moons_checkpoint, extra):
    out = tmp_path / "g.png"
    args = ["sample", "--checkpoint", moons_checkpoint, "--n", "8", "--steps", "5", "--out", out]
    code, _, err = run_main(capsys, *args, *extra)
    assert code == 0 and out.stat().st_size > 0, err


def test_a_missing_device_is_one_line(tmp_path, capsys, moons_checkpoint):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, _, err = run_main(capsys, "sample", "--checkpoint", moons_checkpoint, "--device", "mps")
    assert code == 1 and "device='mps' was asked for, but torch sees no" in err
    code, _, err = run_main(capsys, "train", "--device", "mps", "--out", tmp_path / "r")
    assert code == 1 and "device='mps'" in err and len(err.strip().splitlines()) == 1


def test_train_mistakes_name_the_option(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--data", "folder", "--out", tmp_path / "f")
    assert code == 1 and "data_root must name the image folder" in err and "--data-root" in err
    huge = '{"base_channels": 8192, "channel_mult": [1, 2, 4, 8], "attention_resolutions": []}'
    code, _, err = run_main(capsys, "train", "--model-config", huge, "--out", tmp_path / "h")
    assert code == 1 and "model_config: the unet network has" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, "train", "--lr", "inf", "--out", tmp_path / "i")
    assert code == 1 and "lr must be a finite number" in err
    assert not any((tmp_path / name).exists() for name in "fhi")


def test_a_one_step_chain_and_a_short_run_give_a_valid_summary(tmp_path, capsys):
    """--T 1 needs no --sample-steps; a run shorter than --log-every prints strict JSON."""

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    args = ["train", "--data", "moons", "--T", "1", "--steps", "2", "--out", tmp_path, "--quiet"]
    code, out, err = run_main(capsys, *args, "--batch-size", "16", "--sample-n", "2")
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1], parse_constant=strict)
    assert summary["steps"] == 2 and summary["last_logged_loss"] is None
