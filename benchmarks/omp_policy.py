"""What OMP_WAIT_POLICY=PASSIVE costs and saves: digits training steps, quiet and on a busy CPU.

Each cell runs the digits U-Net's training step (``default_config("digits")``, batch 128) in a
fresh process, with torch's default OpenMP threads (one per core) and the wait policy either left
to the OpenMP runtime or set to PASSIVE (what ``ddpm`` and the book's notebooks now do). "Busy"
starts one process per core but one that spins on a core, as a second job on a shared machine
would. The table gives the median time of a step over ``--steps`` steps (after two warm-up
steps), and in brackets its ratio to the default.

    python benchmarks/omp_policy.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

from results_files import write_results

STEP_TIMES = """
import json, time, torch
from ddpm_lib import Trainer, default_config
import tempfile
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(default_config("digits", out=out), progress=False, log=None)
    x0 = torch.stack([trainer.dataset[i][0] for i in range(128)])
    times = []
    for _ in range({steps} + 2):
        start = time.perf_counter()
        trainer.train_step(x0)
        times.append(time.perf_counter() - start)
print(json.dumps(dict(times=times[2:], threads=torch.get_num_threads())))
"""


def spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


# What the OpenMP runtime is told: nothing (torch's default), passive waiting, libgomp's default
# spinning cut short (GOMP_SPINCOUNT: how long a thread spins before it sleeps), or one thread.
SETTINGS = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}


def run(setting: str, busy: bool, steps: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    }
    env.update(SETTINGS[setting])
    spinners = []
    if busy:  # the other job: every core but one spins for as long as the measurement runs
        stop_at = time.time() + 3600
        for _ in range(max(1, (os.cpu_count() or 2) - 1)):
            p = multiprocessing.Process(target=spin, args=(stop_at,), daemon=True)
            p.start()
            spinners.append(p)
    try:
        code = STEP_TIMES.format(steps=steps)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(median_s=statistics.median(result["times"]), **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per cell")
    args = parser.parse_args()
    cells = {}
    for busy in (False, True):
        for setting in SETTINGS:
            key = f"{'busy' if busy else 'quiet'}, {setting}"
            cells[key] = run(setting, busy, args.steps)
            print(key, f"{cells[key]['median_s'] * 1000:.0f} ms per step", flush=True)
    lines = [
        "| CPU | " + " | ".join(f"{s}: ms per step" for s in SETTINGS) + " |",
        "|---" * (len(SETTINGS) + 1) + "|",
    ]
    for load in ("quiet", "busy"):
        default = cells[f"{load}, default"]["median_s"]
        row = [
            f"{cells[f'{load}, {s}']['median_s'] * 1000:.0f}"
            + ("" if s == "default" else f" ({cells[f'{load}, {s}']['median_s'] / default:.2f}x)")
            for s in SETTINGS
        ]
        lines.append(f"| {load} | " + " | ".join(row) + " |")
    threads = cells["quiet, default"]["threads"]
    text = "\n".join(lines) + (
        f"\n\nDigits U-Net training step, batch 128, {threads} torch thread(s) (but one in the "
        f"last column) on "
        f"{os.cpu_count()} cores; median of {args.steps} steps; busy: "
        f"{max(1, (os.cpu_count() or 2) - 1)} other process(es) spinning."
    )
    print("\n" + text)
    write_results("omp_policy", cells, text)


if __name__ == "__main__":
    main()
