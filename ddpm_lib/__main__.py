"""``python -m ddpm_lib`` is the ``ddpm`` command."""

from ddpm_lib.cli import main

raise SystemExit(main())
