"""Writing a benchmark's results: the JSON report and its markdown table side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: str | Path, table: str) -> None:
    """Write ``report`` to ``out`` (JSON) and ``table`` to the same path with ``.md``, and
    print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table)
    print()
    print(table)
