"""Checkpoints that are written atomically and loaded without running code from the file.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with ``torch.save``
and read back with ``torch.load(weights_only=True)``, which refuses any pickle that would import or
call something. It is first written to a temporary file in the same folder, flushed and fsynced,
then renamed over the target with ``os.replace``: a crash or a full disk leaves the previous file
intact.

Explained in chapter 8 (scaling up).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ddpm_lib._io import atomic_save
from ddpm_lib.data import DATASETS
from ddpm_lib.hardware import build_model_on_meta
from ddpm_lib.models import MODELS, build_model, count_parameters
from ddpm_lib.schedule import NoiseSchedule

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
REQUIRED_KEYS = (
    "format",
    "step",
    "model",
    "ema",
    "model_name",
    "model_config",
    "schedule",
    "config",
)
FORMAT = "ddpm_lib/1"
MAX_T = 1_000_000  # no schedule has more steps; a larger T in a file is damage, not a setting


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, os.replace).

    Args:
        state: a dict of tensors, numbers, strings, lists and dicts.
        path: the target file; its folder must exist.

    Raises:
        OSError: when writing fails (a full disk, say); the previous file at ``path`` is left as
            it was.
    """
    return atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely: ``weights_only=True``, never an unsafe fallback.

    Args:
        path: the checkpoint file.
        map_location: where to put its tensors.

    Raises:
        CheckpointError: a one-line message naming the file and what is wrong with it (missing,
            truncated or corrupt, not a ddpm_lib checkpoint, unsafe content, missing keys).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_declared_sizes(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        # The safe unpickler's reason follows a generic preamble about weights_only.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), -1)
        first_line = (lines[marker + 1 :] or lines or [type(e).__name__])[0]
        if re.search("unsupported global", str(e), re.IGNORECASE):  # something to import and run
            problem = "refused to load: the file holds objects other than tensors and plain data"
        else:
            problem = f"unreadable (truncated or corrupt?): {type(e).__name__}: {first_line}"
        raise CheckpointError(f"{path}: {problem}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a ddpm_lib checkpoint (holds a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a complete ddpm_lib checkpoint, missing {missing}")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {state['format']!r}")
    problem = _field_problem(state)
    if problem:
        raise CheckpointError(f"{path}: not a usable ddpm_lib checkpoint: {problem}")
    return state


def _field_problem(state: dict) -> str | None:
    """What is wrong with the fields every reader of a checkpoint relies on, or None."""
    for key, kind in [("model", dict), ("ema", dict), ("model_config", dict), ("config", dict),
                      ("schedule", dict), ("model_name", str)]:  # fmt: skip
        if not isinstance(state[key], kind):
            return f"{key} must be a {kind.__name__}, got {type(state[key]).__name__}"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step must be an integer >= 0, got {step!r}"
    if state["model_name"] not in MODELS:
        return f"model_name must be one of {sorted(MODELS)}, got {state['model_name']!r}"
    data = state["config"].get("data")
    if data not in DATASETS:
        return f"config['data'] must be one of {list(DATASETS)}, got {data!r}"
    if not isinstance(state["ema"].get("shadow"), dict):
        return "ema['shadow'] (the EMA weights) is missing"
    params = state["schedule"].get("params")
    if not isinstance(params, dict):
        return "schedule['params'] must be a dict"
    T = len(params["betas"]) if isinstance(params.get("betas"), list) else params.get("T", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        return f"schedule T must be an integer in [1, {MAX_T}], got {T!r}"
    return None


# A checkpoint is a zip archive: data.pkl (the structure) and one entry per tensor storage. Its
# central directory declares every entry's size, which is what reading it will cost in memory.
# torch.save stores entries uncompressed; a crafted file can deflate 1.5 GB into 1.5 MB.
MAX_STRUCTURE_BYTES = 64 * 2**20  # data.pkl: RNG states, configs and the optimiser's bookkeeping
SPARE_BYTES = 64 * 2**20  # RNG states, step counters, the grad scaler: small next to the weights


def _check_declared_sizes(path: Path) -> None:
    """Refuse, before reading them, archive entries larger than the stored network can need."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip archive: torch.load says what it is
    with archive:
        entries = archive.infolist()
        declared = sum(e.file_size for e in entries)
        if declared > path.stat().st_size + SPARE_BYTES:
            raise CheckpointError(
                f"{path}: refused before reading: the archive declares {declared / 1e6:.0f} MB of "
                f"content in a {path.stat().st_size / 1e6:.1f} MB file (compressed entries, which "
                "torch.save never writes: a crafted or damaged file)"
            )
        structure = next((e for e in entries if e.filename.endswith("/data.pkl")), None)
        if structure is None or structure.file_size > MAX_STRUCTURE_BYTES:
            return  # torch.load refuses it
        try:
            skeleton = _Skeleton(io.BytesIO(archive.read(structure))).load()
            network = build_model_on_meta(skeleton["model_name"], skeleton["model_config"])
        except Exception:
            return  # unusual structure: torch.load and the field checks judge it
        # fp64 at most, for the weights, their EMA copy and Adam's two moments
        needed = 4 * 8 * count_parameters(network, trainable_only=False) + SPARE_BYTES
        tensors = sum(e.file_size for e in entries if "/data/" in e.filename)
        if tensors > needed:
            raise CheckpointError(
                f"{path}: refused before reading: the archive declares {tensors / 1e6:.0f} MB "
                f"of tensors, but its {skeleton['model_name']} network needs at most "
                f"{needed / 1e6:.0f} MB (a crafted or damaged file)"
            )


class _Stub:
    """Stands in for any object the structure names: accepts every call, stores nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _Skeleton(pickle.Unpickler):
    """Reads data.pkl into plain dicts, lists and numbers with every import replaced by a _Stub
    and every tensor by None: nothing named in the file is imported or run."""

    def find_class(self, module: str, name: str) -> type:
        return _Stub

    def persistent_load(self, pid) -> None:
        return None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``ckpt_<step>.pt`` files of a run folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written ``.ckpt_*.tmp`` files that a killed process left behind."""
    folder = Path(folder)
    stale = list(folder.glob(".ckpt_*.pt.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    """``folder/ckpt_<step, 8 digits>.pt``."""
    return Path(folder) / f"ckpt_{step:08d}.pt"


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints of a run folder."""
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def latest_valid_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``folder`` that loads, skipping (with a warning) newer broken ones.

    Returns None when the folder holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none of them loads; we never silently start over.
    """
    candidates = list_checkpoints(folder)
    problems = []
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    if candidates:
        raise CheckpointError(
            f"{folder}: {len(candidates)} checkpoint(s) found but none loads ({problems[0]})"
        )
    return None


def model_from_checkpoint(
    state: dict, *, use_ema: bool = True, path: str | os.PathLike = "checkpoint"
) -> tuple[torch.nn.Module, NoiseSchedule]:
    """Rebuild the network (EMA weights by default) and the schedule a checkpoint describes.

    Args:
        state: a dict returned by ``load_checkpoint``.
        use_ema: load the EMA weights (what samples should use) instead of the raw ones.
        path: the file's name, for error messages.

    Returns:
        ``(model, schedule)``, the model in eval mode on the CPU.
    """
    try:
        build_model_on_meta(state["model_name"], state["model_config"])  # no allocation yet
        model = build_model(state["model_name"], **state["model_config"])
        weights = state["ema"]["shadow"] if use_ema else state["model"]
        model.load_state_dict(weights)
        schedule = NoiseSchedule.from_dict(state["schedule"])
    except Exception as e:  # any field that fails to build: the file is damaged or crafted
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: does not describe a usable network: {first_line}") from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            which = "EMA weight" if use_ema else "weight"
            raise CheckpointError(f"{path}: {which} {name} holds NaN or Inf; the network is broken")
    return model.eval(), schedule
