"""The trainer: Algorithm 1 in a loop, fast on a GPU and still useful on two CPU cores.

``Trainer`` runs one ``TrainConfig``: it builds the data, the network, the schedule, AdamW with
warm-up, the EMA copy and mixed precision where it pays; ``train()`` loops over ``train_step`` and
fills the run folder with a JSONL log, sample grids and atomic checkpoints. Under ``torchrun`` it
trains with DistributedDataParallel; rank 0 alone writes. Around it, one module per concern:
``config`` (the settings and recipes), ``hardware`` (device, precision, processes), ``batches``
(the data order), ``metrics_log``, ``run_folder``, ``rng_state`` and ``stopping`` (signals).

Explained in chapter 5 (training) and chapter 8 (scaling up).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ddpm_lib._version import __version__
from ddpm_lib.batches import BatchOrder, training_batches
from ddpm_lib.checkpoint import FORMAT, CheckpointError
from ddpm_lib.config import RESUMABLE, TrainConfig, as_json, default_config
from ddpm_lib.data import load_dataset
from ddpm_lib.diffusion import diffusion_loss
from ddpm_lib.ema import EMA
from ddpm_lib.figures import write_sample_figure
from ddpm_lib.guidance import check_labels, drop_labels
from ddpm_lib.hardware import (
    allocation_errors,
    autocast,
    check_fits,
    distributed_context,
    init_distributed,
    pick_amp_dtype,
    pick_device,
    use_channels_last,
    wrap_for_training,
)
from ddpm_lib.metrics_log import MetricsLog
from ddpm_lib.models import build_model, count_parameters
from ddpm_lib.rng_state import rng_state, seed_everything, set_rng_state
from ddpm_lib.run_folder import RunFolder
from ddpm_lib.schedule import NoiseSchedule
from ddpm_lib.stopping import StopSignals, TrainingInterrupted

# Names that callers import from here (the config, the stop exception) though they live beside it.
__all__ = [
    "RESUMABLE",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "default_config",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


class Trainer:
    """Trains a noise predictor with Algorithm 1 according to a ``TrainConfig`` (chapter 5).

    A run folder holds one run. A new run refuses a folder that holds one unless ``resume``
    (continue it, with the same settings but for those in ``RESUMABLE``) or ``overwrite``
    (delete it first); while ``train()`` runs, the folder is locked against other processes.

    Args:
        config: the run's settings (validated here, before any work).
        resume: continue from the newest valid checkpoint in ``config.out``, if there is one.
        overwrite: on starting, delete the run in ``config.out`` (config, log, checkpoints, grids).
        progress: show a tqdm bar.
        log: where to print one-line messages (rank 0 only); None for silence.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, log=print) -> None:  # fmt: skip
        self.config = cfg = config.validate()
        self.rank, self.local_rank, self.world_size = distributed_context()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.say = log if self.is_main and log is not None else _silent  # one-line messages
        _check_run_options(cfg, resume, overwrite, self.world_size)
        self.folder = RunFolder(cfg, resume=resume, overwrite=overwrite, main=self.is_main,
                                say=self.say)  # fmt: skip
        self.device = pick_device(cfg.device, self.local_rank)
        self.model_name, self.model_config = cfg.network()
        check_fits(self.model_name, self.model_config, self.device)
        seed_everything(cfg.seed + self.rank)  # before building: the initial weights follow it
        self.channels_last = use_channels_last(cfg.channels_last, self.device, self.model_name)
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        with allocation_errors(self.model_name, self.device):  # before any data loads
            model = build_model(self.model_name, **self.model_config)
            model = model.to(self.device, memory_format=layout)
        self.model = model  # the bare network: its state is what checkpoints hold
        init_distributed(cfg.device, self.world_size)
        self.amp_dtype = pick_amp_dtype(cfg.amp, self.device)
        self.dataset = _training_set(cfg)
        self.order = BatchOrder(len(self.dataset), cfg.batch_size, cfg.seed, self.rank,
                                self.world_size)  # fmt: skip
        self.schedule = getattr(NoiseSchedule, cfg.schedule)(T=cfg.T).to(self.device)
        self.ema = EMA(model, cfg.ema_decay)
        self.optimizer, self.lr_scheduler = adamw_with_warmup(model, cfg, self.device)
        # fp16 needs loss scaling to keep small gradients from underflowing; bf16 does not.
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        seed = cfg.seed * 7919 + 1 + self.rank  # apart from the weights' and the data's seeds
        self.noise_generator = torch.Generator(self.device).manual_seed(seed)
        self.step, self.resumed_from, self._saved_step, self._stop = 0, None, None, StopSignals()
        if resume and (found := self.folder.checkpoint_to_resume()) is not None:
            self.resumed_from, state = found
            self.load_state_dict(state)
            self._saved_step = self.step
            self.say(f"resuming from {self.resumed_from} at step {self.step}")
        # What the training step calls: under DDP and/or torch.compile, the same weights.
        self.net = wrap_for_training(model, self.device, self.world_size, cfg.compile)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The objective on one batch: Algorithm 1's loss, weighted as configured. A subclass
        that trains another objective (another parameterisation, say) overrides this method and
        keeps the step around it: mixed precision, clipping, EMA, NaN guards."""
        cfg = self.config
        return diffusion_loss(self.net, self.schedule, x0, generator=self.noise_generator,
                              labels=labels, min_snr_gamma=cfg.min_snr_gamma,
                              p2_gamma=cfg.p2_gamma)  # fmt: skip

    def train_step(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """One step of Algorithm 1; returns the loss. ``train()`` passes labels only for a
        conditional run, so subclasses that override ``train_step(self, x0)`` keep working."""
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cfg, noise = self.config, self.noise_generator
        labels = drop_labels(labels, cfg.class_dropout, generator=noise)  # "no class"
        with autocast(self.device, self.amp_dtype):
            loss = self.loss(x0, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # The step's one device sync: the loss to log and both NaN guards, pre-update.
        value, norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
        if not math.isfinite(value):
            raise NonFiniteLossError(_non_finite_message("loss", value, self))
        if not math.isfinite(norm) and not self.scaler.is_enabled():
            # fp16 overflows now and then, as expected: the scaler skips that step.
            raise NonFiniteLossError(_non_finite_message("gradient norm", norm, self))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return value

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
        cfg, start_step = self.config, self.step
        with self.folder.locked(), self._stop:
            with self._start() as log:
                for x0, labels in self._batches():
                    if self._stop.requested(self.world_size, self.device):
                        break  # checked between steps: each step is whole
                    log.add(self.train_step(x0) if labels is None else self.train_step(x0, labels))
                    if self.step % cfg.log_every == 0:
                        log.write(self.step, lr=self.lr_scheduler.get_last_lr()[0])
                    if cfg.sample_every and self.step % cfg.sample_every == 0:
                        self.save_samples()
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                    if cfg.max_minutes and log.seconds() > 60 * cfg.max_minutes:
                        self.say(f"max_minutes={cfg.max_minutes} reached at step {self.step}")
                        break
            return self._finish(start_step, log)

    def _start(self) -> MetricsLog:
        """Prepare the run folder, say what trains where, open the metrics log."""
        cfg = self.config
        self.folder.start()
        self.say(f"training {self.model_name} ({count_parameters(self.model) / 1e6:.2f} M "
                 f"parameters) on {cfg.data} ({len(self.dataset)} examples), device {self.device}, "
                 f"amp {self.amp_dtype or 'off'}, {self.world_size} process(es), "
                 f"steps {self.step} -> {cfg.steps}")  # fmt: skip
        images_per_step = min(cfg.batch_size, len(self.dataset))  # a small set is one batch
        return MetricsLog(self.folder.metrics_log, step=self.step, total=cfg.steps, say=self.say,
                          images_per_step=images_per_step, progress=self.progress)  # fmt: skip

    def _batches(self):
        """``(x0, labels)`` of each remaining step, on the device (labels None if unconditional)."""
        cfg = self.config
        return training_batches(self.dataset, self.order, self.step, cfg.steps, self.device,
                                labels=cfg.conditional, num_workers=cfg.num_workers,
                                seed=cfg.seed)  # fmt: skip

    def _finish(self, start_step: int, log: MetricsLog) -> dict:
        """The last checkpoint and sample grid, and the run's summary (or the stop's error)."""
        seconds = log.seconds()
        # This step's checkpoint: the one on disk, or a new one.
        final = self.folder.checkpoint(self.step) if self._saved_step == self.step else self.save()
        if self._stop.received is not None:
            raise self._stop.interrupted(self.step, final)
        grid = self.save_samples()
        self.say(f"done: step {self.step}, {seconds:.1f} s, checkpoint {final}, samples {grid}")
        return dict(steps=self.step, steps_this_run=self.step - start_step, seconds=seconds,
                    last_logged_loss=log.last_loss,  # None when no step was logged
                    checkpoint=final and str(final), samples=grid and str(grid))  # fmt: skip

    def save_samples(self) -> Path | None:
        """Sample the EMA network with DDIM and save a grid (images) or a scatter plot (2-D)."""
        if not self.is_main:
            return None
        cfg, path = self.config, self.folder.sample_grid(self.step)
        shape = (cfg.sample_n, *self.ema.shadow.item_shape)  # the unwrapped network
        write_sample_figure(self.ema.shadow, self.schedule, shape, path, steps=cfg.sample_steps,
                            seed=cfg.seed, device=self.device,
                            classes=self.model_config.get("num_classes"))  # fmt: skip
        return path

    def state_dict(self) -> dict:
        """Everything the next step depends on, as plain data a safe loader can read."""
        return {"format": FORMAT, "version": __version__, "step": self.step,
                "model_name": self.model_name, "model_config": self.model_config,
                **{name: part.state_dict() for name, part in self._stateful().items()},
                "schedule": self.schedule.to_dict(), "config": self.config.to_dict(),
                "rng": rng_state(self.noise_generator), "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        _check_same_network(state, self.model_name, self.model_config)
        for name, part in self._stateful().items():
            if state[name] or name != "scaler":  # no scaler state from a run without fp16
                part.load_state_dict(state[name])
        self.step = int(state["step"])
        if state.get("world_size", 1) == self.world_size:  # else each process draws afresh
            set_rng_state(state["rng"], self.noise_generator)

    def _stateful(self) -> dict:
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer,
                "lr_scheduler": self.lr_scheduler, "scaler": self.scaler}  # fmt: skip

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes), keeping the newest ``keep_checkpoints``."""
        path = None
        if self.is_main:
            _check_finite_weights(self.model, self.step)
            path = self.folder.save(self.state_dict())
        if self.world_size > 1:
            torch.distributed.barrier()
        self._saved_step = self.step
        return path


