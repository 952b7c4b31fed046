"""The README's worked examples, made by running them: each block between

    <!-- example: COLUMNS=80 infl topk -c sample_configs/demo.yaml -k 3 --query q6 -->
    ```
    (what that command prints)
    ```
    <!-- /example -->

holds the output of its command, run on the demo (`make demo`). `make readme-examples` rewrites
them; tests/test_readme.py runs them again on a demo of its own and fails when they drift (numbers
within 2 %, for another machine's last bits; every word and id exactly).

    python tests/readme_examples.py [--check] [--root DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- example: (?P<command>.+?) -->\n```\n)(?P<output>.*?)(```\n<!-- /example -->)", re.S)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?%?")


def run(command: str, root: Path) -> str:
    """What `command` (as the README writes it: env assignments, then `infl ...`) prints, run in
    `root` (where sample_configs/ and runs/demo are)."""
    words = shlex.split(command)
    env = dict(os.environ)
    while words and "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "infl", command
    result = subprocess.run(
        [sys.executable, "-m", "infl", *words[1:]], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def same(expected: str, got: str, rtol: float = 0.02) -> bool:
    """The same text, numbers within `rtol` (a table's layout is the same: compared word by word)."""
    a, b = expected.split(), got.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        nx, ny = NUMBER.fullmatch(x.strip("()=;,")), NUMBER.fullmatch(y.strip("()=;,"))
        if not (nx and ny):
            return False
        fx, fy = (float(n.group().replace(",", "").rstrip("%")) for n in (nx, ny))
        if not math.isclose(fx, fy, rel_tol=rtol, abs_tol=1e-9):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="exit 1 when an example drifted; write nothing")
    parser.add_argument("--root", type=Path, default=README.parent)
    args = parser.parse_args()
    text = README.read_text()
    drifted, out, at = [], [], 0
    for match in blocks(text):
        got = run(match["command"], args.root).rstrip("\n") + "\n"
        if not same(match["output"], got):
            drifted.append(match["command"])
        out += [text[at : match.start("output")], got]
        at = match.end("output")
    if args.check:
        for command in drifted:
            print(f"README example drifted: {command}", file=sys.stderr)
        return 1 if drifted else 0
    README.write_text("".join(out) + text[at:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
