"""Exponential moving average of a network's weights, the copy that samples (Ho et al. appendix B).

Single training steps make the weights jitter; the average over the last ~1 / (1 - decay) steps
samples visibly better. Explained in chapter 5 (training).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ddpm_lib._checks import check_real

DECAY_RANGE = dict(low=0, high=1, high_open=True)  # [0, 1): 1 would never move from the start


class EMA:
    """Keeps ``shadow``, a frozen copy of ``model`` whose weights trail it exponentially.

    The decay is warmed up as min(decay, (1 + n) / (10 + n)) after n updates, so that early
    averages are not dominated by the random initial weights.

    Args:
        model: the network being trained (not wrapped by DDP or torch.compile).
        decay: weight of the old average at each update, in ``DECAY_RANGE``: [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = check_real("ema_decay", decay, **DECAY_RANGE)
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for averaged, live in zip(self.shadow.parameters(), model.parameters()):
            averaged.lerp_(live.detach(), 1.0 - decay)
        for averaged, live in zip(self.shadow.buffers(), model.buffers()):
            averaged.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
