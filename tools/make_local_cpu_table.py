"""Write the built-in ``local-cpu`` latency table by profiling, on this machine, the models that
``tools/bench_latency.py`` validates it on, at their benchmark batch sizes (three passes, the median of each entry).

Usage:
    python tools/make_local_cpu_table.py                         # -> qinject/cost/targets/local-cpu.json
    python tools/make_local_cpu_table.py --models digits_cnn -o /tmp/t.json --repeats 10 --passes 1
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import machine
from bench_latency import MODELS, make_case

OUTPUT = ROOT / "qinject" / "cost" / "targets" / "local-cpu.json"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    parser.add_argument("--repeats", type=int, default=25, help="timed runs per kernel (the median is kept)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3, help="profile everything this many times; keep medians")
    args = parser.parse_args(argv)
    from qinject.latency_table import Entry, LatencyTable
    from qinject.runtime.profiler import THREADS, fit_roofline, run_profile

    start = time.perf_counter()
    names = args.models.split(",")
    table = LatencyTable(
        "local-cpu", "measured", fit_roofline(args.warmup, args.repeats),
        description=(f"this repository's development machine through onnxruntime {ort.__version__} (CPU "
                     f"provider, {THREADS} intra-op threads, no spinning): each kernel's cost in a run "
                     f"(qinject.profiler), median of {args.passes} passes over {', '.join(names)} "
                     "(tools/make_local_cpu_table.py); other shapes fall back to the fitted roofline. Profile "
                     "your own machine with `qinject profile`"),
        source=(f"tools/make_local_cpu_table.py on {machine()}; onnxruntime {ort.__version__}, {THREADS} "
                f"intra-op threads; {datetime.date.today().isoformat()}"))
    # Other jobs on the machine come and go: each pass profiles every model afresh, and each entry is the
    # median over the passes, so a burst of load during one pass does not set the table.
    passes: list[LatencyTable] = []
    with tempfile.TemporaryDirectory(prefix="make_local_cpu_table.") as tmp:
        cases = [make_case(name, Path(tmp)) for name in names]
        for i in range(args.passes):
            passes.append(LatencyTable(table.target, table.kind, table.roofline))
            for case in cases:
                run = run_profile(case.path, passes[-1], batch=case.batch, warmup=args.warmup, repeats=args.repeats,
                                  feeds=case.feeds)
                print(f"pass {i + 1}/{args.passes}, {case.label}: {run.measured} entries measured, {run.reused} "
                      f"reused" + (f"; failed: {run.failed}" if run.failed else ""), file=sys.stderr)
    for key in passes[0].entries:
        times = [p.entries[key].latency_us for p in passes if key in p.entries]
        op, shape, w_bits, a_bits, mode = key
        table.add(Entry(op, shape, w_bits, a_bits, round(float(np.median(times)), 3), mode))
    table.save(args.output)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({len(table.entries)} entries, {size / 1e3:.0f} kB) in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
