"""Imported first by the package: torch runs with passive OpenMP threads in the ``ddpm`` command and
in the book's notebooks.

Spinning OpenMP threads (torch's default) slow training whenever another process holds a core:
twice as slow with one spinning neighbour on two cores (``benchmarks/omp_policy.py``), ten times
on a loaded two-core machine. Passive threads cost 1.3-1.4x on a quiet one, for the digits U-Net's
small operations: a bounded price for a safe default (set OMP_WAIT_POLICY=ACTIVE on a machine of
your own). OpenMP reads the variable once, when torch loads it, so this runs before any import of
torch, and only where torch has not been loaded yet:

- the ddpm command (the console script, or python -m ddpm_lib, also under torchrun);
- a Jupyter kernel (the book's chapters, Colab), where ``import ddpm_lib`` comes first.

The user's own OMP_WAIT_POLICY always wins; other library users keep their environment.
"""

import os
import sys

_argv = getattr(sys, "argv", None) or [""]
_command = _argv[0] == "-m" or os.path.basename(_argv[0]) in ("ddpm", "ddpm.exe")
_notebook = "ipykernel" in sys.modules
if not os.environ.get("OMP_WAIT_POLICY") and "torch" not in sys.modules and (_command or _notebook):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
