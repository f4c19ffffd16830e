"""Run every benchmark family and print one table (and write JSON).

    python benchmarks/run.py                      # every family but the opt-in ones
    python benchmarks/run.py --all                # and the opt-in ones (scale-1m)
    python benchmarks/run.py --only local,import  # some families
    python benchmarks/run.py --repeats 5 --json out.json

Families (issue 17's goals, each with its baseline measured in the same run):

- import: ``import valent`` time, and that it pulls in neither dask nor paramiko.
- local: fan-out 1,000 and 5,000, chain 1,000 vs a warm ``ProcessPoolExecutor(2)`` (fork),
  medians of interleaved repeats; Local cancel latency p95 over 50 runs.
- interactive: ``dispatch_sync`` of a one-node lattice p95; ``valent list`` with 10,000
  dispatches in the store.
- scale: 100,000-node layered lattice (and fan) vs the same no-op calls on the pool, peak
  memory.
- scale-1m (opt-in, a few minutes): 1,000,000-node fan-out build+dispatch, memory, cancel.
- dask: fan-out (finish and kill mode) and chain vs raw ``client.submit`` + ``gather`` on
  the same cluster; kill-mode cancel latency p95 over 50 runs.
- ssh: SSH executor on a loopback sshd; cancel latency p95 over 50 runs.
- cli: ``valent cancel`` from another process.
- nest: sublattices (see bench_nest.py).

Benchmarks are not tests: run them by hand on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import print_table  # noqa: E402

FAMILIES = {
    "import": ("bench_import", "run", {}),
    "local": ("bench_local", "run", {}),
    "interactive": ("bench_interactive", "run", {}),
    "scale": ("bench_scale", "run", {}),
    "scale-1m": ("bench_scale", "run_huge", {}),
    "dask": ("bench_dask", "run", {}),
    "ssh": ("bench_ssh", "run", {}),
    "cli": ("bench_cli_cancel", "run", {}),
    "nest": ("bench_nest", "run", {}),
}
OPT_IN = {"scale-1m"}
"""Families that run only when named in --only, or with --all (they take minutes)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=",".join(f for f in FAMILIES if f not in OPT_IN),
                    help="comma-separated families")
    ap.add_argument("--all", action="store_true", help="every family, the opt-in ones too")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    args = ap.parse_args()
    os.environ.setdefault("VALENT_RESULTS_DIR", tempfile.mkdtemp(prefix="valent-bench-"))
    rows: list[dict] = []
    failed = []
    names = list(FAMILIES) if args.all else args.only.split(",")
    for name in names:
        name = name.strip()
        if name not in FAMILIES:
            ap.error(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
        module_name, entry, kwargs = FAMILIES[name]
        print(f"== {name} ({module_name}) ...", flush=True)
        t = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            got = getattr(module, entry)(args.repeats, **kwargs)
            if hasattr(module, "table_rows"):
                got = module.table_rows(got)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for r in got:
            r.setdefault("family", name)
        rows.extend(got)
        print(f"   {len(got)} rows in {time.perf_counter() - t:.0f} s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, f, indent=2)
    print_table(rows)
    print(f"wrote {args.json}")
    if failed:
        print(f"families that failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
