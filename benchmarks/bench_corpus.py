"""Reading and tokenising corpora as they ship (issue #24): memory and throughput of
`data.read_corpus`, the reader every stage uses, on synthetic corpora made from the demo's passages.

    python benchmarks/bench_corpus.py [--sizes 10000 100000] [--before OLD_CHECKOUT] [--readme]

For each size and format (JSONL, Parquet in row groups of 10,000), one fresh process loads the
demo's tokenizer, then reads the corpus: its peak RSS above the process after loading the
tokenizer (VmHWM, reset just before, so the bytes per token include every transient), the time,
and sequences and tokens per second. `--before` measures another checkout's reader (an older commit) on the same
files, beside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import readme_block

from infl.demo import build_demo

MEASURE = """
import json, os, sys, time
from pathlib import Path
if os.environ.get("BENCH_INFL_SOURCE"):  # another checkout's infl, ahead of the editable install's finder
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
    sys.path.insert(0, os.environ["BENCH_INFL_SOURCE"])
from infl import data, modeling
def rss(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
tokenizer = modeling.load_tokenizer(Path(sys.argv[1]))
tokenizer("warm up")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is resident now
before = rss("VmRSS:")
start = time.perf_counter()
corpus = data.read_corpus([Path(sys.argv[2])], tokenizer, 128)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "extra_bytes": rss("VmHWM:") - before, "n": len(corpus.ids),
                  "tokens": sum(map(len, corpus.tokens)), "source": data.__file__}))
"""


def write_corpora(demo: Path, out: Path, n: int) -> dict[str, Path]:
    """The demo's passages repeated to n sequences (ids s0..), as JSONL and as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    passages = [json.loads(line)["text"] for line in (demo / "corpus.jsonl").read_text().splitlines()]
    rows = [{"id": f"s{i}", "text": passages[i % len(passages)]} for i in range(n)]
    jsonl = out / f"c{n}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = out / f"c{n}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=10_000)
    return {"JSONL": jsonl, "Parquet": parquet}


def measure(demo: Path, path: Path, source: Path | None) -> dict | str:
    """One fresh process's reading of `path` (with another checkout's infl: `source`), or why it refused."""
    env = dict(os.environ, BENCH_INFL_SOURCE=str(source.resolve())) if source else None
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(demo / "model"), str(path)], capture_output=True, text=True, env=env
    )
    if run.returncode:
        return "refused: " + run.stderr.strip().splitlines()[-1][-70:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/corpus"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--before", type=Path, default=None, help="another checkout of infl, measured beside")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo = build_demo(args.demo)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {"": None}
    if args.before is not None:
        commit = subprocess.run(
            ["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        sources[f" (infl {commit.stdout.strip()})"] = args.before
    lines = [
        f"`data.read_corpus` with the demo's tokenizer, truncation at 128 tokens; torch CPU, {platform.machine()}.",
        "",
        "| sequences | format | file (MB) | tokens | read and tokenised (s) | sequences / s | tokens / s | peak RSS added (MB) | bytes per token |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.sizes:
        for fmt, path in write_corpora(demo, args.out, n).items():
            for label, source in sources.items():
                m = measure(demo, path, source)
                head = f"| {n:,} | {fmt}{label} | {path.stat().st_size / 1e6:.1f} |"
                if isinstance(m, str):
                    lines.append(f"{head} {m} | | | | | |")
                else:
                    lines.append(
                        f"{head} {m['tokens']:,} | {m['seconds']:.1f} | {n / m['seconds']:,.0f} | "
                        f"{m['tokens'] / m['seconds']:,.0f} | {m['extra_bytes'] / 1e6:.0f} | "
                        f"{m['extra_bytes'] / m['tokens']:.1f} |"
                    )
                print(lines[-1], flush=True)
    readme_block.publish("corpus", lines, args.readme)


if __name__ == "__main__":
    main()
