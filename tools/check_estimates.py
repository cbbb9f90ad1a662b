"""Check qinject's latency estimates against measurements on this machine, model by model.

For each model (a bench case folder of ``tools/bench_realworld.py``'s work directory, which holds
``model.onnx``, ``calib/`` and ``eval/``, or a path to an ONNX file beside a ``calib/`` folder), it runs
``qinject quantize`` as a user does (the default plan, and ``--mode auto``), reads the estimate it prints
("estimated latency on local-cpu: X ms vs float Y ms"), then times the float model and the written one
interleaved (``qinject.runtime.measure.interleaved_latency``, one feed: the first evaluation sample, else
the first calibration one) and prints estimated vs measured ratio to float and whether the estimate holds:
within 25% of the measured ratio and on the same side of 1.0 (issue #16's rule, as bench_realworld counts it).

Usage:
    python tools/check_estimates.py torchvision_resnet50_dynamo nudenet --work /tmp/brw30 --out /tmp/chk
    python tools/check_estimates.py path/to/model.onnx --modes default --json /tmp/chk.json
    python tools/check_estimates.py nudenet --work /tmp/brw30 --quantize-args=--profile
    python tools/check_estimates.py nudenet --out /tmp/after --earlier /tmp/before   # before/after a change
    python tools/check_estimates.py nudenet --out /tmp/after --earlier /tmp/before --reuse   # time them again

Set ``QINJECT_TARGETS`` to a scratch folder with ``--profile``: the profiled table is cached there, not in
the user's own cache.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_realworld import ESTIMATE_TOLERANCE, parse_estimate  # noqa: E402

from qinject.runtime.measure import interleaved_latency  # noqa: E402

QINJECT = Path(sys.executable).with_name("qinject")
MODES = {"default": [], "auto": ["--mode", "auto"]}


def holds(est: float, measured: float) -> bool:
    """Issue #16's rule: within 25% of the measured ratio and on the same side of 1.0."""
    same_side = est == 1.0 or (est < 1.0) == (measured < 1.0)
    return abs(est / measured - 1.0) <= ESTIMATE_TOLERANCE and same_side


def locate(spec: str, work: Path) -> tuple[str, Path, Path, Path]:
    """(name, model, calibration folder, feed file) of a case name or a model path."""
    path = Path(spec)
    model = path if path.suffix == ".onnx" else (path if path.is_dir() else work / spec) / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"error: model {spec!r}: no file {model} (give a case of --work or an .onnx path)")
    folder = model.parent
    calib = folder / "calib"
    if not calib.is_dir():
        raise SystemExit(f"error: model {spec!r}: no calibration folder {calib} beside it")
    feeds = sorted((folder / "eval").glob("*.npz")) or sorted(calib.glob("*.npz"))
    if not feeds:
        raise SystemExit(f"error: model {spec!r}: no .npz feed in {folder / 'eval'} or {calib}")
    name = folder.name if model.name == "model.onnx" else model.stem
    return name, model, calib, feeds[0]


