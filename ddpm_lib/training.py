"""The trainer: Algorithm 1 in a loop, fast on a GPU and still useful on two CPU cores.

One ``TrainConfig`` describes a run and is saved with it. ``Trainer`` builds the data, the network,
the schedule, AdamW with warm-up, the EMA copy, mixed precision where it pays, and writes a JSONL
log, sample grids and atomic checkpoints into the run folder. Under ``torchrun`` it trains with
DistributedDataParallel; rank 0 alone writes.

Explained in chapter 5 (training) and chapter 8 (scaling up).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ddpm_lib import __version__
from ddpm_lib._checks import check_choice, check_int, check_real
from ddpm_lib.checkpoint import (
    FORMAT,
    CheckpointError,
    RunFolderError,
    RunLock,
    build_model_on_meta,
    checkpoint_path,
    describe_run,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_run,
    remove_stale_temporaries,
    run_contents,
    save_checkpoint,
    write_atomically,
)
from ddpm_lib.data import DATASETS, dataset_info, load_dataset
from ddpm_lib.diffusion import diffusion_loss
from ddpm_lib.ema import EMA
from ddpm_lib.models import DIGITS_UNET, build_model, count_parameters
from ddpm_lib.samplers import sample
from ddpm_lib.schedule import SCHEDULE_KINDS, NoiseSchedule

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SWITCHES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` and in every checkpoint."""

    # data
    data: str = "digits"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    n_data: int | None = None
    # network ("auto": a U-Net for images, an MLP for 2-D points) and its constructor overrides
    model: str = "auto"
    model_config: dict = field(default_factory=dict)
    # diffusion
    schedule: str = "linear"
    T: int = 1000
    # optimisation
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # hardware
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    num_workers: int = 0
    seed: int = 0
    # output
    out: str = "runs/digits"
    log_every: int = 50
    sample_every: int = 0
    sample_n: int = 64
    sample_steps: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_minutes: float = 0.0

    def validate(self) -> TrainConfig:
        """Check every option before any work; the message names the option and its range."""
        check_choice("data", self.data, DATASETS)
        check_choice("model", self.model, ("auto", "unet", "mlp"))
        check_choice("schedule", self.schedule, SCHEDULE_KINDS)
        check_choice("device", self.device, DEVICES)
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("channels_last", self.channels_last, SWITCHES)
        if not isinstance(self.model_config, dict):
            raise TypeError(f"model_config must be a dict, got {type(self.model_config).__name__}")
        check_int("T", self.T, low=1)
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_real("lr", self.lr, low=0, low_open=True)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_real("weight_decay", self.weight_decay, low=0)
        check_real("grad_clip", self.grad_clip, low=0)
        check_real("ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        check_int("num_workers", self.num_workers, low=0)
        check_int("seed", self.seed, low=0)
        check_int("log_every", self.log_every, low=1)
        check_int("sample_every", self.sample_every, low=0)
        check_int("sample_n", self.sample_n, low=1)
        check_int("sample_steps", self.sample_steps, low=1)
        if self.sample_steps > self.T:
            raise ValueError(
                f"sample_steps must be an integer in [1, T={self.T}] (the DDIM steps of the "
                f"sample grids), got {self.sample_steps}"
            )
        check_int("checkpoint_every", self.checkpoint_every, low=0)
        check_int("keep_checkpoints", self.keep_checkpoints, low=1)
        check_real("max_minutes", self.max_minutes, low=0)
        if self.image_size is not None:
            check_int("image_size", self.image_size, low=1)
        if self.n_data is not None:
            check_int("n_data", self.n_data, low=1)
        if self.data == "folder" and not self.data_root:
            raise ValueError(
                "data_root must name the image folder for data='folder' (--data-root on the "
                "command line)"
            )
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out must be a folder, but {self.out} is a file")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config options {unknown}; known: {sorted(known)}")
        return cls(**values)


