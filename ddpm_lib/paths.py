"""Where ddpm_lib keeps its files: data sets, the digits classifier and the book's trained runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$DDPM_CACHE`` if set, else ``~/.cache/ddpm_lib``: where data, the digits classifier and
    the book's trained runs are kept."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm_lib").expanduser()


def default_data_root() -> Path:
    """Where downloaded data sets live: ``$DDPM_DATA``, else ``cache_root() / "data"``."""
    if os.environ.get("DDPM_DATA"):
        return Path(os.environ["DDPM_DATA"]).expanduser()
    return cache_root() / "data"
