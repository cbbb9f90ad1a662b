"""Write the built-in ``local-cpu`` latency table by profiling, on this machine, the models that
``tools/bench_latency.py`` validates it on, at their benchmark batch sizes.

Usage:
    python tools/make_local_cpu_table.py                         # -> qinject/targets/local-cpu.json
    python tools/make_local_cpu_table.py --models digits_cnn -o /tmp/t.json --repeats 10
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import machine
from bench_latency import MODELS, make_case

OUTPUT = ROOT / "qinject" / "targets" / "local-cpu.json"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    parser.add_argument("--repeats", type=int, default=25, help="timed runs per kernel (the median is kept)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    from qinject.latency_table import LatencyTable
    from qinject.profiler import THREADS, fit_roofline, run_profile

    start = time.perf_counter()
    names = args.models.split(",")
    table = LatencyTable(
        "local-cpu", "measured", fit_roofline(args.warmup, args.repeats),
        description=(f"this repository's development machine through onnxruntime {ort.__version__} (CPU "
                     f"provider, {THREADS} intra-op threads, no spinning): each kernel's cost in a run (wall "
                     f"time of one more copy x its profiled share; qinject.profiler) for {', '.join(names)} (tools/make_local_cpu_table.py); other shapes fall back "
                     "to the fitted roofline. Profile your own machine with `qinject profile`"),
        source=(f"tools/make_local_cpu_table.py on {machine()}; onnxruntime {ort.__version__}, {THREADS} "
                f"intra-op threads; {datetime.date.today().isoformat()}"))
    with tempfile.TemporaryDirectory(prefix="make_local_cpu_table.") as tmp:
        for name in names:
            case = make_case(name, Path(tmp))
            run = run_profile(case.path, table, batch=case.batch, warmup=args.warmup, repeats=args.repeats,
                              feeds=case.feeds)
            print(f"{case.label}: {run.measured} entries measured, {run.reused} reused"
                  + (f"; failed: {run.failed}" if run.failed else ""), file=sys.stderr)
    table.save(args.output)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({len(table.entries)} entries, {size / 1e3:.0f} kB) in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
