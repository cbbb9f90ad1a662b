"""The ``qinject`` command line: quantize, run, passes, inspect, analyze, cost, targets, profile, demo.

Every error a user can cause prints one line (``error: ...``) and exits 1; no traceback, no output
file. Set QINJECT_DEBUG=1 to see tracebacks of internal errors.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click
import numpy as np

from qinject.app.api import (
    SearchOptions,
    _calibration_arrays,
    estimate_latency,
    load_onnx,
    quantize_onnx,
    save_onnx,
)
from qinject.app.api import analyze as run_analysis
from qinject.app.cli_finetune import finetune_command
from qinject.app.demo import run_demo
from qinject.app.inspect import quantizable_table
from qinject.app.plots import node_latency_plot, sensitivity_plot
from qinject.app.report import build_report
from qinject.backends import onnx_backend
from qinject.compiler import plugins
from qinject.compiler.instrument import IRDump, PrintIRAfter, VerifyEach, timing_table
from qinject.compiler.pipeline import parse
from qinject.compiler.registry import Context, build, choices, describe, passes
from qinject.core import ir as qir
from qinject.core.errors import QinjectError, UnsupportedModelError
from qinject.core.jsonfile import write_json
from qinject.core.pass_manager import PassManager
from qinject.core.plan import MODES, STATIC, NodeQuant, Plan
from qinject.core.rules import Rules, describe_unmatched
from qinject.core.search_result import format_result, search_result
from qinject.core.stats import METHODS
from qinject.cost.estimate import format_report
from qinject.cost.latency_table import LatencyTable, builtin_targets, load_target, user_dir
from qinject.passes import sensitivity
from qinject.passes.search.pareto import format_front
from qinject.passes.sensitivity.base import AnalysisData
from qinject.passes.transforms import prepare
from qinject.runtime import ray_executor
from qinject.runtime.measure import compare_latency
from qinject.runtime.profiler import run_profile


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QinjectError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug: still one line, unless asked for the traceback
            if os.environ.get("QINJECT_DEBUG") == "1":
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (set QINJECT_DEBUG=1 for the traceback)",
                       err=True)
            sys.exit(3)


def _check_executor(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ray_executor.check(value)  # an unknown name, or Ray asked for and not installed: before any work
    return value


_executor_option = click.option(
    "--executor", callback=_check_executor, metavar="process|ray|ray://HOST:PORT",
    help="Where evaluations run: 'process' (default: a local pool of --workers processes), 'ray' (a local "
         "Ray), 'ray://HOST:PORT' (an existing Ray cluster; --workers actors, default one per CPU). Same "
         "results on each. Ray: pip install 'qinject[ray]'.")


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(cls=_Group)
@click.version_option(package_name="qinject")
def cli() -> None:
    """qinject: quantize models by compiler passes (ONNX in, quantized ONNX out)."""
    warnings.showwarning = _one_line_warnings
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    plugins.load()  # plugin passes, op facts and targets, before any command reads them


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Quantized model path.")
@click.option("--weights", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Weight bits for every node (ignored with --plan).")
@click.option("--activations", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Activation bits for every node (ignored with --plan).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Per-node plan (JSON).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: .npz keyed by input name, or a folder of .npy/.npz. Random if absent.")
@click.option("--calib-method", type=click.Choice(METHODS), default="minmax", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --calib-method percentile.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per channel.")
@click.option("--mode", type=click.Choice(["static", "dynamic", "weight-only", "auto"]), default="static",
              show_default=True, help="Execution mode: static Q/DQ; dynamic (activations quantized at run time, "
              "MatMul/Gemm); weight-only (block-wise weights, float activations); auto: per node, the mode the "
              "--target prices fastest at --weights.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="Weights per scale for --mode weight-only.")
@click.option("--modes", default="static,dynamic,weight-only", show_default=True,
              help="With a search: the execution modes a width may run in.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Calibration batch size.")
@click.option("--save-plan", type=click.Path(path_type=Path), help="Also write the plan applied, as JSON.")
@click.option("--target", help="Latency table (name or path) to estimate the written model's latency on "
              "(default: local-cpu; 'none': skip).")
@click.option("--latency-batch", type=int, default=1, show_default=True,
              help="Batch size for the latency estimate when the model's batch is symbolic.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=1x3x640x640",
              help="Input shape for latency estimates (repeatable; default: the shapes calibration saw).")
@click.option("--max-drop", help="Search a mixed-precision plan within this accuracy budget: '1%' relative, "
              "'0.5pt' absolute points, or a number (absolute). Default 1% when --search is given.")
@click.option("--search", "algorithm", type=click.Choice(choices("search", "algo")),
              help="Search algorithm (default bisection when --max-drop is given).")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help="Evaluation .npz (or a folder of them): inputs by name, optional 'labels' (top-1 accuracy; "
              "without: agreement with the float model, or output fidelity). Default: the calibration data.")
@click.option("--signal", type=click.Choice(choices("sensitivity", "metric")),
              default="quant-error", show_default=True, help="Sensitivity signal the search ranks nodes by.")
@click.option("--adaround", is_flag=True, help="AdaRound the weights of static nodes: per-channel at 4 bits, per-tensor up to 8 (a search: its 4-bit nodes).")
@click.option("--bias-correction", is_flag=True, help="Correct the biases of the nodes --adaround acts on for their rounding (after --adaround: for its rounding).")
@click.option("--pareto-plot", type=click.Path(path_type=Path), help="With --search pareto: the frontier as PNG.")
@click.option("--workers", type=int, help="Evaluation processes of the search (default: every core).")
@_executor_option
@click.option("--rules", "rules_path", type=click.Path(path_type=Path),
              help="Per-node rules (JSON): the plan; with a search, they pin the nodes they match.")
@click.option("--force", is_flag=True, help="Also quantize nodes whose onnxruntime CPU integer kernel is slower "
              "than float (grouped convolutions), which are otherwise kept float with a note.")
@click.option("--no-measure", is_flag=True, envvar="QINJECT_NO_MEASURE",
              help="Skip timing the rewrite against the float model on this machine (by default, on a measured "
              "--target, nodes that make it slower are kept float, so the output can vary between runs; "
              "also set by QINJECT_NO_MEASURE=1).")
@click.option("--profile", is_flag=True, help="First time on this machine the node shapes the measured --target "
              "lacks (cached in the profile cache, like `qinject profile --save-as-target`).")
def quantize(model: Path, output: Path, weights: str, activations: str, plan_path: Path | None,
             calib: Path | None, calib_method: str, percentile: float, per_tensor: bool, mode: str,
             block_size: str, modes: str, batch_size: int,
             save_plan: Path | None, target: str, latency_batch: int, max_drop: str | None, algorithm: str | None,
             eval_path: Path | None, signal: str, adaround: bool, bias_correction: bool,
             pareto_plot: Path | None, workers: int | None, executor: str | None, rules_path: Path | None,
             shapes: tuple[str, ...], force: bool, no_measure: bool, profile: bool) -> None:
    """Quantize MODEL (ONNX) and write the Q/DQ model to OUTPUT.

    With --max-drop (or --search), search per-node bit widths (16/8/4) minimising the estimated
    latency on --target within the accuracy budget; the plan and a JSON report are written next to
    OUTPUT (OUTPUT.plan.json, OUTPUT.search.json).
    """


    searching = max_drop is not None or algorithm is not None
    rules = Rules.load(rules_path) if rules_path is not None else None
    if rules is not None and plan_path is not None:
        raise QinjectError("--plan and --rules exclude each other")
    if pareto_plot is not None and algorithm != "pareto":
        raise QinjectError("--pareto-plot needs --search pareto")
    if searching and plan_path is not None:
        raise QinjectError("--plan and a search (--max-drop/--search) exclude each other")
    plan = None if searching else _plan(plan_path, weights, activations, per_tensor, mode, block_size)
    # A bad table, budget or data path fails before any work is done.
    table = None if target == "none" else load_target(target or "local-cpu")
    search = None
    if searching:
        if table is None:
            raise QinjectError("a search needs a --target latency table (not 'none')")
        if eval_path is not None and not eval_path.exists():
            raise QinjectError(f"evaluation data {str(eval_path)!r} does not exist")
        if calib is None:
            raise QinjectError("a search needs --calib data (random inputs would rank the nodes by noise)")
        search = SearchOptions(max_drop=max_drop or "1%", eval_data=eval_path, search=algorithm or "bisection",
                               signal=signal, adaround=adaround, bias_correction=bias_correction,
                               pareto_plot=pareto_plot, workers=workers, rules=rules, modes=_modes(modes),
                               executor=executor)
    result = quantize_onnx(model, output, plan=plan, calib=calib, method=calib_method, batch_size=batch_size,
                           percentile=percentile, target=table, latency_batch=latency_batch, search=search,
                           adaround=adaround and not searching, bias_correction=bias_correction and not searching,
                           rules=rules if not searching else None, input_shapes=_shapes(shapes), force=force,
                           auto_mode=mode == "auto", profile=profile, measure=not no_measure)
    if result.search is not None:

        plan_file = output.with_name(output.name + ".plan.json")
        result.plan.save(plan_file)
        Rules.from_plan(result.plan, result.search.bits).save(output.with_name(output.name + ".rules.json"))
        write_json(output.with_name(output.name + ".search.json"), result.search.to_dict())
        click.echo(format_result(result.search))
        if result.search.frontier:

            click.echo("measured Pareto front:")
            click.echo(format_front(result.search))
        click.echo(f"wrote {plan_file}, {output.name}.rules.json (edit and re-apply with --rules) and "
                   f"{output.name}.search.json")
    if save_plan is not None:
        result.plan.save(save_plan)
    if result.search is not None and not result.quantized:
        raise UnsupportedModelError(f"nothing was quantized: the {result.search.algorithm} search kept every node "
                                    f"float ({result.search.message or 'no plan is estimated faster than float'}); "
                                    f"no model written, the search's report is {output.name}.search.json")
    before, after = _size(model), _size(output)
    click.echo(f"quantized {len(result.quantized)} node(s) of {model.name} -> {output}")
    click.echo(f"file size: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / max(after, 1):.1f}x smaller)")
    for node, notes in result.notes.items():
        for note in notes:
            click.echo(f"note: {node}: {note}")
    if result.cost is not None:
        c = result.cost
        click.echo(f"estimated latency on {c.target}: {c.total_us / 1e3:.3f} ms vs float {c.float_us / 1e3:.3f} ms "
                   f"({c.saving_vs_float:+.1%} saved) and W16A16 {c.sixteen_bit_us / 1e3:.3f} ms "
                   f"({c.saving_vs_16_bit:+.1%}); `qinject cost` shows the breakdown")
    if not no_measure and (table is None or table.kind == "measured"):
        _measure(model, output, result)


def _measure(model: Path, output: Path, result: object) -> None:
    """Time the written model against the float one on this CPU (a few seconds), and say plainly if
    it is slower."""

    feed = result.model.meta.get(qir.SAMPLE_FEED)
    if result.measured is not None:  # fit-measured timed the plan it kept: no need to time it again
        float_ms, quantized_ms = result.measured["float_ms"], result.measured["quantized_ms"]
    elif feed is not None:
        float_ms, quantized_ms = compare_latency(model, output, feed)
    else:
        return
    ratio = quantized_ms / float_ms
    tried = (f"; {result.measured['tried']} plans timed, the fastest kept"
             if result.measured is not None and result.measured["tried"] > 1 else "")
    click.echo(f"measured on this machine (onnxruntime CPU, one calibration sample): float {float_ms:.3f} ms, "
               f"quantized {quantized_ms:.3f} ms ({ratio:.2f}x{tried})")
    split = result.model.meta.get(qir.SPLIT_SKIP_LAYERNORM)
    if split is not None:
        click.echo(f"note: residual Adds written as Sum, so onnxruntime does not fuse them with their "
                   f"LayerNormalization into SkipLayerNormalization, which runs slower here (the rewrite "
                   f"measured {split:.2f}x of its time with them fused)")
    if ratio > 1.0:
        costliest = sorted((n for n in (result.cost.nodes if result.cost else []) if n.node in result.quantized),
                           key=lambda n: -n.latency_us)[:3]
        blamed = f"; the costliest quantized nodes by the estimate: {', '.join(n.node for n in costliest)}" \
            if costliest else ""
        click.echo(f"warning: the quantized model runs {ratio:.2f}x the float model's time here{blamed} "
                   "(keep them float with a plan or --rules)", err=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", default="local-cpu", show_default=True, help="Latency table: a target name or a path.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Per-node plan (JSON).")
@click.option("--weights", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Weight bits for every node (ignored with --plan).")
@click.option("--activations", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Activation bits for every node (ignored with --plan).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per channel.")
@click.option("--mode", type=click.Choice(["static", "dynamic", "weight-only"]), default="static", show_default=True,
              help="Execution mode of every node (ignored with --plan).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="Weights per scale for --mode weight-only.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size for a symbolic batch dimension.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=1x3x640x640",
              help="Input shape (repeatable), for inputs with symbolic dims other than the batch.")
@click.option("--top", type=int, default=20, show_default=True, help="Show the N costliest nodes (0: all).")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Also write a PNG of every quantizable node's latency at each bit width.")
def cost(model: Path, target: str, plan_path: Path | None, weights: str, activations: str, per_tensor: bool,
         mode: str, block_size: str, batch: int, shapes: tuple[str, ...], top: int, plot: Path | None) -> None:
    """Estimate MODEL's latency under a plan on a target: per node, conversions, savings."""

    table = load_target(target)
    if plot is not None and not plot.parent.is_dir():
        raise QinjectError(f"output folder {str(plot.parent)!r} does not exist")
    plan = _plan(plan_path, weights, activations, per_tensor, mode, block_size)
    report = estimate_latency(model, plan, table, batch, input_shapes=_shapes(shapes))
    click.echo(f"{model.name} on {table.target} ({table.kind}; batch {batch})")
    click.echo(format_report(report, top=top or None))
    if plot is not None:

        folded = PassManager(prepare()).run(load_onnx(model)).model
        click.echo(f"wrote {node_latency_plot(folded, table, plot, batch)}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), required=True,
              help="Calibration data (.npz keyed by input name, or a folder); also the evaluation data "
                   "unless --eval is given.")
