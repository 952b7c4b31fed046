"""Run `infl ARGS` and write this process's peak RSS (VmHWM, in bytes) as it exits, into
$INFL_PEAK_DIR/peak.<RANK>: under torchrun each rank writes its own.

    INFL_PEAK_DIR=/tmp/p python benchmarks/peak.py score ...
    INFL_PEAK_DIR=/tmp/p python -m torch.distributed.run --nproc-per-node=2 benchmarks/peak.py score ...

VmHWM is the high-water mark of the memory this process runs (Linux resets it at exec), where a
child's ru_maxrss would also count the process it was forked from.
"""

import os
import runpy
import sys

sys.argv = ["infl", *sys.argv[1:]]
try:
    runpy.run_module("infl", run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    with open(os.path.join(os.environ["INFL_PEAK_DIR"], f"peak.{os.environ.get('RANK', '0')}"), "w") as f:
        f.write(str(peak))
