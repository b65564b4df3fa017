"""Checkpoints: written atomically, loaded safely, never run code from the file."""

import os
import pickle
import warnings

import pytest
import torch

from ddpm_lib.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from ddpm_lib.cli import main as cli_main
from ddpm_lib.training import Trainer, default_config


@pytest.fixture(scope="module")
def good_state(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(
        default_config("moons", steps=2, out=str(out), sample_n=2, sample_steps=2),
        progress=False,
        log=None,
    )
    trainer.train()
    return trainer.state_dict()


def test_roundtrip_rebuilds_the_same_network(tmp_path, good_state):
    path = save_checkpoint(good_state, tmp_path / "ckpt_00000002.pt")
    state = load_checkpoint(path)
    model, schedule = model_from_checkpoint(state)
    for name, p in model.state_dict().items():
        assert torch.equal(p, good_state["ema"]["shadow"][name])
    assert schedule.T == 1000 and not model.training


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, good_state, monkeypatch):
    path = save_checkpoint(good_state, tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 99}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def _corruptions(good_bytes: bytes):
    return {
        "truncated": good_bytes[: len(good_bytes) // 2],
        "flipped bytes": bytes(b ^ 0xFF if 200 < i < 400 else b for i, b in enumerate(good_bytes)),
        "empty": b"",
        "not a checkpoint": b"hello world\n" * 10,
    }


@pytest.mark.parametrize("kind", ["truncated", "flipped bytes", "empty", "not a checkpoint"])
def test_corrupt_files_give_a_one_line_error_naming_the_file(tmp_path, good_state, kind):
    good = save_checkpoint(good_state, tmp_path / "good.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_corruptions(good)[kind])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_missing_keys_and_foreign_dicts_are_refused(tmp_path, good_state):
    partial = {k: v for k, v in good_state.items() if k != "ema"}
    save_checkpoint(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing \['ema'\]"):
        load_checkpoint(tmp_path / "partial.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a ddpm_lib checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_checkpoint_of_another_shape_is_refused(tmp_path, good_state):
    other = dict(good_state, model_config={**good_state["model_config"], "hidden": 64})
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not describe a usable network"):
        model_from_checkpoint(load_checkpoint(tmp_path / "other.pt"), path="other.pt")


class _Payload:
    """A pickle that would run a shell command when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_malicious_pickle_never_runs(tmp_path, good_state):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(dict(good_state, config=_Payload(marker)), evil, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value)
    assert not marker.exists()
    # A raw pickle (not torch's zip format) is refused too.
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_latest_valid_skips_newer_broken_files_with_a_warning(tmp_path, good_state):
    for step in (2, 4):
        save_checkpoint(dict(good_state, step=step), checkpoint_path(tmp_path, step))
    checkpoint_path(tmp_path, 6).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ckpt_00000006.pt"):
        path, state = latest_valid_checkpoint(tmp_path)
    assert path.name == "ckpt_00000004.pt" and state["step"] == 4


def test_unreadable_checkpoints_never_mean_a_silent_fresh_start(tmp_path):
    checkpoint_path(tmp_path, 2).write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="none loads"):
            latest_valid_checkpoint(tmp_path)
    assert latest_valid_checkpoint(tmp_path / "empty") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 10):
        checkpoint_path(tmp_path, step).write_bytes(b"x")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000003.pt", "ckpt_00000010.pt"]


def _bad_files(tmp_path, good_state):
    """Every kind of broken checkpoint a user may hand to the CLI, and a marker file that the
    malicious one would create if it ever ran."""
    good = save_checkpoint(good_state, tmp_path / "good.pt").read_bytes()
    marker = tmp_path / "pwned"
    files = {}
    for kind, data in _corruptions(good).items():
        files[kind] = tmp_path / f"{kind.replace(' ', '_')}.pt"
        files[kind].write_bytes(data)
    files["missing keys"] = save_checkpoint(
        {k: v for k, v in good_state.items() if k != "model_config"}, tmp_path / "partial.pt"
    )
    files["other shape"] = save_checkpoint(
        dict(good_state, model_config={**good_state["model_config"], "hidden": 32}),
        tmp_path / "other.pt",
    )
    files["malicious pickle"] = tmp_path / "evil.pt"
    torch.save(dict(good_state, config=_Payload(marker)), files["malicious pickle"])
    return files, marker


BAD_KINDS = [
    "truncated", "flipped bytes", "empty", "not a checkpoint", "missing keys", "other shape",
    "malicious pickle",
]  # fmt: skip


@pytest.mark.parametrize("command", ["sample", "info"])
def test_the_cli_refuses_every_broken_checkpoint_in_one_line(tmp_path, good_state, command, capsys):
    # main() in this process: an exception escaping it would fail the test as a traceback
    # would fail the command (the command's own process is tested in test_cli.py).
    files, marker = _bad_files(tmp_path, good_state)
    for kind in BAD_KINDS:
        path = files[kind]
        args = ["sample", "--checkpoint", path, "--out", tmp_path / "g.png"]
        args = args if command == "sample" else ["info", path]
        capsys.readouterr()
        code = cli_main([str(a) for a in args])
        stderr = capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert code != 0, kind
        assert len(lines) == 1 and str(path) in lines[0], (kind, stderr)
        assert not (tmp_path / "g.png").exists()
    assert not marker.exists()


def test_a_full_disk_during_training_is_reported_and_loses_nothing(tmp_path, monkeypatch):
    config = default_config("moons", steps=4, batch_size=16, checkpoint_every=2, out=str(tmp_path))
    trainer = Trainer(config, progress=False, log=None)
    original_save = torch.save

    def full_after_first(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(28, "No space left on device")
        return original_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_first)
    with pytest.raises(OSError, match=r"ckpt_00000004.pt failed \(No space left on device\)"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002.pt"]
    assert load_checkpoint(checkpoint_path(tmp_path, 2))["step"] == 2
    assert not list(tmp_path.glob(".ckpt_*"))


# --- a full disk, the way torch.save really meets it --------------------------------------------

FULL_DISK = """
import resource, signal, sys, torch
from ddpm_lib.checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint({"w": torch.zeros(10)}, path)  # the previous file: small
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_checkpoint({"w": torch.zeros(100_000)}, path)
except OSError as e:
    print(f"OSError: {e}")
"""


def test_a_full_disk_inside_torch_save_is_one_oserror_naming_the_file(tmp_path):
    """torch.save turns the OSError of a full disk into 'RuntimeError: [enforce fail at
    inline_container.cc]'; the file size limit makes the kernel refuse writes in the same way."""
    import subprocess
    import sys

    path = tmp_path / "ckpt.pt"
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"OSError: [Errno 27] writing {path} failed (File too large); the previous file is "
        "untouched"
    )
    assert load_checkpoint_raw(path)["w"].shape == (10,)
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def load_checkpoint_raw(path):
    return torch.load(path, weights_only=True)


# --- crafted and damaged files -----------------------------------------------------------------

CRAFTED = {  # what is changed in a good checkpoint -> what the one-line message must name
    "config a list": (dict(config=[1, 2]), "config must be a dict"),
    "config without data": ("no data", "config['data']"),
    "absurd T": ("huge T", "schedule T must be an integer in [1, 1000000]"),
    "model_config a list": (dict(model_config=[64]), "model_config must be a dict"),
    "negative step": (dict(step=-1), "step must be an integer >= 0"),
    "unknown network": (dict(model_name="resnet"), "model_name must be one of"),
    "ema without shadow": (dict(ema={}), "ema['shadow']"),
}


def _crafted(good_state, change):
    if change == "no data":
        return dict(
            good_state, config={k: v for k, v in good_state["config"].items() if k != "data"}
        )
    if change == "huge T":
        schedule = {"kind": "linear", "params": {**good_state["schedule"]["params"], "T": 10**12}}
        return dict(good_state, schedule=schedule)
    return dict(good_state, **change)


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_crafted_field_is_a_one_line_checkpoint_error(tmp_path, good_state, kind):
    change, expected = CRAFTED[kind]
    path = save_checkpoint(_crafted(good_state, change), tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_every_field_that_fails_to_build_is_a_checkpoint_error(tmp_path, good_state):
    for model_config in ({"hidden": "wide"}, {"hidden": 10**12}, {"no_such_argument": 1}):
        state = dict(good_state, model_config=model_config)
        with pytest.raises(CheckpointError, match="does not describe a usable network"):
            model_from_checkpoint(state, path="crafted.pt")


def _rezip(source, target, replace):
    """Copy the zip archive ``source`` to ``target``, entry by entry, with ``replace(name, zin,
    zout)`` writing the entries it wants to change (it returns True for those)."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            if not replace(info.filename, zin, zout):
                zout.writestr(info, zin.read(info))
    return target


def test_a_deflate_bomb_is_refused_before_it_is_read(tmp_path, good_state, monkeypatch):
    import zipfile

    good = save_checkpoint(good_state, tmp_path / "good.pt")
    chunk = bytes(2**20)

    def bomb(name, zin, zout):  # 256 MB of zeros, deflated to a few hundred kB
        if not name.endswith("/data/0"):
            return False
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(info, "w", force_zip64=True) as f:
            for _ in range(256):
                f.write(chunk)
        return True

    path = _rezip(good, tmp_path / "bomb.pt", bomb)
    assert path.stat().st_size < good.stat().st_size + 2**20  # a few MB declaring 256 MB more

    def never(*args, **kwargs):
        raise AssertionError("torch.load read the bomb")

    monkeypatch.setattr(torch, "load", never)
    declared = r"refused before reading: the archive declares 27\d MB of content in a 3"
    with pytest.raises(CheckpointError, match=declared):
        load_checkpoint(path)


def test_tensors_larger_than_the_network_needs_are_refused_before_reading(
    tmp_path, good_state, monkeypatch
):
    import ddpm_lib.checkpoint as checkpoint

    good = save_checkpoint(good_state, tmp_path / "good.pt")

    def oversized(name, zin, zout):  # stored, not compressed: the file really is this large
        if not name.endswith("/data/0"):
            return False
        zout.writestr(zin.getinfo(name), bytes(8 * 2**20))
        return True

    path = _rezip(good, tmp_path / "oversized.pt", oversized)
    monkeypatch.setattr(checkpoint, "SPARE_BYTES", 0)  # so that a small file shows the rule
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read the file"))
    with pytest.raises(CheckpointError, match=r"declares \d+ MB of tensors, but its mlp network"):
        load_checkpoint(path)
    assert checkpoint._check_declared_sizes(good) is None  # a real one passes


def test_nan_weights_are_refused_in_one_line(tmp_path, good_state):
    shadow = {k: v.clone() for k, v in good_state["ema"]["shadow"].items()}
    name = next(iter(shadow))
    shadow[name].view(-1)[0] = float("nan")
    state = dict(good_state, ema={**good_state["ema"], "shadow": shadow})
    with pytest.raises(CheckpointError, match=rf"EMA weight {name} holds NaN or Inf"):
        model_from_checkpoint(state, path="nan.pt")
    model_from_checkpoint(state, use_ema=False)  # the raw weights are fine


@pytest.mark.parametrize("command", ["sample", "bpd", "info"])
def test_the_cli_refuses_crafted_and_nan_checkpoints_in_one_line(
    tmp_path, good_state, command, capsys
):
    from ddpm_lib.cli import main

    nan_shadow = {
        k: torch.full_like(v, float("nan")) for k, v in good_state["ema"]["shadow"].items()
    }
    files = {
        kind: save_checkpoint(_crafted(good_state, CRAFTED[kind][0]), tmp_path / f"{i}.pt")
        for i, kind in enumerate(CRAFTED)
    }
    files["nan weights"] = save_checkpoint(
        dict(good_state, ema={**good_state["ema"], "shadow": nan_shadow}), tmp_path / "nan.pt"
    )
    for kind, path in files.items():
        args = {
            "sample": ["sample", "--checkpoint", path, "--out", tmp_path / "g.png", "--n", "2"],
            "bpd": ["bpd", "--checkpoint", path, "--n", "2"],
            "info": ["info", path],
        }[command]
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 1, (kind, err)
        assert len(err.strip().splitlines()) == 1 and str(path) in err, (kind, err)
        assert not (tmp_path / "g.png").exists(), kind


def test_garbage_is_called_damaged_not_unsafe(tmp_path):
    path = tmp_path / "ckpt_00000002.pt"
    path.write_bytes(b"damaged")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (
        f"{path}: unreadable (truncated or corrupt?): UnpicklingError: Unsupported operand 100"
    )
