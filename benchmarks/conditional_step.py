"""What conditioning costs a training step: the digits U-Net with and without classes.

Chapter 9 quotes the ratio. Both trainers live in one process and take turns, ``--rounds`` times
``--steps`` steps each, so a busy machine slows both alike; the table gives the median time per
step of each and their ratio (the class table adds 1,408 weights and one vector addition).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/conditional_step.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from ddpm_lib.config import default_config
from ddpm_lib.training import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="turns per trainer (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="steps per turn (default 20)")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"unconditional": [], "conditional": []}
    with tempfile.TemporaryDirectory() as out:
        trainers, batches = {}, {}
        for name, extra in [("unconditional", {}), ("conditional", {"class_dropout": 0.1})]:
            config = default_config("digits", steps=10**6, device="cpu", out=f"{out}/{name}",
                                    **extra)  # fmt: skip
            trainers[name] = Trainer(config, progress=False, log=None)
            batches[name] = trainers[name]._batches()
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(*next(batches[name]))
                seconds[name].append((time.perf_counter() - started) / args.steps)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print("| network | ms per step (median) | rounds (ms) |\n|---|---|---|")
    for name, values in seconds.items():
        rounds = ", ".join(f"{1000 * v:.0f}" for v in values)
        print(f"| digits U-Net, {name} | {1000 * median[name]:.1f} | {rounds} |")
    ratio = median["conditional"] / median["unconditional"]
    print(f"conditional / unconditional: {ratio:.2f} (batch 128, {args.rounds} x {args.steps} "
          "steps each)")  # fmt: skip


if __name__ == "__main__":
    main()