def check(name: str, model: Path, calib: Path, feed_file: Path, mode: str, out: Path, extra: list[str],
          budget_s: float, timeout_s: float, earlier: Path | None = None, reuse: bool = False) -> dict:
    written, log = out / f"{name}_{mode}.onnx", out / f"{name}_{mode}.log"
    plan = out / f"{name}_{mode}.plan.json"  # kept: the plan can be priced again without quantizing
    command = [str(QINJECT), "quantize", str(model), "-o", str(written), "--calib", str(calib), *MODES[mode],
               "--save-plan", str(plan), *extra]
    record = {"case": name, "mode": mode, "command": shlex.join(command)}
    if reuse and written.exists() and log.exists():  # timed again, as written before
        stdout = log.read_text()
    else:
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return record | {"error": f"quantize timed out after {timeout_s:.0f} s"}
        record["quantize_s"] = round(time.perf_counter() - start, 1)
        log.write_text(done.stdout + "\n--- stderr\n" + done.stderr)
        if done.returncode != 0 or not written.exists():
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            return record | {"error": last[0][:200]}
        stdout = done.stdout
    estimate = parse_estimate(stdout)
    if not estimate:
        return record | {"error": "no estimate line in quantize's output"}
    with np.load(feed_file) as data:
        feeds = {k: v[:1] for k, v in data.items() if k != "labels"}  # batch 1: the first sample
    models = [str(model), str(written)]
    before = _earlier(earlier, name, mode)
    if before:  # timed in the same rounds: the two outputs' ratios see the same load
        models.append(str(before["model"]))
    times = interleaved_latency(models, feeds, budget_s=budget_s)
    float_ms, quant_ms = times[:2]
    measured = quant_ms / float_ms
    record |= estimate | {"float_ms": float_ms, "quant_ms": quant_ms, "measured_ratio": measured,
                          "holds": holds(estimate["est_ratio"], measured)}
    if before:
        ratio = times[2] / float_ms
        record["earlier"] = {"est_ratio": before["est_ratio"], "measured_ratio": ratio,
                             "holds": holds(before["est_ratio"], ratio)}
    return record


def _earlier(folder: Path | None, name: str, mode: str) -> dict:
    """The model an earlier run of this tool wrote for this case and mode, with its printed estimate."""
    if folder is None:
        return {}
    model, log = folder / f"{name}_{mode}.onnx", folder / f"{name}_{mode}.log"
    if not model.exists() or not log.exists():
        return {}
    estimate = parse_estimate(log.read_text())
    return {"model": model, "est_ratio": estimate["est_ratio"]} if estimate else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="bench case names (folders of --work) or .onnx paths")
    parser.add_argument("--work", type=Path, default=Path("/tmp/brw30"), help="bench_realworld's work folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/check_estimates"), help="where outputs go")
    parser.add_argument("--modes", default="default,auto", help="comma list of: " + ", ".join(MODES))
    parser.add_argument("--quantize-args", default="", help="more arguments for qinject quantize (quoted)")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of interleaved timing per model")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per quantize run")
    parser.add_argument("--json", type=Path, help="also write the records here")
    parser.add_argument("--reuse", action="store_true",
                        help="time the models already in --out again (their logs give the estimates), "
                             "quantizing only the missing ones")
    parser.add_argument("--earlier", type=Path,
                        help="an earlier run's --out: its model of each case and mode is timed in the same "
                             "rounds and judged by the estimate it printed (before/after a change)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"error: --modes {unknown}: expected some of {sorted(MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    print(f"{'model':<40} {'mode':<8} {'est':>6} {'meas':>6} {'float ms':>9}  holds")
    for spec in args.models:
        name, model, calib, feed = locate(spec, args.work)
        for mode in modes:
            rec = check(name, model, calib, feed, mode, args.out, shlex.split(args.quantize_args),
                        args.budget, args.timeout, args.earlier, args.reuse)
            records.append(rec)
            if "error" in rec:
                print(f"{name:<40} {mode:<8} {'-':>6} {'-':>6} {'-':>9}  ({rec['error']})", flush=True)
                continue
            then = rec.get("earlier")
            print(f"{name:<40} {mode:<8} {rec['est_ratio']:>6.2f} {rec['measured_ratio']:>6.2f} "
                  f"{rec['float_ms']:>9.2f}  {'yes' if rec['holds'] else 'NO'}"
                  + (f"   earlier: est {then['est_ratio']:.2f} measured {then['measured_ratio']:.2f} "
                     f"{'yes' if then['holds'] else 'NO'}" if then else ""), flush=True)
    judged = [r for r in records if "holds" in r]
    print(f"estimate holds on {sum(r['holds'] for r in judged)} of {len(judged)} written models")
    earlier = [r["earlier"] for r in records if "earlier" in r]
    if earlier:
        print(f"the earlier run's estimate, timed in the same rounds: holds on "
              f"{sum(r['holds'] for r in earlier)} of {len(earlier)}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1, default=lambda x: None if math.isnan(x) else x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
