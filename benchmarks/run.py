"""Run every benchmark family and print one table (and write JSON).

    python benchmarks/run.py                      # everything, default repeats
    python benchmarks/run.py --only local,import  # some families
    python benchmarks/run.py --repeats 3 --json out.json

Families: import, local, scale, dask, ssh, cli, nest. Each pairs valent with its baseline in the
same run (interleaved) and reports medians and ratios against the goals of the issues.
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
    "import": ("bench_import", {}),
    "local": ("bench_local", {}),
    "scale": ("bench_scale", {}),
    "dask": ("bench_dask", {}),
    "ssh": ("bench_ssh", {}),
    "cli": ("bench_cli_cancel", {}),
    "nest": ("bench_nest", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    args = ap.parse_args()
    os.environ.setdefault("VALENT_RESULTS_DIR", tempfile.mkdtemp(prefix="valent-bench-"))
    rows: list[dict] = []
    failed = []
    for name in args.only.split(","):
        name = name.strip()
        if name not in FAMILIES:
            ap.error(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
        module_name, kwargs = FAMILIES[name]
        print(f"== {name} ({module_name}) ...", flush=True)
        t = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            got = module.run(args.repeats, **kwargs)
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
