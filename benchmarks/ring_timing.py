"""Wall time of the default ring run: 3000 steps of 1024 points through the 2-D MLP.

The README and chapter 8 quote this run (about 32 s on two quiet CPU cores). It is a benchmark, not
a unit test: on a busy machine it takes longer and that is no bug. The exit status is non-zero when
the run takes longer than ``--budget`` seconds, so a quiet machine can still watch for regressions.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ring_timing.py            # budget 120 s
    python benchmarks/ring_timing.py --budget 60
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ddpm_lib.training import Trainer, default_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds allowed (default 120)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = default_config("ring", out=out, checkpoint_every=0)
        started = time.perf_counter()
        summary = Trainer(config, progress=False, log=None).train()
        wall = time.perf_counter() - started
    print(
        f"ring, {config.steps} steps of {config.batch_size}: training {summary['seconds']:.1f} s, "
        f"{wall:.1f} s with the final checkpoint and samples; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; budget {args.budget:.0f} s"
    )
    return 0 if summary["seconds"] < args.budget else 1


if __name__ == "__main__":
    raise SystemExit(main())