def _check_finite_weights(model: torch.nn.Module, step: int) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NonFiniteLossError(
                f"step {step}: weight {name} holds NaN or Inf; no checkpoint was written"
            )


def _check_same_network(state: dict, model_name: str, model_config: dict) -> None:
    same_config = as_json(state["model_config"]) == as_json(model_config)
    if state["model_name"] != model_name or not same_config:
        raise CheckpointError(
            f"checkpoint network {state['model_name']} {state['model_config']} differs from "
            f"the configured {model_name} {model_config}"
        )


def _check_run_options(cfg: TrainConfig, resume: bool, overwrite: bool, world_size: int) -> None:
    if world_size > 1 and cfg.batch_size % world_size:
        raise ValueError(
            f"batch_size must be divisible by the number of processes ({world_size}), "
            f"got {cfg.batch_size}"
        )
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or delete it")


def _training_set(cfg: TrainConfig) -> torch.utils.data.Dataset:
    dataset = load_dataset(cfg.data, root=cfg.data_root, split="train", download=cfg.download,
                           image_size=cfg.image_size, n=cfg.n_data,
                           generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    if cfg.conditional and isinstance(dataset, torch.utils.data.TensorDataset):
        check_labels(dataset.tensors[1], cfg.num_classes(), len(dataset))  # before any step
    return dataset


def adamw_with_warmup(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW (fused on CUDA) and its learning rate, warmed up linearly over ``warmup_steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")  # fmt: skip
    warmup = cfg.warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, lr_scheduler


def _non_finite_message(what: str, value: float, trainer: Trainer) -> str:
    causes = [f"a learning rate too high (lr={trainer.config.lr}; try a smaller one or more "
              "warm-up)"]  # fmt: skip
    if trainer.amp_dtype == torch.float16:
        causes.append("fp16 overflow (try amp bf16 or off)")
    causes.append("data outside [-1, 1]")
    # trainer.step counts finished steps; the log numbers the one that failed step + 1.
    return (
        f"step {trainer.step + 1}: the {what} is {value}; training stopped and no checkpoint "
        f"was written. Likely causes: {', '.join(causes)}."
    )


def _silent(message: str) -> None:
    pass
