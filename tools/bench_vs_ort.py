"""Benchmark qinject against onnxruntime's own static quantizer on the same models and calibration data.

Both tools quantize W8A8 (per-channel int8 weights, uint8 activations, QDQ, MinMax ranges) from
the same float file and calibration arrays, each in its own subprocess so that the peak RSS is that
tool's alone. Results go to stdout and to the ``bench_vs_ort`` section of ``BENCHMARKS.md``.

Usage:
    python tools/bench_vs_ort.py                      # every model
    python tools/bench_vs_ort.py --quick              # digits + squeezenet
    python tools/bench_vs_ort.py --models digits,resnet50 --workdir /tmp/bench   # keep the files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# qinject is imported inside the functions that use it, so the ORT child never loads it: its import
# alone is ~40 MiB of RSS (networkx, and sympy through onnx_ir) that would be charged to ORT.
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn"
sys.path.insert(0, str(ROOT))  # the model zoo lives in the repository, not in the package
from bench_common import machine, median_seconds, peak_rss_mib, source_state, write_section  # noqa: E402  (tools/ is on sys.path)

from models.light_zoo import materialize  # noqa: E402

LIGHT = ["squeezenet", "resnet50", "inception_v1", "shufflenet", "inception_v2", "densenet121",
         "bvlc_alexnet", "zfnet512", "vgg19"]
QUICK = ["digits", "squeezenet"]
SECTION = "bench_vs_ort"
THREADS, SEED, LIGHT_SAMPLES, ROUNDS, RUNS_PER_ROUND = 2, 0, 16, 10, 5
# The targets as (ratio, label, limit); the speedup is a floor, the others are ceilings.
TARGETS = [("time", "tool time qinject/ORT", 0.8), ("memory", "peak RSS qinject/ORT", 0.5),
           ("latency", "latency qinject/ORT", 1.0), ("speedup", "speedup fp32/qinject", 1.5)]


@dataclass
class Case:
    """One model to benchmark: its float file, calibration file and evaluation set."""

    name: str
    model: Path
    calib: Path  # .npz keyed by input name, first axis = samples
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    run_batch: int  # samples per run, calibration and evaluation alike (the light models' batch is 1)
    latency_batch: int


# --- the tools, each run in a child process ---------------------------------------------------------

def qinject_quantizer() -> Callable[[Path, Path, dict, int], dict]:
    import qinject
    from qinject.plan import Plan

    def quantize(model: Path, out: Path, arrays: dict, batch: int) -> dict:
        result = qinject.quantize_onnx(model, out, plan=Plan.uniform(8, 8), calib=arrays, batch_size=batch,
                                       progress=False)
        return {"passes": {name: s for name, s in result.timings}}
    return quantize


def ort_quantizer() -> Callable[[Path, Path, dict, int], dict]:
    from onnxruntime import quantization as oq

    class Reader(oq.CalibrationDataReader):
        def __init__(self, arrays: dict, batch: int) -> None:
            n = len(next(iter(arrays.values())))
            self._feeds = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    def quantize(model: Path, out: Path, arrays: dict, batch: int) -> dict:
        # ORT's docs recommend quant_pre_process (symbolic shape inference + basic graph optimisation,
        # which folds BatchNormalization); it is part of ORT's pipeline, so it is on the clock.
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            oq.quant_pre_process(str(model), f"{tmp}/pre.onnx")
            pre_process = time.perf_counter() - start
            oq.quantize_static(f"{tmp}/pre.onnx", str(out), Reader(arrays, batch),
                               quant_format=oq.QuantFormat.QDQ, per_channel=True,
                               calibrate_method=oq.CalibrationMethod.MinMax,
                               activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8)
        return {"passes": {"pre-process": pre_process}}
    return quantize


def child_main(tool: str, model: str, calib: str, out: str, batch: str) -> None:
    """Hidden sub-command: quantize once, print seconds, peak RSS and pass times as one JSON line."""
    quantize = {"qinject": qinject_quantizer, "ort": ort_quantizer}[tool]()  # imports stay off the clock
    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    start_mib, start = peak_rss_mib(), time.perf_counter()
    notes = quantize(Path(model), Path(out), arrays, int(batch))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib(), "start_mib": start_mib, **notes}))


def run_tool(tool: str, case: Case, out: Path) -> dict:
    """Quantize ``case`` with ``tool`` in a fresh interpreter; a failure is recorded, not raised."""
    cmd = [sys.executable, __file__, "_quantize", tool, str(case.model), str(case.calib), str(out),
           str(case.run_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """The fastest run, charged with the highest peak RSS seen (time is noisy, memory barely)."""
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    return {**min(runs, key=lambda r: r["seconds"]), "peak_mib": max(r["peak_mib"] for r in runs)}


# --- the models -------------------------------------------------------------------------------------

def digits_case() -> Case:
    with np.load(DIGITS / "eval.npz") as data:
        inputs, labels = {"input": data["input"]}, data["labels"]
    return Case("digits", DIGITS / "model.onnx", DIGITS / "calib.npz", inputs, labels, 256, 64)


def light_case(name: str, work: Path) -> Case:
    model = work / f"{name}.fp32.onnx"
    onnx.save(materialize(name, SEED, opset=13), str(model))
    (inp,) = onnx.load(str(model), load_external_data=False).graph.input
    images = np.random.default_rng(SEED).standard_normal((2 * LIGHT_SAMPLES, 3, 224, 224), dtype=np.float32)
    calib = work / f"{name}.calib.npz"
    np.savez(calib, **{inp.name: images[:LIGHT_SAMPLES]})
    return Case(name, model, calib, {inp.name: images[LIGHT_SAMPLES:]}, None, 1, 1)


# --- measurement ------------------------------------------------------------------------------------

def bench_case(case: Case, work: Path, tool_runs: int) -> dict[str, dict]:
    """Every measurement for one model: fp32, ORT and qinject."""
    runs: dict[str, list[dict]] = {"ort": [], "qinject": []}
    for _ in range(tool_runs):  # alternated, so a burst of load on the machine hits both tools
        for tool, results in runs.items():
            results.append(run_tool(tool, case, work / f"{case.name}.{tool}.onnx"))
    rows = {"fp32": {"path": case.model}, **{tool: best_of(r) for tool, r in runs.items()}}
    ok = {v: r for v, r in rows.items() if "error" not in r}
    for variant, row in ok.items():
        row.setdefault("path", work / f"{case.name}.{variant}.onnx")
        row.update(static_facts(row["path"], case))
    for variant, ms in latencies({v: r["path"] for v, r in ok.items()}, case).items():
        rows[variant]["latency_ms"] = ms
    for variant, row in ok.items():
        row["fidelity"] = fidelity(row["outputs"], rows["fp32"]["outputs"], case.labels, variant == "fp32")
    return rows


def fidelity(out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None, is_reference: bool) -> str:
    from qinject.runtime import measure

    parts = [f"acc {measure.top1_accuracy(out, labels):.2%}"] if labels is not None else []
    if not is_reference:
        parts += [f"SQNR {measure.sqnr_db(ref, out):.1f} dB",
                  f"top-1 agree {measure.top1_agreement(ref, out):.1%}"]
    return ", ".join(parts) or "reference"


def static_facts(path: Path, case: Case) -> dict:
    """Outputs on the evaluation set, file size and integer kernels of one model file."""
    from qinject.backends import onnx_backend
    from qinject.runtime import measure

    outputs = measure.predict(onnx_backend.session(path), case.inputs, batch=case.run_batch)
    kernels = measure.fused_kernels(path)
    return {"outputs": outputs.reshape(len(outputs), -1),
            "size_mb": sum(p.stat().st_size for p in (path, Path(f"{path}.data")) if p.exists()) / 1e6,
            "int_kernels": sum(n for op, n in kernels.items() if op in measure.INTEGER_KERNELS)}


def latencies(paths: dict[str, Path], case: Case) -> dict[str, float]:
    """Median ms per run of each model, with the same options, measured in interleaved rounds.

    Interleaving spreads any drift in the machine's load over all variants instead of one.
    """
    from qinject.backends import onnx_backend

    feeds = {k: v[:case.latency_batch] for k, v in case.inputs.items()}
    options = onnx_backend.session_options(threads=THREADS)
    # Spinning worker threads fight for the cores whenever anything else runs (other sessions, other
    # jobs): on a loaded 2-core machine the medians tripled and swapped order from run to run.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {variant: onnx_backend.session(path, options) for variant, path in paths.items()}
    # 5 warm-up runs: allocations, kernel selection
    return {v: t * 1e3 for v, t in median_seconds(sessions, feeds, 5, ROUNDS, RUNS_PER_ROUND).items()}


def ratios(rows: dict) -> dict[str, float | None]:
    q, o, f = rows["qinject"], rows["ort"], rows["fp32"]
    if "error" in q or "error" in o:
        return {key: None for key in ("time", "memory", "latency", "speedup", "ort_speedup")}
    return {"time": q["seconds"] / o["seconds"], "memory": q["peak_mib"] / o["peak_mib"],
            "latency": q["latency_ms"] / o["latency_ms"], "speedup": f["latency_ms"] / q["latency_ms"],
            "ort_speedup": f["latency_ms"] / o["latency_ms"]}


# --- report -----------------------------------------------------------------------------------------

def verdict(key: str, value: float | None, limit: float | None) -> str:
    """The ratio, and whether it meets its target (none when ``limit`` is None)."""
    if value is None:
        return "n/a"
    if limit is None:
        return f"{value:.2f}x"
    shown = round(value, 2)  # judged at the printed precision: 1.004x is noise, not a miss
    met = shown >= limit if key == "speedup" else shown <= limit
    return f"{value:.2f}x {'met' if met else '**not met**'}"


def measurement_table(results: dict[str, dict]) -> list[str]:
    columns = ["model", "variant", "tool time s", "peak RSS MiB (before)", "latency ms", "size MB",
               "int8 kernels", "fidelity vs fp32"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for model, rows in results.items():
        for variant, r in rows.items():
            if "error" in r:
                lines.append(f"| {model} | {variant} | failed: {r['error']} | | | | | |")
                continue
            tool = (f"{r['seconds']:.2f} | {r['peak_mib']:.0f} ({r['start_mib']:.0f})" if "seconds" in r
                    else "— | —")
            lines.append(f"| {model} | {variant} | {tool} | {r['latency_ms']:.2f} | {r['size_mb']:.2f} "
                         f"| {r['int_kernels']} | {r['fidelity']} |")
    return lines


def target_table(results: dict[str, dict]) -> list[str]:
    heads = " | ".join(f"{label} ({'≥' if key == 'speedup' else '≤'} {limit}x)"
                       for key, label, limit in TARGETS)
    lines = [f"| model | {heads} | speedup fp32/ORT |", "|---|" + "---|" * (len(TARGETS) + 1)]
    for model, rows in results.items():
        r = ratios(rows)
        # The speedup target is for the light zoo's conv nets; digits shows its speedup only.
        cells = [verdict(key, r[key], None if key == "speedup" and model == "digits" else limit)
                 for key, _, limit in TARGETS]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {verdict('', r['ort_speedup'], None)} |")
    return lines


def step_times(results: dict[str, dict]) -> list[str]:
    lines = ["Where the tool time goes (s, best run; steps under 0.01 s left out):", ""]
    for model, rows in results.items():
        steps = {tool: ", ".join(f"{p} {s:.2f}" for p, s in rows[tool].get("passes", {}).items() if s >= 0.01)
                 for tool in ("ort", "qinject")}
        lines.append(f"- {model}: qinject: {steps['qinject'] or '-'}; ORT: {steps['ort'] or '-'}")
    return lines


def header(argv: list[str], loads: tuple[float, float], tool_runs: int,
           sources: tuple[str, str]) -> list[str]:
    import qinject

    # Commits that touch only tests or docs do not matter; a change of the sources does.
    same = sources[0].split("sources ")[-1] == sources[1].split("sources ")[-1]
    changed = "" if same else f" **changed during the run** (now {sources[1]})"
    command = shlex.join(["python", "tools/bench_vs_ort.py", *argv])
    return [
        "## qinject vs onnxruntime's static quantizer (`tools/bench_vs_ort.py`)", "",
        (f"- date: {datetime.date.today().isoformat()}; machine: {machine()}; 1-min load average at "
         f"start/end {loads[0]:.1f}/{loads[1]:.1f} (other jobs on the machine make the timings noisier)"),
        (f"- versions: onnxruntime {ort.__version__}, qinject {qinject.__version__} ({sources[0]}{changed}), "
         f"onnx {onnx.__version__}, numpy {np.__version__}, Python {platform.python_version()}"),
        f"- reproduce: `{command}`",
        ("- both tools: W8A8, per-channel int8 weights, uint8 activations, QDQ, MinMax, same float file and "
         "calibration arrays. ORT: `quant_pre_process` (its docs recommend it; it ran on every model), then "
         "`quantize_static(quant_format=QDQ, per_channel=True, calibrate_method=MinMax, "
         "activation_type=QUInt8, weight_type=QInt8)` fed by a `CalibrationDataReader`. "
         "qinject: `quantize_onnx(plan=Plan.uniform(8, 8))`."),
        (f"- tool time: float file to written file (ORT's includes its pre-process), best of {tool_runs} "
         "alternated runs, each in a fresh subprocess that loads its imports and the calibration arrays "
         "before the clock starts. Peak RSS: the child's `VmHWM` (not `ru_maxrss`, which on Linux inherits "
         "the parent's RSS at fork); in brackets, its RSS before quantizing (interpreter, imports, data)."),
        (f"- latency: onnxruntime CPU, ORT_ENABLE_ALL, intra_op_num_threads={THREADS}, no spinning, median "
         f"of {ROUNDS * RUNS_PER_ROUND} runs after 5 warm-up runs, fp32/ORT/qinject interleaved; digits at "
         "batch 64, light models at batch 1. int8 kernels: QLinear*/QGemm/integer ops in onnxruntime's "
         "optimised graph."),
        ("- digits: `calib.npz` (256 images), `eval.npz` (450, labelled). Light zoo: He-normal weights, zero "
         f"biases, identity BN, trailing Softmax dropped, converted to opset 13 (seed {SEED}); "
         f"{LIGHT_SAMPLES} random-normal calibration images and {LIGHT_SAMPLES} others for evaluation; "
         "fidelity is output SQNR and top-1 agreement vs fp32."),
    ]


def main(argv: list[str]) -> None:
    if argv[:1] == ["_quantize"]:
        return child_main(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: digits,{','.join(LIGHT)}")
    parser.add_argument("--quick", action="store_true", help=f"only {' + '.join(QUICK)}")
    parser.add_argument("--tool-runs", type=int, default=2, help="runs of each tool per model (best kept)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--workdir", type=Path, help="keep the float, calibration and quantized files here")
    args = parser.parse_args(argv)
    names = QUICK if args.quick else args.models.split(",") if args.models else ["digits", *LIGHT]
    if unknown := [n for n in names if n != "digits" and n not in LIGHT]:
        parser.error(f"unknown model(s) {unknown}; choose from digits,{','.join(LIGHT)}")
    load_start, sources_start, results = os.getloadavg()[0], source_state(), {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_ort.") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            case = digits_case() if name == "digits" else light_case(name, work)
            results[name] = bench_case(case, work, args.tool_runs)
    head = header(argv, (load_start, os.getloadavg()[0]), args.tool_runs, (sources_start, source_state()))
    report = "\n".join([*head, "", *measurement_table(results), "", *target_table(results), "",
                        *step_times(results)])
    print(report)
    write_section(args.output, SECTION, report)


if __name__ == "__main__":
    main(sys.argv[1:])
