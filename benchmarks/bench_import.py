"""``import valent`` time, and a check that it imports neither dask nor paramiko.

    python benchmarks/bench_import.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compile_valent, report, row  # noqa: E402

PROBE = (
    "import time, sys; t = time.perf_counter(); import valent; "
    "print(time.perf_counter() - t, 'dask' in sys.modules, 'paramiko' in sys.modules)"
)


def run(repeats: int = 10) -> list[dict]:
    compile_valent()
    times, heavy = [], set()
    for _ in range(max(5, repeats)):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                             check=True).stdout.split()
        times.append(float(out[0]))
        if out[1] == "True":
            heavy.add("dask")
        if out[2] == "True":
            heavy.add("paramiko")
    # -X importtime lists every module import valent pulls in
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "import valent"],
                           capture_output=True, text=True, check=True).stderr
    for name in ("dask", "distributed", "paramiko"):
        if any(line.rstrip().endswith(f"| {name}") for line in trace.splitlines()):
            heavy.add(name)
    note = "imports " + ", ".join(sorted(heavy)) if heavy else "no dask, distributed, paramiko"
    return [row("import valent", statistics.median(times) * 1e3, "ms", goal_abs=150,
                note=note)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run(args.repeats)
    report(rows, args.json)


if __name__ == "__main__":
    main()
