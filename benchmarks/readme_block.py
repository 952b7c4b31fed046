"""Write a benchmark's report into benchmarks/README.md between its `<!-- NAME:begin/end -->` marks."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().with_name("README.md")


def update(name: str, report: str) -> None:
    block = f"<!-- {name}:begin -->\n{report}\n<!-- {name}:end -->"
    pattern = rf"<!-- {name}:begin -->.*<!-- {name}:end -->"
    README.write_text(re.sub(pattern, lambda _: block, README.read_text(), flags=re.S))


def publish(name: str, lines: list[str], readme: bool) -> str:
    """Print a benchmark's report and, with `readme`, write it into its block; returns it."""
    report = "\n".join(lines)
    print(report)
    if readme:
        update(name, report)
    return report
