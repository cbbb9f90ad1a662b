"""Oracle check of the sensitivity signals (issue #5): do they rank nodes as the real damage does?

For each model (the zoo nets and magika), every signal that exists in this checkout
(``qinject.sensitivity.SIGNALS``) runs on the model's *calibration* split, as ``qinject.analyze``
runs it, and scores each quantizable node at 4 bits (W4A8). The oracle is measured on the
*held-out* split: each node quantized alone at W4A8, its drop in top-1 accuracy (zoo, labels) or
in top-1 agreement with the float model (magika, no labels), ties broken by the held-out loss
increase (zoo) or the KL divergence from the float outputs (magika). Reported: each signal's
Spearman rank correlation with the oracle, and what it cost (model evaluations, seconds).

Then the orderings: nodes are lowered to W4A8 one by one, least sensitive first, in the order of
the inter-layer signal and of the plain Hessian signal (and, for reference, of the others and of the
held-out oracle itself); after each step the held-out accuracy (or agreement) is measured and the
cumulative plan's latency estimated on an analytic target table. The area under the
accuracy-vs-latency-saving curve says which ordering buys more accuracy per latency saved.
Results go to stdout, to the ``bench_sensitivity`` section of ``BENCHMARKS.md`` and to a PNG.

Usage:
    python tools/bench_sensitivity.py                          # every model, every signal present
    python tools/bench_sensitivity.py --models text_transformer --bits 4 --no-plot
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model zoo and magika's data helpers live in the repository
from bench_common import machine, source_state, write_section  # noqa: E402  (tools/ is on sys.path)

SECTION = "bench_sensitivity"
MODELS = ("digits_mlp", "digits_cnn", "text_transformer", "magika")
BITS = 4  # the width the oracle and the orderings use; W4A8 (qinject.sensitivity.choice_for)
ANALYSIS_BATCH = 64  # the zoo nets are traced at this batch for the signals and the oracle
ORDERINGS = ("interlayer", "hessian")  # the comparison the issue asks for
# Magika's first layer reads a one-hot of 2048 bytes: one HVP over 256 samples takes seconds, and
# the Hutchinson trace of its 3 nodes needs up to 100 of them each. Fewer samples and probes keep the
# benchmark near 10 minutes; the stated cost is what was run.
SIGNAL_OPTIONS = {"magika": {"hessian": {"samples": 64, "max_iter": 30}}}


@dataclass
class Case:
    """One model: its float ONNX file (and one traced at the latency batch), splits and labels."""

    name: str
    path: Path
    latency_path: Path
    calib: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    labels: np.ndarray | None  # None: no labels, fidelity to the float model is the accuracy


@dataclass
class Result:
    name: str
    nodes: list[str]
    samples: tuple[int, int]  # (calibration, held-out)
    float_accuracy: float
    drop: dict[str, float]  # oracle: accuracy (or agreement) drop of each node alone at W4A8
    tiebreak: dict[str, float]  # held-out loss increase or KL, each node alone
    oracle_cost: tuple[int, float]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # signal -> node -> score at BITS
    costs: dict[str, tuple[int, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # ordering -> (saving, accuracy)
    interlayer_base: str = ""


def make_case(name: str, work: Path, latency_batch: int) -> Case:
    import qinject

    if name == "magika":
        from tests.zoo.magika_data import magika_features, magika_model_path, real_files

        calib_files, held_files = real_files(0)
        path = magika_model_path()  # symbolic batch: the latency estimate sets it
        return Case(name, path, path, {"bytes": magika_features(calib_files)},
                    {"bytes": magika_features(held_files)}, None)
    from models import zoo

    model = zoo.load(name)
    paths = []
    for batch in (ANALYSIS_BATCH, latency_batch):
        traced = qinject.trace_jax(model.forward, model.params, model.example_input(batch))
        paths.append(qinject.export_onnx(traced, work / f"{name}.b{batch}.onnx"))
    (inp,) = [v.name for v in qinject.load_onnx(paths[0]).graph.inputs]
    return Case(name, paths[0], paths[1], {inp: model.calib_inputs}, {inp: model.eval_inputs}, model.eval_labels)


def available_signals() -> tuple[list[str], list[str]]:
    """(metrics whose pass exists in this checkout, metrics whose pass does not yet)."""
    from qinject.passes.sensitivity import SIGNALS

    present = [m for m, cls in SIGNALS.items()
               if importlib.util.find_spec(f"qinject.passes.sensitivity.{cls.signal}") is not None]
    return present, [m for m in SIGNALS if m not in present]


def analyse(case: Case, metrics: list[str], bits: tuple[int, ...], result: Result) -> object:
    """Calibrate as ``qinject.analyze`` does, then run each signal on the calibration split (one at
    a time, so a signal that fails is reported instead of ending the benchmark)."""
    from qinject.passes.sensitivity import SIGNALS, signal_pass
    from qinject.passes.sensitivity.base import AnalysisData, signal_of

    import qinject

    model = qinject.analyze(case.path, case.calib, [], bits=bits, progress=False)
    data = AnalysisData.load(case.calib, model, 512)  # analyze's default limit
    for metric in metrics:
        key = SIGNALS[metric].signal
        options = dict(SIGNAL_OPTIONS.get(case.name, {}).get(metric, {}))
        if metric == "interlayer":
            options["base"] = result.interlayer_base = "hessian" if signal_of(model, "hessian") else "quant_error"
        print(f"  {case.name}: {metric} ...", file=sys.stderr, flush=True)
        try:
            signal_pass(metric, data, bits=bits, progress=False, **options)(model)
        except Exception as exc:  # noqa: BLE001  (reported in the table, one line)
            result.errors[metric] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        result.scores[metric] = {n: v.score[BITS] for n, v in signal_of(model, key).items()}
        result.costs[metric] = model.meta["qinject.sensitivity.evaluations"][key]
    return model


def top1(outputs: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.asarray(outputs).argmax(axis=1) == truth))


def order_by(scores: dict[str, float], nodes: list[str]) -> list[str]:
    """Least sensitive first; ties keep graph order (as ``qinject.sensitivity.ranking`` does)."""
    return sorted(nodes, key=lambda n: (scores[n], nodes.index(n)))


def oracle_and_curves(case: Case, model: object, result: Result, table: object, latency_batch: int) -> None:
    """The held-out measurements: each node alone at W4A8, then every ordering's cumulative plans."""
    from qinject.passes import FoldConstants, FoldConvAffine
    from qinject.passes.sensitivity.base import alone, choice_for

    from qinject.core.pass_manager import PassManager
    from qinject.cost.estimate import estimate
    from qinject.frontends.onnx_frontend import load_onnx
    from qinject.plan import Plan
    from qinject.runtime.damage import damage
    from qinject.runtime.executor import Executor

    nodes = result.nodes
    with Executor(model, case.held_out) as ex:
        start = time.perf_counter()
        reference = ex.reference()
        truth = case.labels if case.labels is not None else reference.argmax(axis=1)
        result.float_accuracy = top1(reference, truth)
        outs = ex.run(ex.quantized(alone(n, BITS)) for n in nodes)
        for n, out in zip(nodes, outs):
            result.drop[n] = result.float_accuracy - top1(out, truth)
            result.tiebreak[n] = damage(reference, out, case.labels)
        result.oracle_cost = (ex.count, time.perf_counter() - start)

        orders = {s: order_by(result.scores[s], nodes) for s in result.scores}
        orders["oracle (held-out)"] = sorted(nodes, key=lambda n: (result.drop[n], result.tiebreak[n]))
        prefixes = {frozenset(o[:k]) for o in orders.values() for k in range(1, len(nodes) + 1)}
        prefixes = sorted(prefixes, key=lambda p: (len(p), sorted(p)))
        outs = ex.run(ex.quantized(Plan(None, {n: choice_for(BITS) for n in p})) for p in prefixes)
        accuracy = {frozenset(): result.float_accuracy} | {p: top1(o, truth) for p, o in zip(prefixes, outs)}

    folded = PassManager([FoldConstants(), FoldConvAffine()]).run(load_onnx(case.latency_path)).model
    float_us = estimate(folded, Plan(None), table, latency_batch, baselines=False).total_us
    saving = {frozenset(): 0.0}
    for p in prefixes:
        plan = Plan(None, {n: choice_for(BITS) for n in p})
        saving[p] = 1.0 - estimate(folded, plan, table, latency_batch, baselines=False).total_us / float_us
    for label, order in orders.items():
        steps = [frozenset(order[:k]) for k in range(len(nodes) + 1)]
        result.curves[label] = [(saving[p], accuracy[p]) for p in steps]


