"""Training never loses work: a run killed with SIGKILL and resumed ends bit-identical to one that
was never interrupted, wherever the kill lands, including in the middle of a checkpoint write; a run
stopped by SIGINT or SIGTERM finishes its step, checkpoints it and resumes exactly from there."""

import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ddpm_lib.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint

STEPS = 12
TRAIN_ARGS = [
    "train", "--data", "digits", "--steps", str(STEPS), "--batch-size", "16",
    "--checkpoint-every", "4", "--keep-checkpoints", "3", "--log-every", "2",
    "--sample-n", "4", "--sample-steps", "2", "--quiet",
    "--device", "cpu",  # bit for bit is a CPU promise: GPU kernels may sum in any order
]  # fmt: skip

# A driver that runs the ddpm command, but SIGKILLs itself at a chosen moment:
#   step N        right after optimisation step N (between checkpoints)
#   half-write N  while writing the checkpoint of step N, half of the bytes on disk
#   pre-rename N  after the temporary file of step N is complete, before os.replace
#   sigterm N / sigint N   sends itself that signal during optimisation step N
#   signal-in-save N       SIGTERM during step N, then SIGINT while that step's checkpoint is saved
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import ddpm_lib._io as atomic
    from ddpm_lib import training
    from ddpm_lib.cli import main

    mode, at = sys.argv[1], int(sys.argv[2])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode in ("sigterm", "sigint", "signal-in-save"):
        original_step = training.Trainer.train_step
        first = signal.SIGINT if mode == "sigint" else signal.SIGTERM
        def train_step(self, x0, labels=None):
            if self.step == at - 1:
                os.kill(os.getpid(), first)  # arrives in the middle of the step
            return original_step(self, x0, labels)
        training.Trainer.train_step = train_step
    if mode == "signal-in-save":
        original_save = torch.save
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == at:
                os.kill(os.getpid(), signal.SIGINT)  # a second signal, impatient
            return original_save(obj, f, *args, **kwargs)
        torch.save = save
    if mode == "step":
        original_step = training.Trainer.train_step
        def train_step(self, x0, labels=None):
            loss = original_step(self, x0, labels)
            if self.step == at:
                die()
            return loss
        training.Trainer.train_step = train_step
    elif mode == "half-write":
        original_save = torch.save
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == at:
                import io
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                die()
            return original_save(obj, f, *args, **kwargs)
        torch.save = save
    elif mode == "pre-rename":
        original_replace = atomic.os.replace
        def replace(src, dst):
            if str(dst).endswith(f"ckpt_{at:08d}.pt"):
                die()
            return original_replace(src, dst)
        atomic.os.replace = replace
    sys.exit(main(sys.argv[3:]))
    """
)


def run_ddpm(args, driver=None):
    command = (
        [sys.executable, "-c", DRIVER, *driver, *args]
        if driver
        else [sys.executable, "-m", "ddpm_lib", *args]
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def final_state(folder):
    return load_checkpoint(checkpoint_path(folder, STEPS))


def assert_bit_identical(a, b):
    for key in ("model",):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for name, tensor in a["ema"]["shadow"].items():
        assert torch.equal(tensor, b["ema"]["shadow"][name]), f"ema.{name}"
    assert a["ema"]["updates"] == b["ema"]["updates"]
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, slots in opt_a["state"].items():
        for slot, tensor in slots.items():
            assert torch.equal(tensor, opt_b["state"][index][slot]), f"optimizer.{index}.{slot}"
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for name in ("torch", "noise"):
        assert torch.equal(a["rng"][name], b["rng"][name]), f"rng.{name}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_ddpm([*TRAIN_ARGS, "--out", folder])
    assert result.returncode == 0, result.stderr
    return final_state(folder)


# The kill points: fixed ones at the edges, plus one step drawn at random (seeded) after a
# checkpoint, so that the test does not only try the moments we thought of.
RANDOM_STEP = random.Random(2026).choice([6, 7, 9, 10, 11])  # 5 and 8 are tried anyway
KILL_POINTS = [  # (how, when, the step the resumed run must start from)
    ("step", 1, 0),  # before any checkpoint: resume starts over from step 0
    ("step", 5, 4),  # just after the checkpoint of step 4
    ("step", RANDOM_STEP, 4 * (RANDOM_STEP // 4)),
    ("step", 8, 4),  # right after step 8, before its checkpoint is written
    ("half-write", 8, 4),  # half of ckpt 8 on disk, in the temporary file
    ("pre-rename", 4, 0),  # ckpt 4 complete in the temporary file, never renamed
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,at,resume_step", KILL_POINTS, ids=[f"{m}-{a}" for m, a, _ in KILL_POINTS]
)
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, mode, at, resume_step):
    out = ["--out", tmp_path]
    killed = run_ddpm([*TRAIN_ARGS, *out], driver=[mode, str(at)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Whatever is on disk now is either a complete checkpoint or an ignored temporary file.
    for path in list_checkpoints(tmp_path):
        load_checkpoint(path)

    resumed = run_ddpm([*TRAIN_ARGS, *out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    if resume_step:
        assert f"resuming from {checkpoint_path(tmp_path, resume_step)}" in resumed.stdout
    else:
        assert "starting from step 0" in resumed.stdout
    assert not list(tmp_path.glob(".ckpt_*.tmp")), "stale temporary file left behind"
    assert_bit_identical(reference, final_state(tmp_path))


@pytest.mark.slow
def test_resume_skips_a_newer_broken_checkpoint_with_a_warning(tmp_path, reference):
    first = run_ddpm([*TRAIN_ARGS, "--out", tmp_path, "--steps", "8"])
    assert first.returncode == 0, first.stderr
    checkpoint_path(tmp_path, 8).write_bytes(checkpoint_path(tmp_path, 8).read_bytes()[:1000])
    resumed = run_ddpm([*TRAIN_ARGS, "--out", tmp_path, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping unreadable checkpoint" in resumed.stderr
    assert "ckpt_00000008.pt" in resumed.stderr
    assert f"resuming from {checkpoint_path(tmp_path, 4)}" in resumed.stdout
    assert_bit_identical(reference, final_state(tmp_path))


def test_resume_never_silently_starts_over_when_checkpoints_are_unreadable(tmp_path):
    checkpoint_path(tmp_path, 4).write_bytes(b"not a checkpoint")
    result = run_ddpm([*TRAIN_ARGS, "--out", tmp_path, "--resume"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "none loads" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode,number", [("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)])
def test_a_stop_signal_finishes_the_step_checkpoints_it_and_resumes_exactly(
    tmp_path, reference, mode, number
):
    stopped = run_ddpm([*TRAIN_ARGS, "--out", tmp_path], driver=[mode, "6"])
    assert stopped.returncode == 128 + number, stopped.stderr
    assert stopped.stderr.strip() == (
        f"ddpm train: stopped by {signal.Signals(number).name} after step 6; checkpoint "
        f"{checkpoint_path(tmp_path, 6)} (continue with --resume)"
    )
    assert load_checkpoint(checkpoint_path(tmp_path, 6))["step"] == 6

    resumed = run_ddpm([*TRAIN_ARGS, "--out", tmp_path, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint_path(tmp_path, 6)} at step 6" in resumed.stdout
    assert_bit_identical(reference, final_state(tmp_path))


@pytest.mark.slow
def test_a_second_signal_during_the_checkpoint_is_honoured_after_it(tmp_path):
    stopped = run_ddpm([*TRAIN_ARGS, "--out", tmp_path], driver=["signal-in-save", "6"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1 and "Traceback" not in stopped.stderr
    assert load_checkpoint(checkpoint_path(tmp_path, 6))["step"] == 6  # whole, not torn
    assert not list(tmp_path.glob(".ckpt_*.tmp"))