# Per data set: what a good run looks like on the hardware that usually trains it. The digits
# numbers fit the 10-minute budget on two CPU cores; the torchvision sets are GPU runs.
_TOY_RUN = dict(steps=3000, batch_size=1024, lr=2e-3, ema_decay=0.995, warmup_steps=100)
_GREY_32_RUN = dict(  # MNIST-class data, resized 28 -> 32 so that three levels halve evenly
    batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9995, image_size=32,
    checkpoint_every=2000, sample_every=2000,
    model_config=dict(base_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(8,),
                      num_res_blocks=2, dropout=0.1),
)  # fmt: skip
_LONG_RUN = dict(lr=2e-4, checkpoint_every=5000, sample_every=5000)  # GPU runs of a day or more


def _unet(base_channels: int, channel_mult: tuple[int, ...]) -> dict:
    """A U-Net for larger images: attention at 16x16, two residual blocks per level, dropout."""
    return dict(base_channels=base_channels, channel_mult=channel_mult,
                attention_resolutions=(16,), num_res_blocks=2, dropout=0.1)  # fmt: skip


DATASET_DEFAULTS: dict[str, dict] = {
    "digits": dict(steps=6000, batch_size=128, lr=2e-3, ema_decay=0.999, model_config=DIGITS_UNET),
    "moons": _TOY_RUN,
    "swiss_roll": _TOY_RUN,
    "ring": _TOY_RUN,
    "mnist": dict(_GREY_32_RUN, steps=20000),
    "fashion_mnist": dict(_GREY_32_RUN, steps=30000),
    "cifar10": dict(
        _LONG_RUN, steps=200000, batch_size=128, warmup_steps=5000, ema_decay=0.9999,
        model_config=_unet(128, (1, 2, 2, 2)),
    ),
    "folder": dict(
        _LONG_RUN, steps=50000, batch_size=64, warmup_steps=2000, ema_decay=0.9995,
        model_config=_unet(64, (1, 2, 2, 4)),
    ),
}  # fmt: skip


def default_config(data: str = "digits", **overrides) -> TrainConfig:
    """The defaults for ``data`` with ``overrides`` on top (``model_config`` is merged key by key).

    Args:
        data: a data set name (see ``ddpm_lib.data.DATASETS``).
        **overrides: any ``TrainConfig`` field.
    """
    check_choice("data", data, DATASETS)
    values = {**DATASET_DEFAULTS.get(data, {}), "data": data, "out": f"runs/{data}"}
    model_config = {**values.get("model_config", {}), **overrides.pop("model_config", {})}
    values.update(overrides)
    values["model_config"] = model_config
    T = values.get("T", TrainConfig.T)
    if "sample_steps" not in overrides and isinstance(T, int) and 1 <= T < TrainConfig.sample_steps:
        values["sample_steps"] = T  # a chain shorter than the default grid: sample every step
    return TrainConfig.from_dict(values)


# What --resume may change: how long, how often to log, sample and checkpoint, and on which
# hardware. Everything else defines the run (the data, the network, the schedule, the optimiser,
# the seed): changing it would silently train another model under the old run's name.
RESUMABLE = frozenset({
    "steps", "log_every", "sample_every", "sample_n", "sample_steps", "checkpoint_every",
    "keep_checkpoints", "max_minutes", "device", "num_workers", "compile", "channels_last",
    "download", "out",
})  # fmt: skip


def _as_json(value):
    """``value`` as JSON sees it: tuples become lists, so (1, 2) from Python equals [1, 2] read
    back from config.json."""
    return json.loads(json.dumps(value, sort_keys=True))


def _normalised(config: dict) -> dict:
    """A config as JSON sees it, with defaults for fields it lacks."""
    return _as_json({**TrainConfig().to_dict(), **config})


