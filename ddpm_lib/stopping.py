"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (what Colab, Slurm and Kubernetes send)
only ask for a stop, which the trainer honours between two steps, with a checkpoint.
Explained in chapter 8 (scaling up)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from ddpm_lib.hardware import all_processes_max

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what Colab, Slurm and Kubernetes send


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step; a checkpoint of that step was written.

    Attributes:
        signal_number: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        checkpoint: the checkpoint written, or None (a process other than rank 0).
    """

    def __init__(self, message: str, signal_number: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signal_number, self.checkpoint = signal_number, checkpoint


class StopSignals:
    """While entered, ``STOP_SIGNALS`` only record a request (``received``); a second signal
    does not cut short what is under way. (Handlers can be set from the main thread only: in
    other threads the signals keep their handlers.)"""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _request(self, signal_number, frame) -> None:
        if self.received is None:
            self.received = signal_number

    def requested(self, world_size: int, device: torch.device) -> bool:
        """Whether a stop signal arrived; under DDP, at any process (they all stop together)."""
        if world_size > 1:
            self.received = all_processes_max(self.received or 0, device) or None
        return self.received is not None

    def interrupted(self, step: int, checkpoint: Path | None) -> TrainingInterrupted:
        """The exception that reports the stop after ``step`` with ``checkpoint``."""
        name = signal.Signals(self.received).name
        message = f"stopped by {name} after step {step}; checkpoint {checkpoint} (continue with "
        return TrainingInterrupted(message + "--resume)", self.received, checkpoint)
