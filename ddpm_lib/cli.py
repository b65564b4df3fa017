"""The ``ddpm`` command line."""

from __future__ import annotations

import argparse
import sys

from ddpm_lib import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm",
        description="Train and sample Denoising Diffusion Probabilistic Models (ddpm_lib).",
    )
    parser.add_argument("--version", action="version", version=f"ddpm_lib {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    parser.print_help()
    return 0