def config_changes(saved: dict, config: TrainConfig) -> list[tuple[str, object, object]]:
    """The (field, saved value, new value) that resuming a run saved with ``saved`` as
    ``config`` would change and must not (see ``RESUMABLE``)."""
    old, new = _normalised(saved), _normalised(config.to_dict())
    changes = [(k, old.get(k), v) for k, v in new.items() if k not in RESUMABLE and old.get(k) != v]
    # The torchvision sets are found by name, so their folder may move; an image folder is the data.
    return [c for c in changes if c[0] != "data_root" or config.data == "folder"]


# Hardware ------------------------------------------------------------------------------------


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda if present, then Apple's mps, then cpu; or the one asked for."""
    check_choice("device", name, DEVICES)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"device='cuda' for local rank {local_rank}, but torch sees only "
                f"{torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", local_rank)
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device='mps' was asked for, but torch sees no Apple GPU (MPS)")
    return torch.device(name)


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``; None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:  # Linux: MemAvailable counts reclaimable caches
                kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
            return kib * 1024
        except (OSError, StopIteration, ValueError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def pick_amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a grad scaler); on CPU only if asked."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


# Data order ----------------------------------------------------------------------------------


class BatchOrder:
    """Which examples step k trains on: a fresh permutation per epoch, a pure function of (seed, k).

    Being a function of the step (not of an iterator's history) is what makes resuming exact.
    Under DDP each rank takes every world_size-th index of the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = max(1, n // batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        batch = self._perm[k * self.batch_size : (k + 1) * self.batch_size]
        return batch[self.rank :: self.world_size]


class _StepSampler(torch.utils.data.Sampler):
    """Feeds a DataLoader the batches of steps start, start + 1, ..., stop - 1."""

    def __init__(self, order: BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.order.indices(step).tolist()

    def __len__(self) -> int:
        return self.stop - self.start


# Distributed ---------------------------------------------------------------------------------


def distributed_context() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step; a checkpoint of that step was written.

    Attributes:
        signal_number: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        checkpoint: the checkpoint written, or None (a process other than rank 0).
    """

    def __init__(self, message: str, signal_number: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signal_number, self.checkpoint = signal_number, checkpoint


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what Colab, Slurm and Kubernetes send


class Trainer:
    """Trains a noise predictor with Algorithm 1 according to a ``TrainConfig``.

    Explained in chapter 5.

    A run folder holds one run. A new run refuses a folder that holds one unless ``resume``
    (continue it, with the same settings but for those in ``RESUMABLE``) or ``overwrite``
    (delete it first); while ``train()`` runs, the folder is locked against other processes.

    Args:
        config: the run's settings (validated here, before any work).
        resume: continue from the newest valid checkpoint in ``config.out``, if there is one.
        overwrite: delete the run that ``config.out`` holds (its config, log, checkpoints and
            sample grids) when training starts.
        progress: show a tqdm bar.
        log: where to print one-line messages (rank 0 only); None for silence.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log=print,
    ) -> None:
        self.config = config.validate()
        self.rank, self.local_rank, self.world_size = distributed_context()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self._log = log if self.is_main else None
        if self.world_size > 1 and config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size must be divisible by the number of processes ({self.world_size}), "
                f"got {config.batch_size}"
            )
        if resume and overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: continue the run or delete it"
            )
        self.out, self.overwrite = Path(config.out), overwrite
        self._lock = RunLock(self.out)
        if self.is_main:
            self._check_run_folder(resume)
        self.device = pick_device(config.device, self.local_rank)
        info = dataset_info(config.data)
        self.model_name = (
            config.model if config.model != "auto" else ("mlp" if info["kind"] == "2d" else "unet")
        )
        self.model_config = self._model_config(info)
        self._check_memory()
        # Seeded before the network is built: the initial weights are a function of the seed.
        self._seed_everything(config.seed + self.rank)
        # Build the network on the CPU first: a bad image size fails here, before any data loads.
        with self._allocation_errors():
            model = build_model(self.model_name, **self.model_config)

        if self.world_size > 1 and not dist.is_initialized():
            backend = (
                "nccl"
                if config.device in ("auto", "cuda") and torch.cuda.is_available()
                else "gloo"
            )
            dist.init_process_group(backend)
        self.amp_dtype = pick_amp_dtype(config.amp, self.device)

        self.dataset = load_dataset(
            config.data,
            root=config.data_root,
            split="train",
            download=config.download,
            image_size=config.image_size,
            n=config.n_data,
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.order = BatchOrder(
            len(self.dataset), config.batch_size, config.seed, self.rank, self.world_size
        )
        self.schedule = getattr(NoiseSchedule, config.schedule)(T=config.T).to(self.device)

        self.channels_last = info["kind"] == "image" and (
            config.channels_last == "on"
            or (config.channels_last == "auto" and self.device.type == "cuda")
        )
        with self._allocation_errors():
            model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the bare network: its state is what checkpoints hold
        self.ema = EMA(model, config.ema_decay)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused
        )
        warmup = config.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        # fp16 needs loss scaling to keep small gradients from underflowing; bf16 does not.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.noise_generator = torch.Generator(self.device).manual_seed(
            config.seed * 7919 + 1 + self.rank
        )
        self.step = 0
        self.resumed_from: Path | None = None
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        if resume:
            self._resume()

        net = model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        if config.compile:
            net = torch.compile(net)
        self.net = net  # what the training step calls

    # Setup helpers ---------------------------------------------------------------------------

    def _check_run_folder(self, resume: bool) -> None:
        """Refuse a folder in use by another process, or holding a run we were not told about,
        or (resuming) one trained with other settings: before any work."""
        self._lock.check_free()
        found = run_contents(self.out)
        if found and not (resume or self.overwrite):
            raise RunFolderError(
                f"out: {self.out} already holds a run ({describe_run(found)}); continue it with "
                "--resume (resume=True) or delete it with --overwrite (overwrite=True)"
            )
        saved = self.out / "config.json"
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
                f"--resume would change the run in {self.out} ({source.name}): {listed}; only "
                f"{', '.join(sorted(RESUMABLE - {'out'}))} may change on resume. Keep the run's "
                "values, or train into another folder"
            )

    def _check_memory(self) -> None:
        """Refuse a network that cannot fit, before allocating it (the parameters counted on
        the meta device): weights, gradients, Adam's two moments and the EMA copy, 4 bytes each."""
        network = build_model_on_meta(self.model_name, self.model_config)
        n = count_parameters(network, trainable_only=False)
        needed, free = 5 * 4 * n, free_memory(self.device)
        if free is not None and needed > free:
            raise ValueError(
                f"model_config: the {self.model_name} network has {n:,} parameters, which need "
                f"about {needed / 1e9:.1f} GB to train (weights, gradients, Adam state and the "
                f"EMA copy), more than the {free / 1e9:.1f} GB free on {self.device}; choose a "
                "smaller network"
            )

    @contextmanager
    def _allocation_errors(self):
        """The allocator's refusal (which the estimate can miss: memory taken by others) as the
        same one-line error."""
        try:
            yield
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and (
                "can't allocate memory" not in str(e)
            ):
                raise
            raise ValueError(
                f"model_config: the {self.model_name} network does not fit in the free memory "
                f"of {self.device} ({str(e).splitlines()[0][:200]}); choose a smaller network"
            ) from None

    def _model_config(self, info: dict) -> dict:
        cfg = dict(self.config.model_config)
        if self.model_name == "unet":
            if info["kind"] != "image":
                raise ValueError(f"model 'unet' needs image data, but {self.config.data!r} is 2-D")
            cfg["in_channels"] = info["channels"]
            cfg["image_size"] = self.config.image_size or info["image_size"]
        else:
            if info["kind"] != "2d":
                raise ValueError(f"model 'mlp' needs 2-D data, but {self.config.data!r} is images")
            cfg["dim"] = info["dim"]
        return cfg

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 (user code may use the global RNG)
        torch.manual_seed(seed)

    def say(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    # Checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the next step depends on, as plain data a safe loader can read."""
        rng = {
            "python": _python_rng_state(),
            "numpy": _numpy_rng_state(),
            "torch": torch.get_rng_state(),
            "noise": self.noise_generator.get_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": FORMAT,
            "version": __version__,
            "step": self.step,
            "model_name": self.model_name,
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.to_dict(),
            "config": self.config.to_dict(),
            "rng": rng,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        same_config = _as_json(state["model_config"]) == _as_json(self.model_config)
        if state["model_name"] != self.model_name or not same_config:
            raise CheckpointError(
                f"checkpoint network {state['model_name']} {state['model_config']} differs from "
                f"the configured {self.model_name} {self.model_config}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"]:  # empty from a run without fp16 (e.g. resumed on another device)
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if state.get("world_size", 1) == self.world_size:
            random.setstate(_to_python_rng_state(rng["python"]))
            np.random.set_state(_to_numpy_rng_state(rng["numpy"]))  # noqa: NPY002
            torch.set_rng_state(rng["torch"].cpu())
            self.noise_generator.set_state(rng["noise"].cpu())
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def _resume(self) -> None:
        if self.is_main:
            for stale in remove_stale_temporaries(self.out):
                self.say(f"removed {stale.name}, left by an interrupted checkpoint write")
        found = latest_valid_checkpoint(self.out)
        if found is None:
            self.say(f"no checkpoint in {self.out}: starting from step 0")
            return
        path, state = found
        self._refuse_changes(state["config"], path)
        if self.config.steps < state["step"]:
            raise ValueError(
                f"steps must be at least the checkpoint's step {state['step']} to resume "
                f"{path}, got {self.config.steps}"
            )
        self.load_state_dict(state)
        self.resumed_from, self._saved_step = path, self.step
        self.say(f"resuming from {path} at step {self.step}")

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes), keeping the newest ``keep_checkpoints``."""
        path = None
        if self.is_main:
            self._check_finite_weights()
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                path = save_checkpoint(self.state_dict(), checkpoint_path(self.out, self.step))
            except OSError as e:
                kept = list_checkpoints(self.out)
                intact = f"{kept[-1]} is intact" if kept else "no earlier checkpoint exists"
                raise OSError(
                    e.errno,
                    f"step {self.step}: writing {checkpoint_path(self.out, self.step)} failed "
                    f"({getattr(e, 'reason', e.strerror)}); the previous checkpoint {intact}",
                ) from None
            prune_checkpoints(self.out, self.config.keep_checkpoints)
        if self.world_size > 1:
            dist.barrier()
        self._saved_step = self.step
        return path

    def _check_finite_weights(self) -> None:
        for name, p in self.model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteLossError(
                    f"step {self.step}: weight {name} holds NaN or Inf; no checkpoint was written"
                )

    # Training --------------------------------------------------------------------------------

    def _batches(self):
        """Yield the training batch x0 of each remaining step, on the device."""
        stop = self.config.steps
        if isinstance(self.dataset, TensorDataset):  # in memory: index directly, no loader
            data = self.dataset.tensors[0].to(self.device)
            for step in range(self.step, stop):
                yield data[self.order.indices(step).to(self.device)]
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=_StepSampler(self.order, self.step, stop),
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: creating the iterator draws a seed, and a draw from the global
            # RNG would shift every later dropout mask of a resumed run.
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        try:
            for x, _ in loader:
                yield x.to(self.device, non_blocking=True)
        except Exception as e:
            if "DataLoader worker" not in str(e):
                raise
            raise _one_line(e) from None

    def _open_metrics_log(self):
        """metrics.jsonl for appending, without lines beyond the current step (a killed run's).

        A torn last line (a write cut short by a full disk or a kill) is dropped; the file is
        rewritten atomically, like the checkpoints.
        """
        path = self.out / "metrics.jsonl"
        if path.is_file():
            lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as e:
                    if number < len(lines):
                        raise ValueError(
                            f"{path}, line {number}: not a JSON record ({e}); delete the line "
                            "to resume"
                        ) from None
                    self.say(f"dropped the torn last line of {path} (a write cut short)")
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= self.step:
                    kept.append(line + "\n")
            write_atomically(path, lambda f: f.write("".join(kept).encode()))
        return path.open("a")

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x0: torch.Tensor) -> float:
        """One optimisation step of Algorithm 1; returns the loss."""
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            loss = diffusion_loss(self.net, self.schedule, x0, generator=self.noise_generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # The step's one device sync: the loss for the log and both NaN guards, before any update.
        value, norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
        if not math.isfinite(value):
            raise NonFiniteLossError(self._non_finite_message("loss", value))
        if not math.isfinite(norm) and not self.scaler.is_enabled():
            # With fp16 an overflow is expected now and then: the scaler skips that step.
            raise NonFiniteLossError(self._non_finite_message("gradient norm", norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return value

    def _non_finite_message(self, what: str, value: float) -> str:
        causes = [f"a learning rate too high (lr={self.config.lr}; try a smaller one or more "
                  "warm-up)"]  # fmt: skip
        if self.amp_dtype == torch.float16:
            causes.append("fp16 overflow (try amp bf16 or off)")
        causes.append("data outside [-1, 1]")
        # self.step counts finished steps; the log numbers the one that failed self.step + 1.
        return (
            f"step {self.step + 1}: the {what} is {value}; training stopped and no checkpoint "
            f"was written. Likely causes: {', '.join(causes)}."
        )

    def train(self) -> dict:
        """Run until ``config.steps`` (or ``max_minutes``); returns a summary of the run.

        The run folder is locked while it runs. SIGINT (Ctrl-C) and SIGTERM (what Colab, Slurm
        and Kubernetes send) stop it after the step under way, with a checkpoint of that step; a
        second signal during that checkpoint waits for it.

        Raises:
            TrainingInterrupted: after such a stop; it names the checkpoint.
            RunFolderError: another process is training in the same folder.
            NonFiniteLossError: the loss or a gradient became NaN or infinite.
            OSError: a checkpoint or the log could not be written (the message says what is intact).
        """
        if self.is_main:
            self._lock.acquire()
        try:
            with self._stop_signals():
                return self._train()
        finally:
            self._lock.release()

    def _train(self) -> dict:
        cfg = self.config
        if self.is_main:
            if self.overwrite:
                removed = remove_run(self.out)
                if removed:
                    self.say(f"overwrite: removed {describe_run(removed)} from {self.out}")
            config_text = json.dumps(cfg.to_dict(), indent=2) + "\n"
            write_atomically(self.out / "config.json", lambda f: f.write(config_text.encode()))
        self.say(
            f"training {self.model_name} ({count_parameters(self.model) / 1e6:.2f} M parameters) "
            f"on {cfg.data} ({len(self.dataset)} examples), device {self.device}, "
            f"amp {self.amp_dtype or 'off'}, {self.world_size} process(es), "
            f"steps {self.step} -> {cfg.steps}"
        )
        start_step, started = self.step, time.perf_counter()
        window_loss, window_start, window_steps = 0.0, started, 0
        images_per_step = min(cfg.batch_size, len(self.dataset))  # a small set is one whole batch
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="training")
        log_file = self._open_metrics_log() if self.is_main else None
        last_loss = None
        try:
            for x0 in self._batches():
                if self._stop_requested():  # checked between steps: each step is whole
                    break
                window_loss += self.train_step(x0)
                window_steps += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    images_per_sec = window_steps * images_per_step / (now - window_start)
                    last_loss = window_loss / window_steps
                    record = {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "images_per_sec": round(images_per_sec, 1),
                        "elapsed_sec": round(now - started, 2),
                    }
                    if log_file:
                        self._append(log_file, record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_sec:.0f}")
                    window_loss, window_start, window_steps = 0.0, now, 0
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
                    self.say(f"time limit of {cfg.max_minutes} minutes reached at step {self.step}")
                    break
        finally:
            bar.close()
            if log_file:
                log_file.close()
        elapsed = time.perf_counter() - started
        if self._saved_step != self.step:
            final = self.save()
        else:  # the step's checkpoint is on disk already
            final = checkpoint_path(self.out, self.step) if self.is_main else None
        if self._stop_signal is not None:
            name = signal.Signals(self._stop_signal).name
            raise TrainingInterrupted(
                f"stopped by {name} after step {self.step}; checkpoint {final} (continue with "
                "--resume)",
                self._stop_signal,
                final,
            )
        grid = self.save_samples()
        self.say(f"done: step {self.step}, {elapsed:.1f} s, checkpoint {final}, samples {grid}")
        return {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "seconds": elapsed,
            "last_logged_loss": last_loss,  # None when no step was logged
            "checkpoint": str(final) if final else None,
            "samples": str(grid) if grid else None,
        }

    def _append(self, log_file, record: dict) -> None:
        try:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        except OSError as e:
            raise OSError(
                e.errno,
                f"step {self.step}: writing {self.out / 'metrics.jsonl'} failed ({e.strerror}); "
                "the checkpoints are intact and --resume drops a torn line",
            ) from None

    @contextmanager
    def _stop_signals(self):
        """While training, SIGINT and SIGTERM only ask for a stop; ``_train`` honours it between
        steps. (Signal handlers can be set from the main thread only.)"""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signal_number, frame):
            if self._stop_signal is None:
                self._stop_signal = signal_number

        previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived; under DDP, at any process (they all stop together)."""
        if self.world_size == 1:
            return self._stop_signal is not None
        on_gpu = dist.get_backend() == "nccl"
        flag = torch.tensor([self._stop_signal or 0], device=self.device if on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_signal = int(flag.item()) or None
        return self._stop_signal is not None

    def save_samples(self) -> Path | None:
        """Sample the EMA network with DDIM and save a grid (images) or a scatter plot (2-D)."""
        if not self.is_main:
            return None
        cfg = self.config
        shape = (cfg.sample_n, *self.dataset[0][0].shape)
        x = sample(
            self.ema.shadow,
            self.schedule,
            shape,
            sampler="ddim",
            steps=cfg.sample_steps,
            generator=torch.Generator(self.device).manual_seed(cfg.seed),
            device=self.device,
            progress=False,
        )
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:08d}.png"
        save_sample_figure(x.float().cpu(), path)
        return path


def _one_line(error: Exception) -> Exception:
    """A DataLoader worker's error reduced to its cause: torch appends the worker's traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    cause = re.sub(r"^[\w.]+: ", "", lines[-1]) if lines else type(error).__name__
    try:
        return type(error)(cause)
    except Exception:
        return RuntimeError(cause)


FIGURE_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".gif", ".pdf")


def save_sample_figure(x: torch.Tensor, path: Path) -> None:
    """A grid of images, or a scatter plot of 2-D points, written to ``path`` (its extension,
    one of ``FIGURE_FORMATS``, picks the format)."""
    if x.ndim == 4:
        from torchvision.utils import save_image

        nrow = max(1, int(math.sqrt(x.shape[0])))
        save_image((x + 1) / 2, path, nrow=nrow, padding=1)  # [-1, 1] -> [0, 1]
        return
    # A bare Figure with its own Agg canvas: no pyplot, so a notebook's inline backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6)
    ax.set_aspect("equal")
    fig.savefig(path, bbox_inches="tight")


# RNG states as plain lists, so that checkpoints load with weights_only=True ------------------


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _to_python_rng_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _to_numpy_rng_state(state: list) -> tuple:
    return (state[0], np.array(state[1], dtype=np.uint32), state[2], state[3], state[4])
