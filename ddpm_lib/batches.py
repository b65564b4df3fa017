"""Which examples each training step sees: a pure function of (seed, step), which is what makes
resuming exact. Explained in chapter 8 (scaling up)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


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


def training_batches(
    dataset: Dataset,
    order: BatchOrder,
    start: int,
    stop: int,
    device: torch.device,
    *,
    labels: bool = False,
    num_workers: int = 0,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x0, y)`` for each step from ``start`` to ``stop`` - 1, on ``device``: the training
    batch and, with ``labels``, its class labels (else None)."""
    if isinstance(dataset, TensorDataset):  # in memory: index directly, no loader
        data = dataset.tensors[0].to(device)
        classes = dataset.tensors[1].to(device) if labels else None
        for step in range(start, stop):
            index = order.indices(step).to(device)
            yield data[index], (classes[index] if labels else None)
        return
    loader = DataLoader(
        dataset,
        batch_sampler=_StepSampler(order, start, stop),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Its own generator: creating the iterator draws a seed, and a draw from the global
        # RNG would shift every later dropout mask of a resumed run.
        generator=torch.Generator().manual_seed(seed),
    )
    try:
        for x, y in loader:
            yield x.to(device, non_blocking=True), (y.to(device) if labels else None)
    except Exception as e:
        if "DataLoader worker" not in str(e):
            raise
        raise _one_line(e) from None


def _one_line(error: Exception) -> Exception:
    """A DataLoader worker's error reduced to its cause: torch appends the worker's traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    cause = re.sub(r"^[\w.]+: ", "", lines[-1]) if lines else type(error).__name__
    try:
        return type(error)(cause)
    except Exception:
        return RuntimeError(cause)
