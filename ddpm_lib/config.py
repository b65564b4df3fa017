"""What defines a training run: ``TrainConfig``, its per-data-set recipes, and what may change on
resume.

Each option is declared once: its default, its type (the annotation), its help line (the ``ddpm
train --help`` text) and its accepted values live in the field. Explained in chapter 5 (training)
and chapter 8 (scaling up).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ddpm_lib._checks import check_choice, check_int, check_real
from ddpm_lib.data import DATASETS, dataset_info
from ddpm_lib.ema import DECAY_RANGE
from ddpm_lib.hardware import AMP_MODES, DEVICES, SWITCHES
from ddpm_lib.image_sets import folder_classes
from ddpm_lib.schedule import SCHEDULE_KINDS

MODEL_NAMES = ("auto", "unet", "mlp")

# A U-Net for scikit-learn's 8x8 digits that trains usefully in 10 minutes on two CPU cores:
# two levels (8x8 and 4x4), attention at 4x4 and in the middle, 0.76 M parameters.
DIGITS_UNET = dict(
    in_channels=1,
    image_size=8,
    base_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
    num_groups=8,
    num_heads=1,
)


def _option(default=dataclasses.MISSING, help="", *, factory=dataclasses.MISSING, **accepted):
    """A field with its help line and accepted values: ``choices=(...)``, or an interval given as
    ``low``, ``high``, ``low_open``, ``high_open``. "{range}" in ``help`` shows the interval."""
    if "{range}" in help:
        help = help.format(range=_interval(**accepted))
    metadata = {"help": help, "accepted": accepted}
    return field(default=default, default_factory=factory, metadata=metadata)


def _interval(low=None, high=None, low_open=False, high_open=False) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` and in every checkpoint."""

    # data
    data: str = _option(
        "digits",
        "data set: moons, swiss_roll, ring, digits, mnist, fashion_mnist, cifar10, folder",
        choices=DATASETS,
    )
    data_root: str | None = _option(
        None, "folder of the torchvision data sets, or the image folder for --data folder"
    )
    download: bool = _option(
        False, "let torchvision download a missing data set (never done otherwise)"
    )
    image_size: int | None = _option(None, "resize images to this many pixels a side", low=1)
    n_data: int | None = _option(
        None, "use only this many training examples (or toy points)", low=1
    )
    # network ("auto": a U-Net for images, an MLP for 2-D points) and its constructor overrides
    model: str = _option(
        "auto", "network: auto (U-Net for images, MLP for 2-D), unet or mlp", choices=MODEL_NAMES
    )
    model_config: dict = _option(
        help="JSON of network arguments, e.g. '{\"base_channels\": 64}'", factory=dict
    )
    class_dropout: float | None = _option(
        None,
        "train a class-conditional network for classifier-free guidance, replacing this share "
        "of the labels by 'no class' so that it also learns the unconditional case (Ho & "
        "Salimans use 0.1-0.2), in {range}; unset: unconditional",
        low=0,
        high=1,
        high_open=True,
    )
    # diffusion
    schedule: str = _option(
        "linear",
        "noise schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)",
        choices=SCHEDULE_KINDS,
    )
    T: int = _option(1000, "number of diffusion steps", low=1)
    # optimisation
    steps: int = _option(
        6000, "optimisation steps to train for (in total, counting resumed ones)", low=1
    )
    batch_size: int = _option(128, "images per optimisation step (over all processes)", low=1)
    lr: float = _option(2e-3, "peak learning rate of AdamW", low=0, low_open=True)
    warmup_steps: int = _option(200, "steps of linear learning-rate warm-up", low=0)
    weight_decay: float = _option(0.0, "AdamW weight decay", low=0)
    grad_clip: float = _option(1.0, "clip the gradient norm to this value (0: no clipping)", low=0)
    min_snr_gamma: float | None = _option(
        None,
        "weight each step's loss by min(SNR, gamma) / SNR (Hang et al.'s min-SNR-gamma), gamma "
        "in {range}; unset: Ho et al.'s L_simple",
        low=0,
        high=1e6,
        low_open=True,
    )
    p2_gamma: float | None = _option(
        None,
        "weight each step's loss by 1 / (1 + SNR)^gamma (Choi et al.'s P2 weighting, k = 1), "
        "gamma in {range}; unset: Ho et al.'s L_simple; not with min_snr_gamma",
        low=0,
        high=1e6,
    )
    ema_decay: float = _option(
        0.999, "decay of the exponential moving average of the weights, in {range}", **DECAY_RANGE
    )
    # hardware
    device: str = _option(
        "auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps", choices=DEVICES
    )
    amp: str = _option(
        "auto",
        "mixed precision: auto (bf16/fp16 on CUDA, off elsewhere), bf16, fp16 or off",
        choices=AMP_MODES,
    )
    channels_last: str = _option(
        "auto", "channels-last memory format: auto (on for CUDA), on or off", choices=SWITCHES
    )
    compile: bool = _option(False, "compile the network with torch.compile")
    num_workers: int = _option(
        0, "data-loader worker processes (image folders and torchvision sets)", low=0
    )
    seed: int = _option(
        0, "random seed of the data order, the noise and the initial weights", low=0
    )
    # output
    out: str = _option(
        "runs/digits", "run folder: config.json, metrics.jsonl, checkpoints, samples/"
    )
    log_every: int = _option(50, "write a metrics line every this many steps", low=1)
    sample_every: int = _option(
        0, "save a grid of EMA samples every this many steps (0: only at the end)", low=0
    )
    sample_n: int = _option(64, "number of samples in each grid", low=1)
    sample_steps: int = _option(50, "DDIM steps for the sample grids", low=1)
    checkpoint_every: int = _option(
        1000, "write a checkpoint every this many steps (0: only at the end)", low=0
    )
    keep_checkpoints: int = _option(3, "how many of the newest checkpoints to keep", low=1)
    max_minutes: float = _option(
        0.0, "stop (and checkpoint) after this many minutes (0: no limit)", low=0
    )

    def validate(self) -> TrainConfig:
        """Check every option before any work; the message names the option and its range."""
        for f in dataclasses.fields(self):
            value, accepted = getattr(self, f.name), f.metadata["accepted"]
            if "choices" in accepted:
                check_choice(f.name, value, accepted["choices"])
            elif accepted and value is not None:
                check = check_int if option_type(f.name) is int else check_real
                check(f.name, value, **accepted)
        if not isinstance(self.model_config, dict):
            raise TypeError(f"model_config must be a dict, got {type(self.model_config).__name__}")
        if self.sample_steps > self.T:
            raise ValueError(
                f"sample_steps must be an integer in [1, T={self.T}] (the DDIM steps of the "
                f"sample grids), got {self.sample_steps}"
            )
        if self.data == "folder" and not self.data_root:
            raise ValueError(
                "data_root must name the image folder for data='folder' (--data-root on the "
                "command line)"
            )
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out must be a folder, but {self.out} is a file")
        if self.min_snr_gamma is not None and self.p2_gamma is not None:
            raise ValueError("min_snr_gamma and p2_gamma are two weightings of the loss: set one")
        if self.conditional:
            self.num_classes()  # refuses a data set without labels
        return self

    @property
    def conditional(self) -> bool:
        """Whether this run trains a class-conditional network (``class_dropout`` is set)."""
        return self.class_dropout is not None

    def num_classes(self) -> int:
        """The number of classes of the data: what a conditional network is built for."""
        classes = dataset_info(self.data)["num_classes"]
        if self.data == "folder":  # one subfolder per class, if the images are so arranged
            classes = len(folder_classes(self.data_root)) or None
        if classes is None:
            what = (
                "its images lie in fewer than two class subfolders"
                if self.data == "folder"
                else "it has no labels"
            )
            raise ValueError(
                f"class_dropout (a conditional run) needs a labelled data set, but {self.data!r} "
                f"is not: {what}; labelled sets: moons, ring, digits, mnist, fashion_mnist, "
                "cifar10, or a folder with one subfolder per class"
            )
        return classes

    def network(self) -> tuple[str, dict]:
        """The network this run trains: its name and constructor arguments (the data set's
        channels, image size or dimension, and for a conditional run its classes, filled in)."""
        info = dataset_info(self.data)
        name = self.model if self.model != "auto" else ("mlp" if info["kind"] == "2d" else "unet")
        config = dict(self.model_config)
        if name == "unet":
            if info["kind"] != "image":
                raise ValueError(f"model 'unet' needs image data, but {self.data!r} is 2-D")
            config["in_channels"] = info["channels"]
            config["image_size"] = self.image_size or info["image_size"]
        else:
            if info["kind"] != "2d":
                raise ValueError(f"model 'mlp' needs 2-D data, but {self.data!r} is images")
            config["dim"] = info["dim"]
        if self.conditional:
            config["num_classes"] = self.num_classes()
        return name, config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config options {unknown}; known: {sorted(known)}")
        return cls(**values)


