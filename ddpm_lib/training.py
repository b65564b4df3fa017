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
import time
from contextlib import nullcontext
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
    checkpoint_path,
    latest_valid_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
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
        check_int("sample_steps", self.sample_steps, low=1, high=self.T)
        check_int("checkpoint_every", self.checkpoint_every, low=0)
        check_int("keep_checkpoints", self.keep_checkpoints, low=1)
        check_real("max_minutes", self.max_minutes, low=0)
        if self.image_size is not None:
            check_int("image_size", self.image_size, low=1)
        if self.n_data is not None:
            check_int("n_data", self.n_data, low=1)
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
    return TrainConfig.from_dict(values)


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
        return torch.device("cuda", local_rank)
    return torch.device(name)


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


class Trainer:
    """Trains a noise predictor with Algorithm 1 according to a ``TrainConfig``.

    Explained in chapter 5.

    Args:
        config: the run's settings (validated here, before any work).
        resume: continue from the newest valid checkpoint in ``config.out``, if there is one.
        progress: show a tqdm bar.
        log: where to print one-line messages (rank 0 only); None for silence.
    """

    def __init__(
        self, config: TrainConfig, *, resume: bool = False, progress: bool = True, log=print
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
        self.out = Path(config.out)
        info = dataset_info(config.data)
        self.model_name = (
            config.model if config.model != "auto" else ("mlp" if info["kind"] == "2d" else "unet")
        )
        self.model_config = self._model_config(info)
        # Seeded before the network is built: the initial weights are a function of the seed.
        self._seed_everything(config.seed + self.rank)
        # Build the network on the CPU first: a bad image size fails here, before any data loads.
        model = build_model(self.model_name, **self.model_config)

        if self.world_size > 1 and not dist.is_initialized():
            backend = (
                "nccl"
                if config.device in ("auto", "cuda") and torch.cuda.is_available()
                else "gloo"
            )
            dist.init_process_group(backend)
        self.device = pick_device(config.device, self.local_rank)
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
        if state["model_name"] != self.model_name or state["model_config"] != self.model_config:
            raise CheckpointError(
                f"checkpoint network {state['model_name']} {state['model_config']} differs from "
                f"the configured {self.model_name} {self.model_config}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
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
        self.load_state_dict(state)
        self.resumed_from = path
        self.say(f"resuming from {path} at step {self.step}")

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes), keeping the newest ``keep_checkpoints``."""
        path = None
        if self.is_main:
            self._check_finite_weights()
            path = save_checkpoint(self.state_dict(), checkpoint_path(self.out, self.step))
            prune_checkpoints(self.out, self.config.keep_checkpoints)
        if self.world_size > 1:
            dist.barrier()
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
        )
        for x, _ in loader:
            yield x.to(self.device, non_blocking=True)

    def _open_metrics_log(self):
        """metrics.jsonl for appending, without lines beyond the current step (a killed run's)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step
            ]
            path.write_text("".join(line + "\n" for line in kept))
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
        return (
            f"step {self.step}: the {what} is {value}; training stopped and no checkpoint was "
            f"written. Likely causes: a learning rate too high (lr={self.config.lr}; try a "
            f"smaller one or more warm-up), fp16 overflow (amp={self.config.amp}; try bf16 or "
            "off), or data outside [-1, 1]."
        )

    def train(self) -> dict:
        """Run until ``config.steps`` (or ``max_minutes``); returns a summary of the run."""
        cfg = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.say(
            f"training {self.model_name} ({count_parameters(self.model) / 1e6:.2f} M parameters) "
            f"on {cfg.data} ({len(self.dataset)} examples), device {self.device}, "
            f"amp {self.amp_dtype or 'off'}, {self.world_size} process(es), "
            f"steps {self.step} -> {cfg.steps}"
        )
        start_step, started = self.step, time.perf_counter()
        window_loss, window_start, window_steps = 0.0, started, 0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="training")
        log_file = self._open_metrics_log() if self.is_main else None
        last_loss = float("nan")
        try:
            for x0 in self._batches():
                window_loss += self.train_step(x0)
                window_steps += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    images_per_sec = window_steps * cfg.batch_size / (now - window_start)
                    last_loss = window_loss / window_steps
                    record = {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "images_per_sec": round(images_per_sec, 1),
                        "elapsed_sec": round(now - started, 2),
                    }
                    if log_file:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
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
        final = self.save()
        grid = self.save_samples()
        self.say(f"done: step {self.step}, {elapsed:.1f} s, checkpoint {final}, samples {grid}")
        return {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "seconds": elapsed,
            "last_logged_loss": last_loss,
            "checkpoint": str(final) if final else None,
            "samples": str(grid) if grid else None,
        }

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


def save_sample_figure(x: torch.Tensor, path: Path) -> None:
    """A grid of images, or a scatter plot of 2-D points, written to ``path``."""
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
