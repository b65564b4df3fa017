"""The ``ddpm`` command end to end, in subprocesses, as a user runs it."""

import json
import subprocess
import sys

import pytest

import ddpm_lib


def ddpm(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lib", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
    assert grid.stat().st_size > 0 and "clear digits" in out.stdout
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
def test_wrong_arguments_exit_non_zero_with_one_line(args, expected):
    out = ddpm(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


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
