"""Argument checks shared by the modules: fail early, name the parameter and the accepted range."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import torch


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in [low, high], else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in {_range(low, high)}, got {value}")
    return value


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real in the given interval, else raise.

    inf and NaN are refused even where the interval is open: no option means "infinitely many".
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or not math.isfinite(value):
        interval = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def check_int_sequence(
    name: str, value: object, *, low: int | None = None, nonempty: bool = False
) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ints, each >= ``low``, if it is a sequence of them."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    if nonempty and len(value) == 0:
        raise ValueError(f"{name} must hold at least one positive int, got ()")
    return tuple(check_int(f"{name}[i]", v, low=low) for v in value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return value  # type: ignore[return-value]


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_batch(name: str, value: object) -> torch.Tensor:
    """Check that ``value`` is a floating-point batch (B, ...) with B >= 1."""
    check_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.ndim == 0 or value.shape[0] == 0:
        raise ValueError(
            f"{name} must be a batch of shape (B, ...) with B >= 1, got shape {tuple(value.shape)}"
        )
    return value


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, value)
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def check_timesteps(t: object, T: int, batch: int) -> torch.Tensor:
    """Check that ``t`` is an integer tensor of shape (batch,) with values in [0, T-1]."""
    t = check_tensor("t", t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (torch.long), got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape (batch,) = ({batch},), got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > T - 1):
        raise ValueError(
            f"t must hold timesteps in [0, {T - 1}] (T={T}, 0-based), "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t.long()


def check_config(cls: type, config: object, kwargs: dict) -> object:
    """A network's config: ``config`` itself, or ``cls(**kwargs)`` (a checkpoint's dict)."""
    if config is None:
        return cls(**kwargs)
    if not isinstance(config, cls) or kwargs:
        raise TypeError(
            f"pass a {cls.__name__} or its fields as keyword arguments, not both; got "
            f"{type(config).__name__} and {sorted(kwargs)}"
        )
    return config


def config_to_dict(config: object) -> dict:
    """A network config dataclass as JSON values (lists for tuples): what checkpoints store.

    ``num_classes`` is left out when None, so an unconditional network's dict is what it was
    before conditioning existed (older checkpoints and the book's caches keep matching).
    """
    values = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in dataclasses.asdict(config).items()
    }
    if values.get("num_classes", 0) is None:
        del values["num_classes"]
    return values


def check_model_input(
    x: object, t: object, item_shape: tuple[int, ...], described: str
) -> torch.Tensor:
    """The networks' input check: x of shape (B, *item_shape), t of shape (B,) or () (broadcast).

    Args:
        x: the noisy batch x_t.
        t: its timesteps.
        item_shape: the shape of one item, e.g. (1, 8, 8) for the digits' U-Net.
        described: the arguments that set ``item_shape``, for the message, e.g. "dim=2".

    Returns:
        ``t`` of shape (B,).
    """
    check_tensor("x", x)
    check_tensor("t", t)
    if x.ndim != 1 + len(item_shape) or tuple(x.shape[1:]) != item_shape:
        expected = ", ".join(str(n) for n in item_shape)
        raise ValueError(f"x must have shape (B, {expected}) ({described}), got {tuple(x.shape)}")
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _fmt(x: float | None) -> str:
    return "inf" if x is None else f"{x:g}"


def _range(low: int | None, high: int | None) -> str:
    return f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
