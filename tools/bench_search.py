"""Mixed-precision search benchmark (issue #6): every search algorithm on every built-in target.

For each model (the zoo nets, magika, and SqueezeNet from the light model zoo) the quant-error
sensitivity runs once on the calibration split; then each search (bisection, greedy, ILP, Pareto)
picks per-node widths for each built-in latency table within a 1% relative budget of the metric
on the held-out split (top-1 accuracy with labels; top-1 agreement with the float model without).
Reported per search: full-model evaluations (the float reference included), metric drop, estimated
latency saving vs uniform W16A16 and vs float. Side by side on the same data: uniform W8A8 and
W4A8 (qinject, round to nearest and with AdaRound), and onnxruntime's ``quantize_static`` (W8A8
QDQ, per channel, MinMax). The checks the issue states are evaluated per model and target:
mixed precision saves at least what uniform W8A8 saves wherever W8A8 meets the budget, and meets
the budget wherever uniform W4A8 does not.

Zoo nets are evaluated traced at batch 64 and priced traced at ``--latency-batch`` (default
4096: the accelerator tables are per-op-overhead bound at small batches); magika and SqueezeNet have
a symbolic/unit batch priced at the same batch (SqueezeNet's graph is fixed at batch 1, priced there).

Usage:
    python tools/bench_search.py                     # everything (about 15 minutes on 2 cores)
    python tools/bench_search.py --models digits_mlp --targets nvidia-a100 --algorithms bisection
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import machine, source_state, write_section  # noqa: E402  (tools/ is on sys.path)

SECTION = "bench_search"
MODELS = ("digits_mlp", "digits_cnn", "text_transformer", "magika", "squeezenet")
ALGORITHMS = ("bisection", "greedy", "ilp", "pareto")
BUDGET = "1%"
LIGHT_SAMPLES = 64  # random 224x224 images each for SqueezeNet's calibration and evaluation
# AdaRound's per-layer optimisation (500 Adam steps through the JAX backend) takes minutes per
# convolution layer of magika and SqueezeNet on this 2-core CPU (measured: 268 s for magika's one
# Conv), so the AdaRound column covers the zoo nets.
ADAROUND_MODELS = ("digits_mlp", "digits_cnn", "text_transformer")


@dataclass
class Case:
    name: str
    path: Path  # evaluated
    latency_path: Path  # priced
    calib: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]  # with "labels" when there are any
    note: str = ""


@dataclass
class Row:
    target: str
    algorithm: str
    evaluations: int
    score: float
    saving_16: float
    saving_float: float
    mix: str
    seconds: float
    message: str = ""


@dataclass
class ModelResult:
    name: str
    metric: str
    float_score: float
    floor: float
    uniform: dict[str, float]  # label -> score (W8A8, W4A8, W4A8+AdaRound, ORT W8A8)
    uniform_saving: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (target, label)
    rows: list[Row] = field(default_factory=list)
    analysis: tuple[int, float] = (0, 0.0)
    note: str = ""


def make_case(name: str, work: Path, latency_batch: int) -> Case:
    import onnx

    import qinject

    if name == "magika":
        from tests.zoo.magika_data import magika_features, magika_model_path, real_files

        calib_files, held_files = real_files(0)
        path = magika_model_path()
        return Case(name, path, path, {"bytes": magika_features(calib_files)},
                    {"bytes": magika_features(held_files)}, "symbolic batch")
    if name == "squeezenet":
        from models.light_zoo import materialize

        path = work / "squeezenet.onnx"
        onnx.save(materialize("squeezenet", 0, opset=13), str(path))
        inp = onnx.load(str(path), load_external_data=False).graph.input[0].name
        images = np.random.default_rng(0).standard_normal((2 * LIGHT_SAMPLES, 3, 224, 224), dtype=np.float32)
        return Case(name, path, path, {inp: images[:LIGHT_SAMPLES]}, {inp: images[LIGHT_SAMPLES:]},
                    "light-zoo structure, He-normal weights, random images; its output is [1, 1000, 1, 1], so the metric is "
                    "fidelity")
    from models import zoo

    model = zoo.load(name)
    paths = []
    for batch in (64, latency_batch):
        traced = qinject.trace_jax(model.forward, model.params, model.example_input(batch))
        paths.append(qinject.export_onnx(traced, work / f"{name}.b{batch}.onnx"))
    (inp,) = [v.name for v in qinject.load_onnx(paths[0]).graph.inputs]
    return Case(name, paths[0], paths[1], {inp: model.calib_inputs},
                {inp: model.eval_inputs, "labels": model.eval_labels})


def priced_model(case: Case) -> object:
    from qinject.passes import FoldConstants, FoldConvAffine

    import qinject
    from qinject.core.pass_manager import PassManager

    return PassManager([FoldConstants(), FoldConvAffine()]).run(qinject.load_onnx(case.latency_path)).model


def ort_score(case: Case, work: Path, evaluator: object) -> tuple[float, str]:
    """onnxruntime's own W8A8 static quantization of the same file and calibration data, scored by
    the same metric on the same evaluation data; and a note when its recommended pre-processing
    (``quant_pre_process``) failed and it ran on the file as it is, or when it failed outright."""
    from bench_vs_ort import ort_quantizer
    from onnxruntime import quantization as oq

    import qinject

    out = work / f"{case.name}.ort.onnx"
    shape = qinject.load_onnx(case.path).graph.inputs[0].shape
    fixed = shape[0] if isinstance(shape[0], int) else None
    arrays = case.calib
    if fixed:  # a traced graph takes whole batches of its size only
        n = len(next(iter(arrays.values())))
        arrays = {k: v[: max(n - n % fixed, fixed)] for k, v in arrays.items()}
    batch, note = fixed or 16, ""
    try:
        ort_quantizer()(case.path, out, arrays, batch)
    except Exception as exc:  # noqa: BLE001  (ORT's own failure, reported in the table)
        note = f"quant_pre_process failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); ran without it"
        feeds = iter([{k: v[i:i + batch] for k, v in arrays.items()}
                      for i in range(0, len(next(iter(arrays.values()))), batch)])
        reader = type("Reader", (oq.CalibrationDataReader,), {"get_next": lambda self: next(feeds, None)})()
        try:
            oq.quantize_static(str(case.path), str(out), reader, quant_format=oq.QuantFormat.QDQ, per_channel=True,
                               calibrate_method=oq.CalibrationMethod.MinMax, activation_type=oq.QuantType.QUInt8,
                               weight_type=oq.QuantType.QInt8)
        except Exception as exc2:  # noqa: BLE001
            return float("nan"), f"ORT failed: {type(exc2).__name__}: {str(exc2).splitlines()[0][:80]}"
    model = qinject.load_onnx(out)
    (outputs,) = evaluator.executor.run([model])
    return evaluator.metric.score(outputs, evaluator.executor.reference()), note


def bench_model(case: Case, targets: list[str], algorithms: list[str], work: Path, latency_batch: int,
                workers: int) -> ModelResult:
    from qinject.passes import SEARCH_PASSES
    from qinject.passes.search.base import Evaluator, SearchPass
    from qinject.passes.sensitivity.base import EVALUATIONS, AnalysisData, choice_for

    import qinject
    from qinject.cost.estimate import estimate
    from qinject.latency_table import load_target
    from qinject.plan import Plan
    from qinject.runtime.evaluation import Budget

    start = time.perf_counter()
    analysed = qinject.analyze(case.path, case.calib, ["quant-error"], workers=workers, progress=False)
    analysis = analysed.meta[EVALUATIONS]["quant_error"]
    priced = priced_model(case)
    data = AnalysisData.load(case.evaluation, analysed)
    rounding = SearchPass(case.evaluation, BUDGET, "local-cpu", adaround=case.name in ADAROUND_MODELS,
                          calib=case.calib, progress=False)
    evaluator = Evaluator(analysed, data, workers=workers, low_bit_weights=rounding.low_bit_weights(analysed))
    try:
        float_score = evaluator.float_score()
        floor = Budget.parse(BUDGET).floor(float_score, evaluator.metric)
        w8, w4 = Plan(choice_for(8)), Plan(choice_for(4))
        uniform = {"W8A8": evaluator._score(evaluator.executor.quantized(w8)),
                   "W4A8": evaluator._score(evaluator.executor.quantized(w4)),
                   "W4A8 AdaRound": evaluator.score(w4) if case.name in ADAROUND_MODELS else float("nan")}
        uniform["ORT quantize_static W8A8"], ort_note = ort_score(case, work, evaluator)
        metric = evaluator.metric.name
    finally:
        evaluator.close()
    note = "; ".join(n for n in (case.note, f"onnxruntime: {ort_note}" if ort_note else "") if n)
    result = ModelResult(case.name, metric, float_score, floor, uniform, analysis=analysis, note=note)
    for target in targets:
        table = load_target(target)
        base = estimate(priced, Plan(None), table, latency_batch)
        for label, plan in (("W8A8", w8), ("W4A8", w4)):
            us = estimate(priced, plan, table, latency_batch, baselines=False).total_us
            result.uniform_saving[(target, label)] = (1 - us / base.sixteen_bit_us, 1 - us / base.float_us)
        for algorithm in algorithms:
            print(f"  {case.name} / {target} / {algorithm} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            search = SEARCH_PASSES[algorithm](case.evaluation, BUDGET, table, batch=latency_batch, workers=workers,
                                              latency_model=priced)
            search(analysed)
            found = analysed.meta["qinject.search.result"]
            mix = " ".join(f"{v}x{k.split('A')[0]}" for k, v in sorted(found.width_counts().items()))
            result.rows.append(Row(target, algorithm, found.evaluations, found.score, found.saving_vs_16_bit,
                                   found.saving_vs_float, mix, time.perf_counter() - t0, found.message))
    print(f"  {case.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _drop(score: float, r: ModelResult) -> str:
    return f"{(r.float_score - score) * 100:+.2f} pt"


def report(results: list[ModelResult], args: argparse.Namespace, argv: list[str], loads: tuple[float, float],
           total: float) -> str:
    import onnxruntime as ort
    import scipy

    import qinject

    lines = [
        "## Mixed-precision search (`tools/bench_search.py`)", "",
        (f"- date: {datetime.date.today().isoformat()}; machine: {machine()}; 1-min load average at start/end "
         f"{loads[0]:.1f}/{loads[1]:.1f}; whole run {total:.0f} s"),
        (f"- versions: qinject {qinject.__version__} ({source_state()}), onnxruntime {ort.__version__}, "
         f"numpy {np.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}"),
        f"- reproduce: `{shlex.join(['python', 'tools/bench_search.py', *argv])}`",
        (f"- budget: {BUDGET} relative drop of the metric on the held-out split (accuracy with labels, top-1 "
         "agreement with the float model without). Sensitivity: quant-error on the calibration split (its "
         "evaluations are listed per model, apart from the search's). Widths: 16/8/4 = W16A16/W8A8/W4A8. "
         f"Latency: `qinject.cost.estimate` at batch {args.latency_batch} (zoo nets re-traced at that batch for "
         "pricing; SqueezeNet's graph is fixed at batch 1). Evaluations count every full-model run of the search, "
         "the float reference included; the returned plan is always one of them and met the budget."),
        "",
        "### Uniform baselines and onnxruntime, on the same data",
        "",
        "| model | metric | float | floor | W8A8 | W4A8 | W4A8 + AdaRound | ORT quantize_static W8A8 | sensitivity evals |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        u = r.uniform
        ada = "not run" if u["W4A8 AdaRound"] != u["W4A8 AdaRound"] else f"{u['W4A8 AdaRound']:.2%}"
        lines.append(f"| {r.name} | {r.metric} | {r.float_score:.2%} | {r.floor:.2%} | {u['W8A8']:.2%} | "
                     f"{u['W4A8']:.2%} | {ada} | {u['ORT quantize_static W8A8']:.2%} | "
                     f"{r.analysis[0]} ({r.analysis[1]:.0f} s) |")
    lines += ["", "AdaRound is not run on magika and SqueezeNet: its per-layer optimisation takes minutes per "
              "convolution on this CPU (268 s for magika's one Conv).", "", "### Every search on every target", "",
              "| model | target | algorithm | evaluations | drop | saving vs W16A16 | saving vs float | widths | "
              "W8A8 saving (meets budget?) | check |", "|---|---|---|---|---|---|---|---|---|---|"]
    checks_failed = []
    for r in results:
        for row in r.rows:
            s8, _ = r.uniform_saving[(row.target, "W8A8")]
            meets8 = r.uniform["W8A8"] >= r.floor - 1e-12
            meets4 = r.uniform["W4A8"] >= r.floor - 1e-12
            meets = row.score >= r.floor - 1e-12
            ok = meets and (not meets8 or row.saving_16 >= s8 - 1e-9)
            why = "ok" if ok else ("breaks budget" if not meets else "saves less than W8A8")
            if not meets4 and meets:
                why += " (W4A8 fails, mixed meets)"
            if not ok:
                checks_failed.append(f"{r.name}/{row.target}/{row.algorithm}: {why}")
            lines.append(f"| {r.name} | {row.target} | {row.algorithm} | {row.evaluations} | {_drop(row.score, r)} | "
                         f"{_pct(row.saving_16)} | {_pct(row.saving_float)} | {row.mix} | {_pct(s8)} "
                         f"({'yes' if meets8 else 'no'}) | {why} |")
    lines += ["", "### Evaluations per algorithm (goal: at most 6, median at most 4)", "",
              "| algorithm | searches | median | max | within 6 |", "|---|---|---|---|---|"]
    for algorithm in args.algorithms:
        counts = [row.evaluations for r in results for row in r.rows if row.algorithm == algorithm]
        if counts:
            lines.append(f"| {algorithm} | {len(counts)} | {statistics.median(counts):g} | {max(counts)} | "
                         f"{sum(c <= 6 for c in counts)}/{len(counts)} |")
    lines += ["", "### Best saving vs W16A16 per target (bisection / ILP), and uniform W8A8", "",
              "| target | " + " | ".join(r.name for r in results) + " |", "|---|" + "---|" * len(results)]
    for target in args.targets:
        cells = []
        for r in results:
            best = {row.algorithm: row.saving_16 for row in r.rows if row.target == target}
            cells.append(f"{_pct(best.get('bisection', float('nan')))} / {_pct(best.get('ilp', float('nan')))} "
                         f"(W8A8 {_pct(r.uniform_saving[(target, 'W8A8')][0])})")
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "Checks (mixed meets the budget, and saves at least uniform W8A8's saving where W8A8 meets it): "
              + ("all passed." if not checks_failed else "failed: " + "; ".join(checks_failed))]
    notes = [f"- {r.name}: {r.note}" for r in results if r.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def uniform_savings(names: list[str], targets: list[str], latency_batch: int, output: Path, argv: list[str]) -> str:
    """The estimated savings of uniform W8A8 and W4A8 vs W16A16 per model and target (no evaluation:
    the cost model alone), written to the ``bench_search_uniform`` section."""
    from qinject.passes.sensitivity.base import choice_for

    from qinject.cost.estimate import estimate
    from qinject.latency_table import load_target
    from qinject.plan import Plan

    lines = ["## Uniform plans' estimated saving vs W16A16 (`tools/bench_search.py --uniform-savings`)", "",
             f"- reproduce: `{shlex.join(['python', 'tools/bench_search.py', *argv])}`; batch {latency_batch} "
             "(SqueezeNet 1), as in the search benchmark", "",
             "| model | target | W8A8 | W4A8 |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            batch = 1 if name == "squeezenet" else latency_batch
            priced = priced_model(make_case(name, Path(tmp), batch))
            for target in targets:
                table = load_target(target)
                base = estimate(priced, Plan(None), table, batch)
                cells = [1 - estimate(priced, Plan(choice_for(b)), table, batch, baselines=False).total_us
                         / base.sixteen_bit_us for b in (8, 4)]
                lines.append(f"| {name} | {target} | {_pct(cells[0])} | {_pct(cells[1])} |")
    text = "\n".join(lines)
    write_section(output, "bench_search_uniform", text)
    return text


def main(argv: list[str]) -> None:
    from qinject.latency_table import builtin_targets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default=",".join(builtin_targets()))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--latency-batch", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--uniform-savings", action="store_true", help="only the uniform plans' estimated savings")
    parser.add_argument("--section", default=SECTION, help="section of the output file (a partial re-run can keep "
                        "the full run's section)")
    args = parser.parse_args(argv)
    args.models, args.targets, args.algorithms = (v.split(",") for v in (args.models, args.targets, args.algorithms))
    for value, allowed, what in ((args.models, MODELS, "model"), (args.algorithms, ALGORITHMS, "algorithm"),
                                 (args.targets, builtin_targets(), "target")):
        if unknown := [v for v in value if v not in allowed]:
            parser.error(f"unknown {what}(s) {unknown}; choose from {','.join(allowed)}")
    if args.uniform_savings:
        print(uniform_savings(args.models, args.targets, args.latency_batch, args.output, argv))
        return
    start, load_start, results = time.perf_counter(), os.getloadavg()[0], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            batch = 1 if name == "squeezenet" else args.latency_batch
            case = make_case(name, Path(tmp), batch)
            results.append(bench_model(case, args.targets, args.algorithms, Path(tmp), batch, args.workers))
    text = report(results, args, argv, (load_start, os.getloadavg()[0]), time.perf_counter() - start)
    print(text)
    write_section(args.output, args.section, text)


if __name__ == "__main__":
    main(sys.argv[1:])
