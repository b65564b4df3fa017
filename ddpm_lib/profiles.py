"""One notebook, three budgets: the ``DDPM_PROFILE`` switch of the book's chapters.

``smoke`` is for CI (seconds per chapter), ``cpu`` is the budget that produced the committed outputs
(a few minutes per chapter on two cores) and ``gpu`` the real runs. Each chapter has one settings
cell that picks its numbers, e.g. ``P.pick(smoke=50, cpu=3000, gpu=20000)``; models that several
chapters need are trained once and cached (``P.load_or_train``).

Explained in the book's introduction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

try:
    import fcntl
except ImportError:  # Windows: the cache is not locked
    fcntl = None

from ddpm_lib._checks import check_choice
from ddpm_lib._version import __version__
from ddpm_lib.checkpoint import CheckpointError, latest_valid_checkpoint, model_from_checkpoint
from ddpm_lib.config import TrainConfig, default_config
from ddpm_lib.hardware import pick_device
from ddpm_lib.paths import cache_root
from ddpm_lib.schedule import NoiseSchedule
from ddpm_lib.training import Trainer

__all__ = [
    "PROFILES",
    "Profile",
    "cache_root",
    "conditional_digits_run",
    "default_profile",
    "digits_run",
    "profile",
]

PROFILES = ("smoke", "cpu", "gpu")
T = TypeVar("T")


def default_profile() -> str:
    """``$DDPM_PROFILE`` if set, else ``gpu`` where CUDA is available, else ``cpu``."""
    name = os.environ.get("DDPM_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    return check_choice("DDPM_PROFILE", name, PROFILES)


@dataclass(frozen=True)
class Profile:
    """The budget a chapter runs with.

    Args:
        name: "smoke", "cpu" or "gpu".
    """

    name: str

    def __post_init__(self) -> None:
        check_choice("profile", self.name, PROFILES)

    @property
    def device(self) -> torch.device:
        return pick_device("cuda" if self.name == "gpu" and torch.cuda.is_available() else "cpu")

    def pick(self, *, smoke: T, cpu: T, gpu: T) -> T:
        """The value for this profile: ``P.pick(smoke=50, cpu=3000, gpu=20000)``."""
        return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[self.name]

    def describe(self) -> str:
        return f"profile {self.name} | device {self.device} | ddpm_lib {__version__}"

    def run_folder(self, name: str) -> Path:
        return cache_root() / "runs" / self.name / name

    def load_or_train(
        self, name: str, config: TrainConfig, *, progress: bool = True, log=print
    ) -> tuple[torch.nn.Module, NoiseSchedule, dict]:
        """Train ``config`` once and cache it under ``name``; later calls load the EMA network.

        A cached run is reused only if it was trained with the same config (all but ``out``)
        and reached ``config.steps``; a shorter one with the same config is resumed, and one with
        another config (or with no checkpoint that loads) is deleted and trained afresh. Processes
        that ask for the same run at once (chapters run in parallel) take turns: one trains it,
        the others wait and then load it.

        Args:
            name: a name for the run, unique within the book (e.g. "digits_unet").
            config: the training run; its ``out`` is replaced by the cache folder.
            progress: show the trainer's progress bar.
            log: where the trainer prints its messages.

        Returns:
            ``(model, schedule, state)``: the EMA network in eval mode on this profile's device,
            its schedule, and the checkpoint dict (config, step, ...).
        """
        folder = self.run_folder(name)
        with _one_at_a_time(folder.with_name(f".{name}.lock")):
            return self._load_or_train(folder, name, config, progress=progress, log=log)

    def _load_or_train(self, folder, name, config, *, progress, log):
        config = TrainConfig.from_dict({**config.to_dict(), "out": str(folder)})
        wanted = {k: v for k, v in config.to_dict().items() if k != "out"}
        try:
            found = latest_valid_checkpoint(folder)
        except CheckpointError:  # checkpoints, none of which loads: start over
            found = None
        fresh = True  # no checkpoint, or one of another config: delete what is there, train anew
        if found is not None:
            path, state = found
            # Options added to TrainConfig after the run was saved take their defaults, which
            # is how that run was trained: a new option must not retrain every cached model.
            defaults = TrainConfig().to_dict()
            saved = {k: v for k, v in {**defaults, **state["config"]}.items() if k != "out"}
            if saved == wanted and state["step"] >= config.steps:
                log(f"loaded the cached run {name!r} (step {state['step']}) from {path}")
                model, schedule = model_from_checkpoint(state, path=path)
                return model.to(self.device), schedule.to(self.device), state
            fresh = saved != wanted  # the same run, unfinished: resume it
        trainer = Trainer(config, resume=not fresh, overwrite=fresh, progress=progress, log=log)
        trainer.train()
        state = trainer.state_dict()
        model, schedule = model_from_checkpoint(state, path=folder)
        return model.to(self.device), schedule.to(self.device), state


@contextmanager
def _one_at_a_time(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created), waiting for any other holder; the
    kernel releases it when the holder ends, however it ends. A no-op where ``fcntl`` is missing."""
    if fcntl is None:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def profile(name: str | None = None) -> Profile:
    """The profile named, or ``default_profile()``."""
    return Profile(name or default_profile())


def digits_run(p: Profile) -> tuple[str, TrainConfig]:
    """The digits U-Net that chapters 5 and 6 share: ``P.load_or_train(*digits_run(P))``.

    The cpu budget trains it in about 4 to 5 minutes on two cores; ``ddpm train --data digits``
    (6000 steps) is the longer run the README reports.
    """
    steps = p.pick(smoke=200, cpu=4000, gpu=20000)
    config = default_config("digits", steps=steps, checkpoint_every=1000, log_every=50)
    return "digits_unet", config


def conditional_digits_run(p: Profile) -> tuple[str, TrainConfig]:
    """Chapter 9's class-conditional digits U-Net: the recipe of ``digits_run`` with labels, one
    in ten dropped (``class_dropout=0.1``) so that it also learns the unconditional case. The cpu
    budget is ``ddpm train --data digits --conditional``'s 6000 steps, about 10 minutes."""
    steps = p.pick(smoke=200, cpu=6000, gpu=20000)
    config = default_config(
        "digits", steps=steps, class_dropout=0.1, checkpoint_every=1000, log_every=50
    )
    return "digits_unet_conditional", config
