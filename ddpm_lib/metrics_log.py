"""The training log: ``metrics.jsonl`` (one JSON line per logged step), the loss and speed averaged
over each logging window, and the progress bar. Explained in chapter 8 (scaling up)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ddpm_lib._io import write_text_atomically


class MetricsLog:
    """Averages the loss over the steps since the last line and writes lines to ``path``.

    Args:
        path: the ``metrics.jsonl`` to append to; None writes nothing (a process other than
            rank 0). Lines beyond ``step`` (a killed run's) are dropped first.
        step: the step training starts from.
        total: the step it stops at, for the progress bar.
        images_per_step: examples one step trains on, for the speed.
        progress: show a tqdm bar.
        say: where to report a dropped torn line.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        step: int,
        total: int,
        images_per_step: int,
        progress: bool,
        say: Callable[[str], None],
    ) -> None:
        self.path, self.images_per_step = path, images_per_step
        self.last_loss: float | None = None  # None until a line is written
        self.started = self._window_start = time.perf_counter()
        self._loss, self._steps = 0.0, 0
        self._file = _open_for_appending(path, step, say) if path else None
        self._bar = tqdm(total=total, initial=step, disable=not progress, desc="training")

    def add(self, loss: float) -> None:
        """Count one finished step and its loss."""
        self._loss += loss
        self._steps += 1
        self._bar.update(1)

    def write(self, step: int, lr: float) -> dict:
        """Write the line of ``step``: the window's mean loss and images per second."""
        now = time.perf_counter()
        images_per_sec = self._steps * self.images_per_step / (now - self._window_start)
        self.last_loss = self._loss / self._steps
        record = {
            "step": step,
            "loss": self.last_loss,
            "lr": lr,
            "images_per_sec": round(images_per_sec, 1),
            "elapsed_sec": round(now - self.started, 2),
        }
        if self._file:
            self._append(record)
        self._bar.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{images_per_sec:.0f}")
        self._loss, self._window_start, self._steps = 0.0, now, 0
        return record

    def seconds(self) -> float:
        """Seconds since the log was opened (the run's start)."""
        return time.perf_counter() - self.started

    def close(self) -> None:
        self._bar.close()
        if self._file:
            self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _append(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise OSError(
                e.errno,
                f"step {record['step']}: writing {self.path} failed ({e.strerror}); the "
                "checkpoints are intact and --resume drops a torn line",
            ) from None


def _open_for_appending(path: Path, step: int, say: Callable[[str], None]):
    """``path`` for appending, without lines beyond ``step`` (a killed run's).

    A torn last line (a write cut short by a full disk or a kill) is dropped; the file is
    rewritten atomically, like the checkpoints.
    """
    if path.is_file():
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                if number < len(lines):
                    raise ValueError(
                        f"{path}, line {number}: not a JSON record ({e}); delete the line to resume"
                    ) from None
                say(f"dropped the torn last line of {path} (a write cut short)")
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        write_text_atomically(path, "".join(kept))
    return path.open("a")
