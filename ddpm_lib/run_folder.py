"""A run folder holds one training run: config.json, metrics.jsonl, checkpoints, samples/.

A new run refuses a folder that holds one unless told to continue it (resume) or delete it
(overwrite); resuming refuses settings that would train another model under the run's name; a
lock keeps a second process out while one trains. Explained in chapter 8 (scaling up).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

from ddpm_lib._io import write_text_atomically
from ddpm_lib.checkpoint import (
    CHECKPOINT_PATTERN,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
)
from ddpm_lib.config import RESUMABLE, TrainConfig, config_changes

RUN_FILES = ("config.json", "metrics.jsonl")
LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked: it holds another run, or another process is
    training in it."""


def run_contents(folder: str | os.PathLike) -> list[Path]:
    """What a training run left in ``folder``: its config, metrics log, checkpoints (with any
    half-written temporaries) and sample grids. Other files are not the run's and stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    found += list_checkpoints(folder) + sorted(folder.glob(".ckpt_*.pt.*.tmp"))
    samples = folder / "samples"
    if samples.is_dir():
        found += sorted(p for p in samples.glob("step_*.png") if p.is_file())
    return found


def describe_run(paths: list[Path]) -> str:
    """``config.json, metrics.jsonl, 2 checkpoints (steps 40 to 60), 3 sample grids``."""
    parts = [p.name for p in paths if p.name in RUN_FILES]
    steps = [int(m.group(1)) for p in paths if (m := CHECKPOINT_PATTERN.match(p.name))]
    if steps:
        parts.append(f"{len(steps)} checkpoint(s) (steps {min(steps)} to {max(steps)})")
    grids = sum(p.parent.name == "samples" for p in paths)
    if grids:
        parts.append(f"{grids} sample grid(s)")
    temporaries = sum(p.name.endswith(".tmp") for p in paths)
    if temporaries:
        parts.append(f"{temporaries} half-written temporary file(s)")
    return ", ".join(parts)


def remove_run(folder: str | os.PathLike) -> list[Path]:
    """Delete what ``run_contents`` lists; returns the paths removed."""
    removed = run_contents(folder)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class RunLock:
    """An exclusive lock on a run folder: ``flock`` on its ``.lock`` file, which holds the
    holder's pid. The kernel releases it when the process ends, however it ends: a killed run
    never leaves a stale lock. (No locking where ``fcntl`` is missing, i.e. on Windows.)

    Args:
        folder: the run folder.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def check_free(self) -> None:
        """Raise ``RunFolderError`` if another process holds the lock; take nothing."""
        if fcntl is None or self._fd is not None or not self.path.is_file():
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._try_lock(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock (creating the folder) or raise ``RunFolderError`` at once."""
        if fcntl is None or self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _try_lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderError(
                f"out: {self.path.parent} is in use by another training (pid {holder}); wait "
                "for it to end or choose another folder"
            ) from None


# What the trainer asks of its run folder ------------------------------------------------------


class RunFolder:
    """The run folder of a ``TrainConfig`` as the trainer uses it: checked when the trainer is
    built, locked while it trains; only the main process (rank 0) writes.

    Args:
        config: the run; its ``out`` is the folder.
        resume: the run will continue (see ``checkpoint_to_resume``).
        overwrite: the run in the folder will be deleted when training starts.
        main: whether this process writes (rank 0); others only read checkpoints.
        say: where to report what was removed or found.
    """

    def __init__(self, config: TrainConfig, *, resume: bool, overwrite: bool, main: bool,
                 say: Callable[[str], None]) -> None:  # fmt: skip
        self.config, self.path, self.main, self.say = config, Path(config.out), main, say
        self.overwrite, self._lock = overwrite, RunLock(self.path)
        if main:
            self._check(resume)

    def _check(self, resume: bool) -> None:
        """Refuse a folder in use by another process, or holding a run we were not told about,
        or (resuming) one trained with other settings: before any work."""
        self._lock.check_free()
        found = run_contents(self.path)
        if found and not (resume or self.overwrite):
            raise RunFolderError(
                f"out: {self.path} already holds a run ({describe_run(found)}); continue it with "
                "--resume (resume=True) or delete it with --overwrite (overwrite=True)"
            )
        saved = self.path / "config.json"
        if resume and saved.is_file():  # the checkpoint's own config is compared on loading
            try:
                values = json.loads(saved.read_text())
            except (ValueError, OSError) as e:
                raise RunFolderError(f"{saved}: not a readable run config ({e})") from None
            if not isinstance(values, dict):
                raise RunFolderError(f"{saved}: not a run config (holds a {type(values).__name__})")
            self._refuse_changes(values, saved)

    def _refuse_changes(self, saved: dict, source: Path) -> None:
        changes = config_changes(saved, self.config)
        if changes:
            listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
            raise RunFolderError(
                f"--resume would change the run in {self.path} ({source.name}): {listed}; only "
                f"{', '.join(sorted(RESUMABLE - {'out'}))} may change on resume. Keep the run's "
                "values, or train into another folder"
            )

    def checkpoint_to_resume(self) -> tuple[Path, dict] | None:
        """The newest valid checkpoint and its state, checked against the config; None (said)
        when there is none. The main process first deletes half-written temporaries."""
        if self.main:
            for stale in remove_stale_temporaries(self.path):
                self.say(f"removed {stale.name}, left by an interrupted checkpoint write")
        found = latest_valid_checkpoint(self.path)
        if found is None:
            self.say(f"no checkpoint in {self.path}: starting from step 0")
            return None
        path, state = found
        self._refuse_changes(state["config"], path)
        if self.config.steps < state["step"]:
            raise ValueError(
                f"steps must be at least the checkpoint's step {state['step']} to resume "
                f"{path}, got {self.config.steps}"
            )
        return found

    @contextmanager
    def locked(self):
        """Hold the folder's lock (main process) while the block runs."""
        if self.main:
            self._lock.acquire()
        try:
            yield self
        finally:
            self._lock.release()

    def start(self) -> None:
        """Empty the folder if asked (``overwrite``), then write the run's ``config.json``."""
        if not self.main:
            return
        if self.overwrite:
            removed = remove_run(self.path)
            if removed:
                self.say(f"overwrite: removed {describe_run(removed)} from {self.path}")
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        write_text_atomically(self.path / "config.json", text)

    @property
    def metrics_log(self) -> Path | None:
        """``metrics.jsonl``, which the main process writes; None elsewhere."""
        return self.path / "metrics.jsonl" if self.main else None

    def sample_grid(self, step: int) -> Path:
        """``samples/step_<step>.png`` (the folder created)."""
        (self.path / "samples").mkdir(parents=True, exist_ok=True)
        return self.path / "samples" / f"step_{step:08d}.png"

    def checkpoint(self, step: int) -> Path | None:
        """The checkpoint file of ``step``; None outside the main process."""
        return checkpoint_path(self.path, step) if self.main else None

    def save(self, state: dict) -> Path:
        """Checkpoint ``state`` (of step ``state["step"]``), keeping the newest
        ``keep_checkpoints``.

        Raises:
            OSError: writing failed; the message says which earlier checkpoint is intact.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = checkpoint_path(self.path, state["step"])
        try:
            save_checkpoint(state, path)
        except OSError as e:
            kept = list_checkpoints(self.path)
            intact = f"{kept[-1]} is intact" if kept else "no earlier checkpoint exists"
            raise OSError(
                e.errno,
                f"step {state['step']}: writing {path} failed "
                f"({getattr(e, 'reason', e.strerror)}); the previous checkpoint {intact}",
            ) from None
        prune_checkpoints(self.path, self.config.keep_checkpoints)
        return path
