"""Validate the latency model: estimated vs measured onnxruntime latency on the local CPU.

For each model and each of at least ten plans (uniform float, W8A8, W16A16, W4A8, and mixed plans),
the model is quantized for real (``qinject.quantize_onnx`` with calibration data) and its end-to-end
onnxruntime latency measured (medians of interleaved rounds, the profiler's session options), then
compared with ``qinject.cost.estimate`` on the ``local-cpu`` table (or ``--table``). Reports the
Spearman rank correlation and the mean absolute percentage error per model and pooled, and times
``qinject profile`` on SqueezeNet from an empty cache and again with the cache. Results go to stdout
and to the ``bench_latency`` section of ``BENCHMARKS.md``.

Usage:
    python tools/bench_latency.py                     # every model, the built-in local-cpu table
    python tools/bench_latency.py --models digits_cnn --table /tmp/t.json --no-profile-timing
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model zoos live in the repository, not in the package
from bench_common import machine, median_seconds, source_state, write_section

SECTION = "bench_latency"
SPEARMAN_TARGET, PROFILE_TARGET_S = 0.9, 60.0
ROUNDS, RUNS_PER_ROUND, WARMUP = 20, 5, 5
MODELS = ("digits_cnn", "digits_mlp", "text_transformer", "squeezenet")
# What the per-kernel profiles of the quantized models showed where estimate and measurement part
# (found with onnxruntime's per-node profiling of the whole quantized models; see the docstring of
# qinject/runtime/profiler.py for how entries are measured).
FINDINGS = [
    "Where the estimate misses, and why (per-kernel profiles of the quantized models):",
    "",
    ("1. **Fixed in this issue, found by this benchmark**: a Concat of quantized tensors read quantized is "
     "one `QLinearConcat` (now priced on the integers, without conversions); the rewrite no longer quantizes "
     "the output of a 4- or 16-bit node for a MaxPool (onnxruntime ran it as a uint8 NCHW kernel 20-50x slower "
     "than float), and quantizes Gemm/MatMul + ReLU outputs so onnxruntime fuses them (unfused, a W8A8 layer "
     "cost more than a float one); the per-run overhead of `session.run` is in the table. Over three runs "
     "after these fixes, Spearman was 0.84-0.95 on the text transformer, 0.87-0.88 on SqueezeNet, 0.97-0.98 "
     "on the digits CNN and 0.77-0.79 on the MLP (one run before them: 0.87, 0.82, 0.99, 0.79)."),
    ("2. **onnxruntime moves a QuantizeLinear in front of a MaxPool** (its QDQ propagation) when the MaxPool's "
     "input comes from a float layer: SqueezeNet's first MaxPool after a float first conv then runs as a uint8 "
     "NCHW kernel, 4.1 ms against 0.12 ms in float (per-kernel profile of the 'ends float' plan). The estimate "
     "prices it as a float MaxPool, so plans with a float first layer are 40-60% low: the remaining SqueezeNet "
     "misses. The key `(MaxPool, shape, 0, 8)` cannot tell that layout from the fast NHWC one after a "
     "QLinearConv; a layout context in the key, or a rewrite that keeps onnxruntime from propagating the Q, "
     "is left for the search issue (#6), which is where mixed plans matter."),
    ("3. **Tiny models**: the digits MLP runs in 50-200 us; thread-pool wake-ups (~30 us with 2 threads and no "
     "spinning, once a run, only when a kernel goes parallel) and timer noise are a large share, and its 12 "
     "plans span few distinct latencies, so its rank correlation is the most fragile."),
    ("4. **Noise**: the machine is shared (2 cores); between runs of this script the same plan's median moves "
     "by up to 30%, and the table, profiled at another time, moves with the load then (three passes, medians, "
     "soften this). Rank correlations within a model are measured in one interleaved session and suffer less."),
]


@dataclass
class Case:
    """One model of the validation: its float file, batch, calibration data and a latency feed."""

    name: str
    path: Path
    batch: int
    calib: dict[str, np.ndarray]  # first axis = samples, a multiple of ``batch``
    feeds: dict[str, np.ndarray]  # one batch

    @property
    def label(self) -> str:
        return f"{self.name} (batch {self.batch})"


def make_case(name: str, work: Path) -> Case:
    """Write ``name``'s float ONNX file into ``work`` (the bundled file for digits_cnn)."""
    if name == "digits_cnn":
        calib = dict(np.load(ROOT / "models" / "digits_cnn" / "calib.npz"))
        return Case(name, ROOT / "models" / "digits_cnn" / "model.onnx", 64, calib,
                    {k: v[:64] for k, v in calib.items()})
    if name == "squeezenet":
        from models.light_zoo import materialize

        path = work / "squeezenet.onnx"
        model = materialize("squeezenet", 0, opset=13)
        onnx.save(model, str(path))
        images = np.random.default_rng(0).standard_normal((9, 3, 224, 224), dtype=np.float32)
        inp = model.graph.input[0].name
        return Case(name, path, 1, {inp: images[:8]}, {inp: images[8:]})
    import qinject
    from models import zoo

    batch = 64 if name == "digits_mlp" else 16
    model = zoo.load(name)
    path = work / f"{name}.onnx"
    qinject.export_onnx(qinject.trace_jax(model.forward, model.params, model.example_input(batch)), path)
    inp = onnx.load(str(path), load_external_data=False).graph.input[0].name
    samples = model.calib_inputs[: len(model.calib_inputs) // batch * batch]
    return Case(name, path, batch, {inp: samples}, {inp: model.example_input(batch)})


# --- plans -----------------------------------------------------------------------------------------------
def plans_for(nodes: list[str]) -> dict[str, object]:
    """At least ten plans: the uniform ones, then mixed plans over the quantizable ``nodes``."""
    from qinject.plan import NodeQuant, Plan

    q = {b: NodeQuant(weights=b[0], activations=b[1]) for b in ((8, 8), (16, 16), (4, 8))}
    choices = [None, q[(16, 16)], q[(8, 8)], q[(4, 8)]]

    def mixed(pick: Callable[[int, str], NodeQuant | None]) -> Plan:
        return Plan(None, {n: pick(i, n) for i, n in enumerate(nodes)})

    last = len(nodes) - 1
    rng = [np.random.default_rng(seed) for seed in range(4)]
    half = [set(r.permutation(nodes)[: len(nodes) // 2]) for r in rng[:2]]
    return {
        "float": Plan(None), "W8A8": Plan.uniform(8, 8), "W16A16": Plan.uniform(16, 16), "W4A8": Plan.uniform(4, 8),
        "ends float, rest W8A8": mixed(lambda i, n: None if i in (0, last) else q[(8, 8)]),
        "ends W8A8, rest float": mixed(lambda i, n: q[(8, 8)] if i in (0, last) else None),
        "alternating W8A8/W16A16": mixed(lambda i, n: q[(8, 8)] if i % 2 == 0 else q[(16, 16)]),
        "alternating W8A8/float": mixed(lambda i, n: q[(8, 8)] if i % 2 == 0 else None),
        "half float (seed 0), rest W8A8": mixed(lambda i, n: None if n in half[0] else q[(8, 8)]),
        "half W16A16 (seed 1), rest W8A8": mixed(lambda i, n: q[(16, 16)] if n in half[1] else q[(8, 8)]),
        "random per node (seed 2)": mixed(lambda i, n: choices[rng[2].integers(4)]),
        "random per node (seed 3)": mixed(lambda i, n: choices[rng[3].integers(4)]),
    }


# --- measuring and estimating --------------------------------------------------------------------------
def quantize_all(case: Case, plans: dict, work: Path) -> dict[str, Path]:
    import qinject

    paths = {}
    for label, plan in plans.items():
        if plan.default is None and not plan.nodes:
            paths[label] = case.path
            continue
        out = work / f"{case.name}.{len(paths)}.onnx"
        qinject.quantize_onnx(case.path, out, plan=plan, calib=case.calib, batch_size=case.batch, progress=False)
        paths[label] = out
    return paths


def measure_all(paths: dict[str, Path], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Median us per run of each file: same options as the profiler, rounds interleaved."""
    from qinject.runtime.profiler import session_options

    sessions = {k: ort.InferenceSession(str(p), session_options(), providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    return {k: v * 1e6 for k, v in median_seconds(sessions, feeds, WARMUP, ROUNDS, RUNS_PER_ROUND).items()}


def estimate_all(case: Case, plans: dict, table) -> dict[str, object]:
    from qinject.passes import FoldConstants, FoldConvAffine

    from qinject.core.pass_manager import PassManager
    from qinject.cost.estimate import estimate
    from qinject.frontends.onnx_frontend import load_onnx

    folded = PassManager([FoldConstants(), FoldConvAffine()]).run(load_onnx(case.path)).model
    return {label: estimate(folded, plan, table, case.batch, baselines=False) for label, plan in plans.items()}


def bench_model(case: Case, table, work: Path) -> list[dict]:
    from qinject.core import ir as qir
    from qinject.frontends.onnx_frontend import load_onnx

    nodes = [n.name for n in qir.quantizable_nodes(load_onnx(case.path))]
    plans = plans_for(nodes)
    measured = measure_all(quantize_all(case, plans, work), case.feeds)
    reports = estimate_all(case, plans, table)
    rows = []
    for label in plans:
        report = reports[label]
        rows.append({"model": case.label, "plan": label, "measured_us": measured[label],
                     "estimated_us": report.total_us, "conversion_us": report.conversion_us,
                     "roofline_nodes": sum(1 for n in report.nodes if n.source != "measured"
                                           and not n.source.startswith("fused"))})
    return rows


# --- statistics and report ------------------------------------------------------------------------------
def stats(rows: list[dict]) -> tuple[float, float]:
    from scipy.stats import spearmanr

    est = np.array([r["estimated_us"] for r in rows])
    meas = np.array([r["measured_us"] for r in rows])
    rho = float(spearmanr(est, meas).statistic) if len(rows) > 2 else float("nan")
    return rho, float(np.mean(np.abs(est - meas) / meas) * 100)


def results_tables(rows: list[dict]) -> list[str]:
    lines = ["| model | Spearman ρ (≥ 0.9) | MAPE | plans |", "|---|---|---|---|"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in [*models, "pooled"]:
        sub = rows if model == "pooled" else [r for r in rows if r["model"] == model]
        rho, mape = stats(sub)
        met = "met" if round(rho, 2) >= SPEARMAN_TARGET else "**not met**"
        lines.append(f"| {model} | {rho:.3f} {met} | {mape:.1f}% | {len(sub)} |")
    lines += ["", "| model | plan | measured ms | estimated ms | error | of which conversions ms |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["estimated_us"] - r["measured_us"]) / r["measured_us"]
        lines.append(f"| {r['model']} | {r['plan']} | {r['measured_us'] / 1e3:.3f} | {r['estimated_us'] / 1e3:.3f} "
                     f"| {err:+.0%} | {r['conversion_us'] / 1e3:.3f} |")
    return lines


def profile_timing(work: Path) -> dict[str, float]:
    """Wall time of ``qinject profile`` on SqueezeNet, empty cache then cached (fresh processes)."""
    case = make_case("squeezenet", work)
    out = work / "squeezenet.table.json"
    times = {}
    for run in ("empty cache", "cached"):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qinject.cli", "profile", str(case.path), "--target",
                               "bench-cpu", "-o", str(out), "--no-progress"], capture_output=True, text=True,
                              check=False)
        times[run] = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"qinject profile failed: {proc.stderr.strip()}")
        times[f"{run} output"] = proc.stdout.strip().splitlines()[-1].split(";")[0]  # without the temporary path
    from qinject.frontends.onnx_frontend import load_onnx

    times["nodes"] = len(list(load_onnx(case.path).graph))
    times["entries"] = len(json.loads(out.read_text())["entries"])
    return times


def header(argv: list[str], table, loads: tuple[float, float], sources: str) -> list[str]:
    return [
        "## Latency model vs onnxruntime on the local CPU (`tools/bench_latency.py`)", "",
        (f"- date: {datetime.date.today().isoformat()}; machine: {machine()}; 1-min load average at start/end "
         f"{loads[0]:.1f}/{loads[1]:.1f} (the machine is shared: timings are noisy)"),
        f"- versions: onnxruntime {ort.__version__}, {sources}, Python {platform.python_version()}",
        f"- reproduce: `{shlex.join(['python', 'tools/bench_latency.py', *argv])}`",
        f"- table: `{table.target}` ({table.kind}, {len(table.entries)} entries): {table.description}",
        ("- measured: each plan quantized by `qinject.quantize_onnx` (MinMax calibration: digits_cnn's calib.npz, "
         "the zoo's calibration split, 8 random images for SqueezeNet), onnxruntime CPU, ORT_ENABLE_ALL, "
         f"2 intra-op threads, no spinning; median of {ROUNDS * RUNS_PER_ROUND} runs after {WARMUP} warm-up "
         "runs, all plans of a model interleaved round by round"),
        ("- estimated: `qinject.cost.estimate(folded float model, plan, table, batch)`; mixed plans: first and "
         "last quantizable node float (or W8A8) and the rest the other way, alternating choices in graph "
         "order, half the nodes chosen by a seeded RNG, and a random choice per node among "
         "float/W16A16/W8A8/W4A8"),
    ]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--table", default="local-cpu", help="latency table: target name or path")
    parser.add_argument("--no-profile-timing", action="store_true", help="skip timing `qinject profile`")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    from qinject.latency_table import load_target

    table = load_target(args.table)
    load_start, sources, rows = os.getloadavg()[0], source_state(), []
    with tempfile.TemporaryDirectory(prefix="bench_latency.") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows += bench_model(make_case(name, work), table, work)
        timing = None if args.no_profile_timing else profile_timing(work)
    lines = [*header(argv, table, (load_start, os.getloadavg()[0]), sources), "", *results_tables(rows)]
    if timing is not None:
        met = "met" if timing["empty cache"] < PROFILE_TARGET_S else "**not met**"
        lines += ["", (f"`qinject profile` on SqueezeNet ({timing['nodes']} nodes, batch 1, bits 32/32, 16/16, 8/8, "
                       f"4/8; {timing['entries']} entries), wall time of the command in a fresh process (target "
                       f"< {PROFILE_TARGET_S:.0f} s):"), "",
                  f"- empty cache: {timing['empty cache']:.1f} s ({met}): {timing['empty cache output']}",
                  f"- cached (second run, same `-o`): {timing['cached']:.1f} s: {timing['cached output']}"]
    report = "\n".join([*lines, "", *FINDINGS])
    print(report)
    if not args.dry_run:
        write_section(args.output, SECTION, report)


if __name__ == "__main__":
    main(sys.argv[1:])
