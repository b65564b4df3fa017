"""Settings for the whole suite.

Under pytest-xdist (``pytest -n 2``, as ``make test`` runs it) each worker runs torch on one
thread: two workers with two threads each would fight over the two cores of a CI machine. The
subprocesses the tests start (the ``ddpm`` command, torchrun) inherit the limit through
OMP_NUM_THREADS. A value the user set is kept; a plain ``pytest`` (no workers) is left alone.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch  # after OMP_NUM_THREADS, which torch reads when it loads

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
