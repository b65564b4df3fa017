"""Where training runs: the device, mixed precision, memory, and the processes of a torchrun job.

Nothing here knows about diffusion. Explained in chapter 8 (scaling up).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from ddpm_lib._checks import check_choice
from ddpm_lib.models import build_model, count_parameters

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SWITCHES = ("auto", "on", "off")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda if present, then Apple's mps, then cpu; or the one asked for."""
    check_choice("device", name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"device='cuda' for local rank {local_rank}, but torch sees only "
                f"{torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", local_rank)
    if name == "mps" and not _mps_available():
        raise ValueError("device='mps' was asked for, but torch sees no Apple GPU (MPS)")
    return torch.device(name)


def pick_amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a grad scaler); on CPU only if asked."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or nothing when ``dtype`` is None (full precision)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def use_channels_last(switch: str, device: torch.device, model_name: str) -> bool:
    """Whether the U-Net's images go channels-last: "on", or "auto" on CUDA (where it pays)."""
    return model_name == "unet" and (switch == "on" or (switch == "auto" and device.type == "cuda"))


# Memory --------------------------------------------------------------------------------------


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


def build_model_on_meta(name: str, config: dict) -> torch.nn.Module:
    """The network ``build_model(name, **config)`` describes, without allocating its weights."""
    if not isinstance(config, dict):
        raise TypeError(f"model_config must be a dict, got {type(config).__name__}")
    with torch.device("meta"):
        return build_model(name, **config)


def check_fits(name: str, config: dict, device: torch.device) -> None:
    """Refuse a network that cannot train on ``device``, before allocating it (the parameters
    counted on the meta device): weights, gradients, Adam's two moments and the EMA copy, 4 bytes
    each."""
    n = count_parameters(build_model_on_meta(name, config), trainable_only=False)
    needed, free = 5 * 4 * n, free_memory(device)
    if free is not None and needed > free:
        raise ValueError(
            f"model_config: the {name} network has {n:,} parameters, which need "
            f"about {needed / 1e9:.1f} GB to train (weights, gradients, Adam state and the "
            f"EMA copy), more than the {free / 1e9:.1f} GB free on {device}; choose a "
            "smaller network"
        )


@contextmanager
def allocation_errors(name: str, device: torch.device):
    """The allocator's refusal (which ``check_fits`` can miss: memory taken by others) as the
    same one-line error."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and (
            "can't allocate memory" not in str(e)
        ):
            raise
        raise ValueError(
            f"model_config: the {name} network does not fit in the free memory "
            f"of {device} ({str(e).splitlines()[0][:200]}); choose a smaller network"
        ) from None


# Distributed (torchrun) ----------------------------------------------------------------------


def distributed_context() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size


def init_distributed(device_name: str, world_size: int) -> None:
    """Join torchrun's process group (once): NCCL between GPUs, else gloo."""
    if world_size > 1 and not dist.is_initialized():
        on_gpu = device_name in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if on_gpu else "gloo")


def all_processes_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over the processes of the job (NCCL reduces on the GPU)."""
    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor([value], device=device if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def wrap_for_training(
    model: torch.nn.Module, device: torch.device, world_size: int, compile: bool
) -> torch.nn.Module:
    """What the training step calls: ``model`` under DistributedDataParallel when several
    processes train, compiled with ``torch.compile`` if asked; its weights stay ``model``'s."""
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model
