"""Imported first by the package: the ``ddpm`` command runs torch with passive OpenMP threads.

The ddpm command (the console script, or python -m ddpm_lib, also under torchrun) runs torch with
OMP_WAIT_POLICY=PASSIVE unless the user chose a policy: spinning OpenMP threads slow training ten
times or more whenever another process holds a core. OpenMP reads the variable once, when torch
loads it, so this runs before any import of torch. Library users keep their own environment.
"""

import os
import sys

_argv = getattr(sys, "argv", None) or [""]
if not os.environ.get("OMP_WAIT_POLICY") and (
    _argv[0] == "-m" or os.path.basename(_argv[0]) in ("ddpm", "ddpm.exe")
):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