def frontier_auc(points: list[tuple[float, float]], x_max: float) -> float:
    """Mean over saving targets t in [0, x_max] of the best accuracy among the ordering's prefixes
    saving at least t: the area under its accuracy-vs-latency-saving frontier, x normalised to 0..1."""
    cuts = sorted({0.0, x_max, *(x for x, _ in points if 0.0 < x < x_max)})
    area = sum((b - a) * max(y for x, y in points if x >= b - 1e-12) for a, b in zip(cuts, cuts[1:]))
    return area / x_max


def path_auc(points: list[tuple[float, float]]) -> float:
    """The trapezoid area under the curve in step order (signed where a step increases latency),
    over the full plan's saving."""
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return float(np.trapezoid(ys, xs) / xs[-1])


def aucs(result: Result) -> dict[str, tuple[float, float]]:
    """Ordering -> (frontier AUC, path AUC); the frontier over the saving range every ordering reaches."""
    x_max = min(max(x for x, _ in c) for c in result.curves.values())
    return {k: (frontier_auc(c, x_max), path_auc(c)) for k, c in result.curves.items()} if x_max > 0 else {}


def rho(scores: dict[str, float], key: dict[str, object], nodes: list[str]) -> float:
    """Spearman's ρ of a signal's scores with a key (tuples are ranked lexicographically)."""
    values = [key[n] for n in nodes]
    ranks = {v: i for i, v in enumerate(sorted(set(values)))}
    a, b = [scores[n] for n in nodes], [ranks[v] for v in values]
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def plot(result: Result, path: Path, target: str, latency_batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = {"interlayer": ("C0", "o", "-"), "hessian": ("C1", "s", "-"), "oracle (held-out)": ("0.5", ".", ":")}
    for label, (color, marker, line) in styles.items():
        if label in result.curves:
            xs, ys = zip(*result.curves[label])
            ax.plot(np.array(xs) * 100, np.array(ys) * 100, line, color=color, marker=marker, ms=4, label=label)
    what = "accuracy" if result.name != "magika" else "agreement with float"
    ax.set_xlabel(f"estimated latency saving vs float (%), {target}, batch {latency_batch}")
    ax.set_ylabel(f"held-out top-1 {what} (%)")
    ax.set_title(f"{result.name}: nodes lowered to W4A8 one by one, least sensitive first", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(value: float, fmt: str = "+.2f") -> str:
    return "n/a" if value != value else format(value, fmt)


def report(results: list[Result], present: list[str], missing: list[str], args: argparse.Namespace,
           argv: list[str], loads: tuple[float, float], total_s: float, plot_path: Path | None) -> str:
    import onnxruntime as ort
    import scipy

    import qinject

    lines = [
        "## Sensitivity signals vs the oracle (`tools/bench_sensitivity.py`)", "",
        (f"- date: {datetime.date.today().isoformat()}; machine: {machine()}; 1-min load average at start/end "
         f"{loads[0]:.1f}/{loads[1]:.1f} (the machine is shared: seconds are noisy); whole run {total_s:.0f} s"),
        (f"- versions: qinject {qinject.__version__} ({source_state()}), onnxruntime {ort.__version__}, "
         f"numpy {np.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}"),
        f"- reproduce: `{shlex.join(['python', 'tools/bench_sensitivity.py', *argv])}`",
        (f"- signals run: {', '.join(present)}" + (f"; not in this checkout yet: {', '.join(missing)}" if missing
                                                    else "")),
        (f"- signals: each pass (`qinject.sensitivity.signal_pass`) on the model calibrated as `qinject.analyze` "
         f"calibrates it (MinMax), with the *calibration* split as evaluation data (no labels: damage = KL to the "
         f"float outputs), bit widths {','.join(map(str, args.bits))}, default workers; the score compared is each "
         f"node's score at {BITS} bits (W4A8). Evaluations and seconds are the pass's own (all widths), as recorded "
         "in the model's meta; calibration is not included. The interlayer signal's cost excludes its base signal's. "
         "Non-default options: " + "; ".join(f"{m}: {o}" for m, o in SIGNAL_OPTIONS.items()) + "."),
        ("- oracle: on the *held-out* split, each node alone quantized W4A8 (`alone(node, 4)`, calibrated ranges "
         "from the calibration split): the drop in top-1 accuracy (zoo, against the labels) or in top-1 agreement "
         "with the float model (magika, which has no labels); most drops are a handful of samples and many are 0, "
         "so ties are broken by the held-out loss increase (zoo) or the KL divergence from the float outputs "
         "(magika), which are continuous. ρ = Spearman of the signal's score with that (drop, tie-break) order; "
         "the 'loss/KL only' column is ρ with the continuous held-out damage alone."),
        ("- orderings: nodes lowered to W4A8 one by one (the rest float), least sensitive first by each signal's "
         "4-bit score (ties in graph order), and by the held-out oracle for reference (it has seen the test "
         f"split: a bound, not a competitor). Latency: `qinject.cost.estimate` on the `{args.target}` table at "
         f"batch {args.latency_batch} (zoo nets traced at that batch for the estimate). AUC = area under held-out "
         "accuracy (or agreement) vs latency saving, x normalised to 0..1: 'frontier' is, for each saving target "
         "up to the largest saving every ordering reaches, the best accuracy among that ordering's prefixes saving "
         "at least as much (what a search walking the order can buy); 'path' is the trapezoid along the steps "
         "(signed where a step costs latency), over the all-W4A8 plan's saving. Higher is better."),
        "",
        "### Spearman ρ with the oracle, and cost",
        "",
        "| model | nodes | signal | ρ (oracle) | ρ (loss/KL only) | evaluations | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        key = {n: (r.drop[n], r.tiebreak[n]) for n in r.nodes}
        for signal in present:
            label = signal + (f" (base {r.interlayer_base})" if signal == "interlayer" else "")
            if signal in r.errors:
                lines.append(f"| {r.name} | {len(r.nodes)} | {label} | failed: {r.errors[signal]} | | | |")
                continue
            count, secs = r.costs[signal]
            lines.append(f"| {r.name} | {len(r.nodes)} | {label} | {_f(rho(r.scores[signal], key, r.nodes))} "
                         f"| {_f(rho(r.scores[signal], r.tiebreak, r.nodes))} | {count} | {secs:.1f} |")
        lines.append(f"| {r.name} | {len(r.nodes)} | *oracle itself (held-out)* | | | {r.oracle_cost[0]} "
                     f"| {r.oracle_cost[1]:.1f} |")
    lines += ["", "### The oracle per model", ""]
    for r in results:
        what = "accuracy" if r.name != "magika" else "agreement with float"
        drops = sorted(r.nodes, key=lambda n: -r.drop[n])
        zeros = sum(1 for n in r.nodes if r.drop[n] == 0)
        one = 100.0 / r.samples[1]
        largest = max(abs(d) for d in r.drop.values()) * 100
        noise = (f" Every drop is within {round(largest / one)} held-out samples: this oracle is mostly sampling "
                 "noise, and its ranks (hence ρ) mean little." if largest < 1.0 else "")
        lines.append(f"- **{r.name}** ({r.samples[0]} calibration / {r.samples[1]} held-out samples, one sample = "
                     f"{one:.2f} pt; float top-1 {what} {r.float_accuracy:.2%}): {zeros} of {len(r.nodes)} nodes drop "
                     f"nothing alone at W4A8, {len(set(r.drop.values()))} distinct drops; largest: "
                     + ", ".join(f"`{n}` {r.drop[n] * 100:+.2f} pt" for n in drops[:3]) + "." + noise)
    lines += ["", "### Orderings: area under accuracy vs latency saving", "",
              "| model | ordering | frontier AUC | path AUC | all-W4A8 saving | all-W4A8 top-1 |", "|---|---|---|---|---|---|"]
    verdicts = []
    for r in results:
        areas = aucs(r)
        if not areas:
            lines.append(f"| {r.name} | (no ordering saves latency on this target) | | | | |")
            continue
        for label, (frontier, path) in areas.items():
            full = r.curves[label][-1]
            name = label + (f" (base {r.interlayer_base})" if label == "interlayer" else "")
            lines.append(f"| {r.name} | {name} | {frontier:.4f} | {path:.4f} | {full[0]:.1%} | {full[1]:.2%} |")
        if all(o in areas for o in ORDERINGS):
            (fi, pi), (fh, ph) = areas["interlayer"], areas["hessian"]
            win = "interlayer" if fi > fh else "hessian" if fh > fi else "tie"
            agree = (fi > fh) == (pi > ph) or (fi == fh and pi == ph)
            verdicts.append(f"- **{r.name}**: frontier {win} ({(fi - fh) * 100:+.2f} pt interlayer − hessian); path "
                            f"{(pi - ph) * 100:+.2f} pt" + ("" if agree else " (the two areas disagree)"))
    if verdicts:
        lines += ["", "Interlayer vs plain Hessian ordering (which wins, by the frontier AUC):", "", *verdicts]
    elif "hessian" not in present:
        lines += ["", "The Hessian signal is not in this checkout yet, so the interlayer signal used the quant-error "
                  "signal as its base and there is no plain Hessian ordering to compare with."]
    if plot_path is not None:
        lines += ["", f"![accuracy vs latency saving]({plot_path.relative_to(ROOT).as_posix()})"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: {','.join(MODELS)}")
    parser.add_argument("--bits", default="16,8,4", help="widths the signals measure (default 16,8,4)")
    parser.add_argument("--target", default="nvidia-a100", help="latency table for the orderings")
    parser.add_argument("--latency-batch", type=int, default=4096)
    parser.add_argument("--plot-model", default="text_transformer")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.bits = tuple(int(b) for b in args.bits.split(","))
    if BITS not in args.bits:
        parser.error(f"--bits must include {BITS}")
    names = args.models.split(",") if args.models else list(MODELS)
    if unknown := [n for n in names if n not in MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(MODELS)}")

    from qinject.core import ir as qir
    from qinject.latency_table import load_target

    table = load_target(args.target)
    present, missing = available_signals()
    metrics = [m for m in present if m != "interlayer"] + (["interlayer"] if "interlayer" in present else [])
    start, load_start, results = time.perf_counter(), os.getloadavg()[0], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            case = make_case(name, Path(tmp), args.latency_batch)
            samples = (len(next(iter(case.calib.values()))), len(next(iter(case.held_out.values()))))
            result = Result(name, [], samples, 0.0, {}, {}, (0, 0.0))
            model = analyse(case, metrics, args.bits, result)
            result.nodes = [n.name for n in qir.quantizable_nodes(model)]
            oracle_and_curves(case, model, result, table, args.latency_batch)
            results.append(result)
    plot_path = None
    chosen = [r for r in results if r.name == args.plot_model] or results[-1:]
    if not args.no_plot and chosen:
        plot_path = ROOT / "docs" / "bench_sensitivity.png"
        plot(chosen[0], plot_path, args.target, args.latency_batch)
    text = report(results, metrics, missing, args, argv, (load_start, os.getloadavg()[0]),
                  time.perf_counter() - start, plot_path)
    print(text)
    write_section(args.output, SECTION, text)


if __name__ == "__main__":
    main(sys.argv[1:])
