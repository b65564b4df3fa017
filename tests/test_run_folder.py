"""Nothing lost, nothing mixed: a run folder holds one run, one process trains in it at a time, a
resumed run is the run it says it is, and its log and checkpoints survive a full disk."""

import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lib.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from ddpm_lib.cli import main
from ddpm_lib.run_folder import RunFolderError
from ddpm_lib.training import Trainer, default_config

TINY = dict(batch_size=16, sample_n=2, sample_steps=2)
CLI_TINY = ["--batch-size", "16", "--sample-n", "2", "--sample-steps", "2", "--quiet"]


def quiet(config, **kwargs):
    return Trainer(config, progress=False, log=None, **kwargs)


def moons(folder, data="moons", **overrides):
    return default_config(data, out=str(folder), **{**TINY, **overrides})


def ddpm(capsys, *args):
    """The ddpm command in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a folder holds one run ----------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--data", "moons", "--out", run, *CLI_TINY, "--checkpoint-every", "2"]
    assert ddpm(capsys, *common, "--steps", "6")[0] == 0
    before = snapshot(run)
    code, out, err = ddpm(capsys, *common, "--steps", "3")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert (
        f"{run} already holds a run (config.json, metrics.jsonl, 3 checkpoint(s) (steps 2 to 6)"
        in err
    )
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before  # nothing written, nothing pruned


def test_overwrite_says_what_it_removes_and_keeps_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--data", "moons", "--out", run, *CLI_TINY, "--checkpoint-every", "2"]
    assert ddpm(capsys, *common, "--steps", "6")[0] == 0
    (run / "notes.txt").write_text("mine")
    code, out, err = ddpm(capsys, *common, "--steps", "3", "--overwrite")
    assert code == 0, err
    assert "overwrite: removed config.json, metrics.jsonl, 3 checkpoint(s) (steps 2 to 6), " in out
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    assert json.loads((run / "config.json").read_text())["steps"] == 3
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads(out.splitlines()[-1])["checkpoint"] == str(checkpoint_path(run, 3))


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        quiet(moons(tmp_path), resume=True, overwrite=True)


# --- one process at a time -----------------------------------------------------------------------

LONG_RUN = [sys.executable, "-m", "ddpm_lib", "train", "--data", "moons", "--steps", "1000000",
            "--checkpoint-every", "0", *CLI_TINY]  # fmt: skip


def _wait_for(condition, seconds=600):  # a guard against a hang, not a speed requirement
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_training_into_a_busy_folder_fails_at_once_naming_the_holder(
    tmp_path, capsys, monkeypatch
):
    import ddpm_lib.training as training

    run = tmp_path / "run"
    first = subprocess.Popen([*LONG_RUN, "--out", str(run)], stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file())  # it is training
        with monkeypatch.context() as m:  # at once: before any data is loaded
            m.setattr(training, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
            code, _, err = ddpm(capsys, "train", "--data", "moons", "--steps", "3", "--out", run,
                                *CLI_TINY)  # fmt: skip
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{run} is in use by another training (pid {first.pid})" in err
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock with the process
        first.wait()
    summary = quiet(moons(run, steps=2), resume=True).train()
    assert summary["steps"] == 2


# --- a resumed run is the run it says it is ------------------------------------------------------

CHANGES = {  # option -> a value other than the moons defaults
    "lr": 1e-3, "ema_decay": 0.9, "T": 500, "schedule": "cosine", "seed": 1, "batch_size": 32,
    "data": "ring", "warmup_steps": 7, "model_config": {"hidden": 64},
}  # fmt: skip


@pytest.mark.parametrize("option", list(CHANGES))
def test_resume_refuses_a_changed_setting_naming_both_values(tmp_path, option):
    quiet(moons(tmp_path, steps=2)).train()
    before = snapshot(tmp_path)
    changed = moons(tmp_path, steps=4, **{option: CHANGES[option]})
    with pytest.raises(RunFolderError) as info:
        quiet(changed, resume=True)
    message = str(info.value)
    old = moons(tmp_path).to_dict()[option]
    new = changed.to_dict()[option]
    assert f"{option} {old!r} -> {new!r}" in message and "\n" not in message, message
    assert snapshot(tmp_path) == before


def test_resume_refuses_a_checkpoint_whose_config_differs_even_without_config_json(tmp_path):
    quiet(moons(tmp_path, steps=2)).train()
    (tmp_path / "config.json").unlink()  # the checkpoint's own config still says what it was
    with pytest.raises(RunFolderError, match=r"\(ckpt_00000002\.pt\): lr 0\.002 -> 0\.001"):
        quiet(moons(tmp_path, steps=4, lr=1e-3), resume=True)


def test_resume_allows_what_can_change_safely(tmp_path):
    quiet(moons(tmp_path, steps=2)).train()
    safe = dict(steps=6, log_every=1, checkpoint_every=3, keep_checkpoints=5, sample_every=6,
                sample_steps=3, device="cpu", num_workers=1, max_minutes=5.0)  # fmt: skip
    trainer = quiet(moons(tmp_path, **safe), resume=True)
    assert trainer.step == 2
    assert trainer.train()["steps"] == 6


def test_resume_compares_configs_as_json_sees_them(tmp_path):
    """(1, 2) from Python and [1, 2] read back from config.json are the same setting."""
    base = dict(steps=2, batch_size=8, sample_n=2, sample_steps=2, out=str(tmp_path))
    unet = {"base_channels": 8, "channel_mult": (1, 2), "attention_resolutions": (4,),
            "num_groups": 4, "num_res_blocks": 1}  # fmt: skip
    quiet(default_config("digits", model_config=unet, **base)).train()
    as_lists = {**unet, "channel_mult": [1, 2], "attention_resolutions": [4]}
    config = default_config("digits", model_config=as_lists, **{**base, "steps": 3})
    assert quiet(config, resume=True).train()["steps"] == 3


def test_resume_refuses_fewer_steps_than_the_checkpoint_has(tmp_path):
    quiet(moons(tmp_path, steps=4)).train()
    with pytest.raises(ValueError, match=r"^steps must be at least the checkpoint's step 4"):
        quiet(moons(tmp_path, steps=2), resume=True)


def test_the_cli_resumes_with_the_runs_own_config(tmp_path, capsys):
    run = tmp_path / "ring"
    args = ["train", "--out", run, *CLI_TINY, "--checkpoint-every", "2"]
    assert ddpm(capsys, *args, "--data", "ring", "--lr", "0.001", "--steps", "2")[0] == 0
    code, out, err = ddpm(capsys, *args, "--resume", "--steps", "4")  # no --data, no --lr
    assert code == 0, err
    assert f"resuming from {checkpoint_path(run, 2)} at step 2" in out
    config = load_checkpoint(checkpoint_path(run, 4))["config"]
    assert config["data"] == "ring" and config["lr"] == 0.001 and config["steps"] == 4
    code, _, err = ddpm(capsys, *args, "--resume", "--steps", "6", "--data", "moons")
    assert code == 1 and "data 'ring' -> 'moons'" in err and len(err.strip().splitlines()) == 1


# --- the metrics log survives a torn write -------------------------------------------------------


def test_resume_drops_a_torn_last_line_of_the_log_and_says_so(tmp_path):
    kw = dict(log_every=2, checkpoint_every=2)
    quiet(moons(tmp_path, steps=4, **kw)).train()
    with (tmp_path / "metrics.jsonl").open("a") as f:  # a full disk cut this write short
        f.write('{"step": 6, "loss": 0.5, "lr": 0.0')
    messages = []
    Trainer(
        moons(tmp_path, steps=8, **kw), resume=True, progress=False, log=messages.append
    ).train()
    assert f"dropped the torn last line of {tmp_path / 'metrics.jsonl'} (a write cut short)" in (
        messages
    )
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_a_damaged_line_inside_the_log_is_an_error_naming_the_file(tmp_path):
    kw = dict(log_every=1, checkpoint_every=2)
    quiet(moons(tmp_path, steps=4, **kw)).train()
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"^{log}, line 2: not a JSON record"):
        quiet(moons(tmp_path, steps=6, **kw), resume=True).train()


# A subprocess whose files may not grow beyond LIMIT bytes: the kernel's way to fail a write as a
# full disk does (EFBIG instead of ENOSPC), through the real code paths of Python and torch.
LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from ddpm_lib.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def run_limited(limit, *args):
    command = [sys.executable, "-c", LIMITED, str(limit), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_log_is_rewritten_atomically_on_resume(tmp_path):
    quiet(moons(tmp_path, steps=40, log_every=1, checkpoint_every=20)).train()
    log = tmp_path / "metrics.jsonl"
    before = log.read_bytes()
    assert len(before) > 4000 and len((tmp_path / "config.json").read_bytes()) < 2000
    # Resuming at step 20 rewrites the log (lines 1-20, about 2.5 kB): the disk fills at 2 kB.
    os.remove(checkpoint_path(tmp_path, 40))
    args = ["--steps", "40", "--log-every", "1", "--checkpoint-every", "20", *CLI_TINY, "--resume"]
    out = run_limited(2000, "train", "--data", "moons", "--out", tmp_path, *args)
    assert log.read_bytes() == before  # the old log, whole
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"writing {log} failed (File too large)" in out.stderr


def test_a_full_disk_at_a_checkpoint_is_one_line_saying_the_previous_is_intact(tmp_path):
    args = ["train", "--data", "moons", "--out", tmp_path, "--checkpoint-every", "2", *CLI_TINY]
    first = run_limited(resource.RLIM_INFINITY, *args, "--steps", "2")
    assert first.returncode == 0, first.stderr
    size = checkpoint_path(tmp_path, 2).stat().st_size
    out = run_limited(size // 2, *args, "--steps", "4", "--resume")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        f"ddpm train: error: [Errno 27] step 4: writing {checkpoint_path(tmp_path, 4)} failed "
        f"(File too large); the previous checkpoint {checkpoint_path(tmp_path, 2)} is intact"
    )
    assert load_checkpoint(checkpoint_path(tmp_path, 2))["step"] == 2
    assert not list(tmp_path.glob(".ckpt_*"))


# --- resuming is exact for every kind of data ----------------------------------------------------


def _idx_mnist(root, n=40):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes()
        )
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, n) + labels.tobytes()
        )
    return root


def _image_folder(root, n=40):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


SMALL_UNET = {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4],
              "num_groups": 4, "num_res_blocks": 1, "dropout": 0.3}  # fmt: skip
DATA_KINDS = {  # data -> how to make it, and the settings of a run on it
    "moons": (None, {}),
    "swiss_roll": (None, {}),
    "digits": (None, dict(model_config=SMALL_UNET)),
    "mnist": (_idx_mnist, dict(image_size=8, model_config=SMALL_UNET)),
    "folder": (_image_folder, dict(image_size=8, model_config=SMALL_UNET)),
}


@pytest.mark.parametrize("data", list(DATA_KINDS))
def test_resume_is_bit_identical_for_every_kind_of_data(tmp_path, data):
    """The dropout masks of the U-Nets come from the global RNG: a resumed run must draw exactly
    what the straight run draws (a data loader that seeds itself from it would shift them)."""
    make, settings = DATA_KINDS[data]
    root = str(make(tmp_path / "data")) if make else None

    def config(folder, steps):
        # device cpu: bit for bit is a CPU promise (GPU kernels may sum in any order)
        return default_config(data, out=str(tmp_path / folder), steps=steps, batch_size=8,
                              data_root=root, checkpoint_every=3, sample_n=2, sample_steps=2,
                              device="cpu", **settings)  # fmt: skip

    straight = quiet(config("straight", 6))
    straight.train()
    quiet(config("resumed", 3)).train()
    resumed = quiet(config("resumed", 6), resume=True)
    assert resumed.step == 3
    resumed.train()
    for a, b in [(straight.model, resumed.model), (straight.ema.shadow, resumed.ema.shadow)]:
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), name