def option_help(name: str) -> str:
    """The help line of ``TrainConfig`` option ``name`` (what ``ddpm train --help`` shows)."""
    return _fields()[name].metadata["help"]


def option_type(name: str) -> type:
    """The type of ``TrainConfig`` option ``name``, from its annotation (``int | None`` -> int)."""
    kind = _annotations()[name]
    return next((a for a in typing.get_args(kind) if a is not type(None)), kind)


@functools.cache
def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


@functools.cache
def _annotations() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)  # the annotations are strings until resolved


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


def as_json(value):
    """``value`` as JSON sees it: tuples become lists, so (1, 2) from Python equals [1, 2] read
    back from config.json."""
    return json.loads(json.dumps(value, sort_keys=True))


def config_changes(saved: dict, config: TrainConfig) -> list[tuple[str, object, object]]:
    """The (field, saved value, new value) that resuming a run saved with ``saved`` as
    ``config`` would change and must not (see ``RESUMABLE``)."""
    defaults = TrainConfig().to_dict()  # for fields that an older config.json lacks
    old, new = as_json({**defaults, **saved}), as_json({**defaults, **config.to_dict()})
    changes = [(k, old.get(k), v) for k, v in new.items() if k not in RESUMABLE and old.get(k) != v]
    # The torchvision sets are found by name, so their folder may move; an image folder is the data.
    return [c for c in changes if c[0] != "data_root" or config.data == "folder"]