@click.option("--metric", "metrics", multiple=True, required=True,
              type=click.Choice(choices("sensitivity", "metric")),
              help="Sensitivity signal(s) to compute (repeat the option for several).")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help="Evaluation .npz: inputs by name and optional 'labels' (then damage is a loss increase).")
@click.option("--bits", default="16,8,4", show_default=True, help="Bit widths (weights; activations at least 8).")
@click.option("--limit", type=int, default=512, show_default=True, help="At most this many evaluation samples.")
@click.option("--workers", type=int, help="Evaluation processes (default: every core).")
@_executor_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-method", type=click.Choice(METHODS), default="minmax", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every signal as JSON.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Write a PNG per signal (NAME.png becomes NAME.<signal>.png when there are several).")
def analyze(model: Path, calib: Path, metrics: tuple[str, ...], eval_path: Path | None, bits: str, limit: int,
            workers: int | None, executor: str | None, seed: int, calib_method: str, json_path: Path | None,
            plot: Path | None) -> None:
    """Measure how sensitive each quantizable node of MODEL is, per bit width."""


    widths = _bit_widths(bits)
    for out in (json_path, plot):
        if out is not None and not out.parent.is_dir():
            raise QinjectError(f"output folder {str(out.parent)!r} does not exist")
    analysed = run_analysis(model, calib, metrics, eval_data=eval_path, bits=widths, method=calib_method,
                            workers=workers, seed=seed, limit=limit, executor=executor)
    present = sensitivity.signals_present(analysed)
    for signal in present:
        click.echo(f"\n{signal} (score per bit width; higher = more sensitive)")
        click.echo(sensitivity.format_table(analysed, signal))
    if json_path is not None:
        tmp = json_path.with_name(f".{json_path.name}.tmp")
        tmp.write_text(json.dumps(sensitivity.report(analysed), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, json_path)
        click.echo(f"wrote {json_path}")
    if plot is not None:
        for signal in present:
            path = plot if len(present) == 1 else plot.with_name(f"{plot.stem}.{signal}{plot.suffix}")
            click.echo(f"wrote {sensitivity_plot(analysed, signal, path)}")


def _shapes(texts: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """``NAME=1x3x640x640`` options as input name -> shape."""
    shapes = {}
    for text in texts:
        name, _, dims = text.rpartition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            name = ""
        if not name or not shapes[name] or min(shapes[name]) < 1:
            raise QinjectError(f"--shape {text!r}: expected NAME=DIMS with positive sizes, e.g. images=1x3x640x640")
    return shapes or None


def _bit_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise QinjectError(f"--bits must be a comma-separated list of 4, 8, 16, got {text!r}") from None
    if not widths or any(b not in (4, 8, 16) for b in widths):
        raise QinjectError(f"--bits must be a comma-separated list of 4, 8, 16, got {text!r}")
    return widths


@cli.command()
def targets() -> None:
    """List the latency tables selectable by name (built in, profiled into the user's cache, plugins)."""

    plugins.load()
    rows = []
    for name in builtin_targets() + sorted(set(plugins.TARGETS) - set(builtin_targets())):
        table = load_target(name)
        rows.append([name, table.kind, len(table.entries), table.description[:70]])
    click.echo(_format_table(["target", "kind", "entries", "description"], rows))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Name of the target the table describes (e.g. my-laptop).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Table to write; if it exists, its entries are reused and kept (a cache).")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size for a symbolic batch dimension.")
@click.option("--bits", default="32/32,16/16,8/8,4/8", show_default=True,
              help="Weight/activation bits to time each quantizable node at in static mode (32/32: float).")
@click.option("--modes", default="static,dynamic,weight-only", show_default=True,
              help="Execution modes to time: static at --bits, dynamic at W8A8, weight-only at W4 and W8 (blocks "
              "of 32), each for the nodes that have it.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=1x128",
              help="Input shape (repeatable), for inputs with symbolic dims other than the batch.")
@click.option("--repeats", type=int, default=15, show_default=True, help="Timed runs per kernel (median kept).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs first.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--save-as-target", is_flag=True,
              help="Also copy the table into the user's target folder, selectable as --target NAME.")
def profile(model: Path, target: str, output: Path, batch: int, bits: str, modes: str, shapes: tuple[str, ...],
            repeats: int, warmup: int, no_progress: bool, save_as_target: bool) -> None:
    """Measure MODEL's latency table on this machine (onnxruntime CPU) and write it to OUTPUT."""


    pairs = _bits_pairs(bits)
    if repeats < 1 or warmup < 0 or batch < 1:
        raise QinjectError("--repeats and --batch must be at least 1 and --warmup at least 0")
    if not output.parent.is_dir():
        raise QinjectError(f"output folder {str(output.parent)!r} does not exist")
    cached = LatencyTable.load(output) if output.exists() else None
    if cached is not None and cached.target != target:
        raise QinjectError(f"{str(output)!r} holds a table for target {cached.target!r}, not {target!r}: "
                           "choose another -o or the same --target")
    start = time.perf_counter()
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    run = run_profile(model, cached, batch=batch, bits=pairs, modes=chosen, warmup=warmup, repeats=repeats,
                      progress=not no_progress, target=target, input_shapes=_shapes(shapes))
    run.table.save(output)
    for failure in run.failed:
        click.echo(f"warning: not measured: {failure}", err=True)
    if save_as_target:
        user_dir().mkdir(parents=True, exist_ok=True)
        click.echo(f"saved as target {target!r}: {run.table.save(user_dir() / f'{target}.json')}")
    click.echo(f"{model.name}: {run.measured} entries measured, {run.reused} reused; {len(run.table.entries)} in "
               f"{output} ({time.perf_counter() - start:.1f} s)")


def _bits_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        w, _, a = item.strip().partition("/")
        if not (w.isdigit() and a.isdigit()):
            raise QinjectError(f"--bits: {item.strip()!r} is not WEIGHTS/ACTIVATIONS (e.g. 8/8, 32/32 for float)")
        pairs.append((int(w), int(a)))
    return pairs


def _plan(plan_path: Path | None, weights: str, activations: str, per_tensor: bool, mode: str = "static",
          block_size: str = "32"):

    if plan_path is not None:
        return Plan.load(plan_path)
    return Plan(NodeQuant(weights=int(weights), activations=int(activations), per_channel=not per_tensor,
                          mode=STATIC if mode == "auto" else mode, block_size=int(block_size)))


def _modes(text: str) -> tuple[str, ...]:

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or "static" not in modes:
        raise QinjectError(f"--modes: {text!r} must list 'static' and any of {list(MODES)}")
    return modes


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output model path.")
@click.option("--pipeline", "text", required=True,
              help="Passes to run, e.g. 'fold-constants,calibrate{method=mse},insert-qdq' (see `qinject passes`).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data for the passes that need it.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), help="Evaluation data for a search.")
@click.option("--target", default="local-cpu", show_default=True, help="Latency table for search/estimate-cost.")
@click.option("--latency-batch", type=int, default=1, show_default=True)
@click.option("--workers", type=int, help="Evaluation processes (default: every core).")
@_executor_option
@click.option("--print-ir-after", "print_after", multiple=True, help="Print the IR after this pass (repeatable).")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR after every pass into this folder.")
@click.option("--timing", is_flag=True, help="Print the seconds each pass took.")
@click.option("--verify-each", is_flag=True, help="Run the full verifier (onnx.checker) after every pass.")
def run(model: Path, output: Path, text: str, calib: Path | None, eval_path: Path | None, target: str,
        latency_batch: int, workers: int | None, executor: str | None, print_after: tuple[str, ...],
        dump_ir: Path | None, timing: bool, verify_each: bool) -> None:
    """Run a textual pass PIPELINE on MODEL and write the result to OUTPUT."""

    pipeline = parse(text)  # a malformed pipeline fails before anything is read
    unknown = [n for n in print_after if n not in {p.name for p in pipeline.passes} | set(passes())]
    if unknown:
        raise QinjectError(f"--print-ir-after: no pass named {unknown[0]!r}")
    onnx_backend.check_output_path(output, model)
    load_target(target)
    ir_model = load_onnx(model)
    context = Context(calib=calib, eval_data=eval_path, target=target, latency_batch=latency_batch, workers=workers,
                      executor=executor)
    # concatenated only if a pass needs whole arrays (sensitivity, search, AdaRound, bias correction)
    context.extra["calib_arrays"] = functools.cache(lambda: _calibration_arrays(calib, ir_model)) if calib else None
    manager = PassManager(build(pipeline, context))
    if print_after:
        manager.after.append(PrintIRAfter(_pipeline_names(pipeline, manager, print_after), click.echo))
    if dump_ir is not None:
        manager.after.append(IRDump(dump_ir))
    if verify_each:
        manager.after.append(VerifyEach())
    ir_model = manager.run(ir_model).model
    save_onnx(ir_model, output, input_path=model)

    found = search_result(ir_model)
    if found is not None:
        found.plan.save(output.with_name(output.name + ".plan.json"))
        click.echo(format_result(found))
    click.echo(f"ran {len(manager.passes)} pass(es): {pipeline} -> {output}")
    if timing:
        click.echo(timing_table(manager))


def _pipeline_names(pipeline: object, manager: object, wanted: tuple[str, ...]) -> set[str]:
    """The pass-instance names the user's pipeline names stand for (``sensitivity`` runs as
    ``sensitivity-quant-error``, ``search`` as ``search-bisection``)."""
    names = set(wanted)
    for spec, instance in zip(pipeline.passes, manager.passes):
        if spec.name in wanted:
            names.add(instance.name)
    return names


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), required=True, help="Calibration data (.npz).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="The report: .html (self-contained) or .md (plots written beside it).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="The plan to review (JSON).")
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), help="Or the rules to review (JSON).")
@click.option("--weights", type=click.Choice(["4", "8", "16"]), default="8", show_default=True)
@click.option("--activations", type=click.Choice(["4", "8", "16"]), default="8", show_default=True)
@click.option("--target", default="local-cpu", show_default=True, help="Latency table: a target name or a path.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size for a symbolic batch dimension.")
@click.option("--verify", type=int, default=3, show_default=True, help="Fixes to run for real to check predictions.")
@click.option("--limit", type=int, default=512, show_default=True, help="At most this many samples.")
@click.option("--workers", type=int, help="Evaluation processes (default: every core).")
def report(model: Path, calib: Path, output: Path, plan_path: Path | None, rules_path: Path | None, weights: str,
           activations: str, target: str, batch: int, verify: int, limit: int, workers: int | None) -> None:
    """Review a plan for MODEL: per-node SQNR, share of output error and latency, and proposed rules
    with their predicted effect (checked against real runs for the largest ones)."""

    if output.suffix.lower() not in (".html", ".htm", ".md"):
        raise QinjectError(f"report output {str(output)!r} must end in .html or .md")
    if not output.parent.is_dir():
        raise QinjectError(f"output folder {str(output.parent)!r} does not exist")
    if plan_path is not None and rules_path is not None:
        raise QinjectError("--plan and --rules exclude each other")
    table = load_target(target)
    rules = Rules.load(rules_path) if rules_path is not None else None
    plan = _plan(plan_path, weights, activations, False) if rules is None else None
    analysed = run_analysis(model, calib, ["quant-error"], bits=(16, 8, 4), workers=workers, limit=limit)
    if rules is not None:

        plan, unmatched = rules.plan(analysed)
        if unmatched:
            click.echo(f"warning: {describe_unmatched(unmatched)}", err=True)
    data = AnalysisData.load(calib, analysed, limit)
    plots = output.parent / (output.stem + "_plots") if output.suffix.lower() == ".md" else None

    with tempfile.TemporaryDirectory() as tmp:
        result = build_report(analysed, plan, table, data.inputs, batch=batch, verify=verify, workers=workers,
                              plot_dir=plots or tmp)
        result.save(output)
    click.echo(f"output SQNR {result.output_sqnr_db:.1f} dB (predicted {result.predicted_sqnr_db:.1f} dB), "
               f"{result.latency_ms:.3f} ms on {table.target}; {result.evaluations} evaluations")
    for row in sorted((r for r in result.rows if r.rule), key=lambda r: -r.error_share)[:5]:
        click.echo(f"  {row.action}: {row.predicted_db:+.2f} dB output SQNR, {row.latency_ms:+.4f} ms "
                   f"({row.error_share:.0%} of the error)")
    errors = result.prediction_errors()
    if errors:
        click.echo(f"predictions checked on {len(errors)} real runs: mean error {np.mean(errors):.2f} dB, "
                   f"largest {max(errors):.2f} dB")
    click.echo(f"wrote {output}")


@cli.command("passes")
@click.argument("name", required=False)
def list_passes(name: str | None) -> None:
    """List every registered pass (built-in and plugins) with its options and docstring."""

    registry = passes()
    if name is not None and name not in registry:
        raise QinjectError(f"unknown pass {name!r} (known: {', '.join(sorted(registry))})")
    for n in [name] if name else sorted(registry):
        click.echo(describe(n))
        click.echo("")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
def inspect(model: Path) -> None:
    """List MODEL's quantizable nodes: name, op, weight shape, MACs, parameters."""

    rows, inner = quantizable_table(model)
    click.echo(_format_table(["node", "op", "weight shape", "MACs", "params"], rows))
    click.echo(f"{len(rows)} quantizable node(s)" + (f", {inner} of them inside control-flow bodies" if inner else ""))


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True,
              help="Folder for the quantized model and plan.")
def demo(out: Path) -> None:
    """Quantize the bundled digits CNN and compare it with the float model."""

    run_demo(out, echo=click.echo)


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _format_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


cli.add_command(finetune_command)


def main() -> None:
    cli(prog_name="qinject")


if __name__ == "__main__":
    main()
