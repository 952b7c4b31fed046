"""What an up-to-date rerun costs, as a process of its own (what make and cron pay): answered from
what the last run checked (infl.noop, before torch is imported) against the full check (an empty
$INFL_CACHE_DIR: nothing remembered, so the stage loads torch and transformers, fingerprints its
inputs and opens its parents), and `infl --version` (Python and the CLI's imports) as the floor.

    make demo
    python benchmarks/bench_noop.py [--repeat 5] [--readme]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import readme_block

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "sample_configs" / "demo.yaml"


def seconds(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "infl", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    took = time.perf_counter() - start
    if done.returncode or (args[0] != "--version" and "up to date" not in done.stderr):
        sys.exit(f"infl {' '.join(args)}: not an up-to-date no-op (run `make demo` first):\n{done.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    remembered = {k: v for k, v in os.environ.items() if k != "INFL_NO_MEMORY"}
    rows = [
        (
            "`infl --version` (the floor)",
            statistics.median(seconds(["--version"], remembered) for _ in range(args.repeat)),
            None,
        )
    ]
    for stage in ("fit-factors", "build-query", "score"):
        command = [stage, "--config", str(CONFIG)]
        seconds(command, remembered)  # the run that remembers
        fast = statistics.median(seconds(command, remembered) for _ in range(args.repeat))
        full = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as empty:
                full.append(seconds(command, {**remembered, "INFL_CACHE_DIR": empty}))
        rows.append((f"`{stage}` up to date", fast, statistics.median(full)))

    lines = [
        f"Embedded default (`make demo`), {platform.machine()}, Python {platform.python_version()}; "
        f"median of {args.repeat} processes each.",
        "",
        "| rerun | remembered (s) | full check (s) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {fast:.2f} | {'–' if full is None else f'{full:.2f}'} |" for name, fast, full in rows]
    lines += ["", f"`python benchmarks/bench_noop.py --repeat {args.repeat} --readme`"]
    readme_block.publish("noop", lines, args.readme)


if __name__ == "__main__":
    main()
