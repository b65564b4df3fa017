"""Checkpoints that are written atomically and loaded without running code from the file.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with ``torch.save``
and read back with ``torch.load(weights_only=True)``, which refuses any pickle that would import or
call something. It is first written to a temporary file in the same folder, flushed and fsynced,
then renamed over the target with ``os.replace``: a crash or a full disk leaves the previous file
intact.

Explained in chapter 8 (scaling up).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from ddpm_lib.models import build_model
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


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, os.replace).

    Args:
        state: a dict of tensors, numbers, strings, lists and dicts.
        path: the target file; its folder must exist.

    Raises:
        OSError: when writing fails; the previous file at ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
            raise OSError(
                e.errno, f"writing {path} failed ({reason}); the previous file is untouched"
            ) from e
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
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
    return state


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
        model = build_model(state["model_name"], **state["model_config"])
        weights = state["ema"]["shadow"] if use_ema else state["model"]
        model.load_state_dict(weights)
        schedule = NoiseSchedule.from_dict(state["schedule"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: does not describe a usable network: {first_line}") from None
    return model.eval(), schedule
