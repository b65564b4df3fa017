"""Where the benchmarks keep what they measured: JSON for programs, a Markdown table for people."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, data, table: str) -> None:
    """Write ``data`` to results/``name``.json and ``table`` to results/``name``.md; an absolute
    ``name`` writes beside it instead (scratch runs that must not replace the committed tables)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
