"""The Python entry points: load, trace, quantize and save models (ONNX in, or a JAX function in;
quantized ONNX out, or a jittable quantized JAX function out)."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qinject.backends import jax_backend, onnx_backend
from qinject.compiler import plugins
from qinject.compiler.pipelines import FinetuneOptions, SearchOptions, analysis_pipeline, standard_pipeline
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.calib_data import QinjectWarning, input_specs, largest_uniform_group, open_source, rows
from qinject.core.errors import CalibrationDataError, QinjectError, UnsupportedModelError
from qinject.core.pass_manager import PassManager
from qinject.core.plan import Plan
from qinject.core.rules import Rule, Rules, describe_unmatched
from qinject.core.search_result import search_result
from qinject.cost.estimate import CostReport, estimate
from qinject.cost.latency_table import LatencyTable, load_target
from qinject.frontends import jax_frontend, onnx_frontend
from qinject.passes.rounding.finetune import RESULT as FINETUNE_RESULT
from qinject.passes.sensitivity.base import AnalysisData
from qinject.passes.transforms import keep_slow_kernels_float, prepare
from qinject.passes.transforms.lower_jax_to_onnx import LowerJaxToOnnx

__all__ = ["FinetuneOptions", "QuantizeResult", "SearchOptions", "analyze", "finetune", "estimate_latency", "export_onnx", "load_onnx", "quantize_jax", "quantize_onnx",
           "save_onnx", "standard_pipeline", "to_jax", "trace_jax"]


def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """An ONNX file or ModelProto as an IR model (``frontends.onnx_frontend.load_onnx``), plugins'
    op facts loaded first."""
    plugins.load()
    return onnx_frontend.load_onnx(source)


def trace_jax(fn: Callable, *args: Any, params_argnum: int | None = 0, name: str | None = None) -> ir.Model:
    """A JAX function traced to an IR model (``frontends.jax_frontend.trace_jax``), plugins' op facts
    loaded first."""
    plugins.load()
    return jax_frontend.trace_jax(fn, *args, params_argnum=params_argnum, name=name)


@dataclass
class QuantizeResult:
    """What ``quantize_onnx`` produced.

    Attributes:
        model: the quantized IR model.
        plan: the plan applied.
        output: the file written, if any.
        quantized: names of the nodes that were quantized.
        notes: per node, why part of it stayed float (e.g. a bias that would overflow int32).
        timings: seconds spent in each pass.
    """

    model: ir.Model
    plan: Plan
    output: Path | None = None
    quantized: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)
    cost: CostReport | None = None
    search: Any = None  # qinject.search.SearchResult when a search chose the plan
    measured: dict[str, float] | None = None  # {"float_ms", "quantized_ms", "tried"}: timed here (``measure``)
    finetune: Any = None  # passes.rounding.finetune.FinetuneReport when the plan was fine-tuned
    # the same quantization again with fine-tuning (``qinject.finetune(result, ...)``); None when the
    # source was an IR model, which the rewrite changed in place
    rerun: Callable[[FinetuneOptions], QuantizeResult] | None = field(default=None, repr=False)

    def to_jax(self, mode: str = "integer") -> Callable[..., Any]:
        """The quantized model as a jittable JAX function of the graph inputs (see ``to_jax``)."""
        return to_jax(self.model, mode)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the quantized model as ONNX (a JAX-sourced graph is lowered to ONNX ops first)."""
        return export_onnx(self.model, path)


def _plan_from_rules(rules: Any, model: ir.Model) -> Plan:


    plan, unmatched = rules.plan(model)
    if unmatched:
        warnings.warn(describe_unmatched(unmatched), stacklevel=3)
    return plan


def _calibration_arrays(calib: object, model: ir.Model) -> dict[str, np.ndarray]:
    """Any calibration source as one dict of arrays by input name (what the analyses take); None
    gives random inputs with a warning, as calibration does."""


    arrays, groups = largest_uniform_group(list(open_source(calib, input_specs(model))))
    if groups > 1:
        warnings.warn(f"the calibration data has {groups} input shapes; sensitivity and search measure on the "
                      f"{rows(arrays)} samples of the most common one ({', '.join(f'{k} {list(np.shape(a))}' for k, a in arrays.items())})",
                      QinjectWarning, stacklevel=3)
    return arrays


def estimate_latency(model: str | os.PathLike | onnx.ModelProto | ir.Model, plan: Plan | None = None,
                     target: LatencyTable | str = "local-cpu", batch: int = 1,
                     input_shapes: dict[str, Sequence[int]] | None = None) -> CostReport:
    """Estimated latency of ``model`` quantized by ``plan`` on ``target``, per node and end to end,
    with the float and W16A16 baselines. No calibration is needed: only the plan is priced.
    ``input_shapes`` (input name -> shape) sizes symbolic dims other than the batch.

    Example:
        >>> report = estimate_latency("models/digits_cnn/model.onnx", Plan.uniform(8, 8),
        ...                           "nvidia-a100", batch=64)   # doctest: +SKIP
        >>> print(format_report(report))                         # doctest: +SKIP
    """
    plugins.load()

    table = target if isinstance(target, LatencyTable) else load_target(target)
    ir_model = model if isinstance(model, ir.Model) else load_onnx(model)
    _give_shapes(ir_model, input_shapes)
    ir_model = PassManager(prepare()).run(ir_model).model
    return estimate(ir_model, plan or Plan(), table, batch)


def _give_shapes(model: ir.Model, shapes: dict[str, Sequence[int]] | None) -> None:
    """Record the user's input shapes for latency estimates (they override what calibration sees)."""
    if not shapes:
        return

    names = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in names:
            raise QinjectError(f"--shape names {name!r}, which is not a model input (inputs: {sorted(names)})")
        want = names[name].shape
        if want is not None and len(want) != len(dims):
            raise QinjectError(f"--shape {name}: {len(dims)} dims given, the input has {len(want)} ({list(want)})")
    model.meta[qir.INPUT_SHAPES] = {n: tuple(int(d) for d in dims) for n, dims in shapes.items()}
    model.meta[qir.SHAPES_GIVEN] = True


def quantize_onnx(model: str | os.PathLike | onnx.ModelProto | ir.Model, output: str | os.PathLike | None = None,
                  *, plan: Plan | None = None, calib: object = None, method: str = "minmax",
                  batch_size: int = 16, percentile: float = 99.99, progress: bool = True,
                  target: LatencyTable | str | None = None, latency_batch: int = 1,
                  search: SearchOptions | None = None, adaround: bool = False,
                  bias_correction: bool = False, rules: Any = None,
                  input_shapes: dict[str, Sequence[int]] | None = None, force: bool = False,
                  auto_mode: bool = False, profile: bool = False, measure: bool = False,
                  finetune: FinetuneOptions | None = None) -> QuantizeResult:
    """Quantize an ONNX model: fold constants, calibrate, insert Q/DQ, and optionally save.

    Args:
        model: a path, a ModelProto, or an IR model (modified in place).
        output: where to write the quantized model (atomically; never over the input). A search that
            keeps every node float writes nothing (``result.output`` stays None).
        plan: per-node choices; default W8A8 per-channel for every quantizable node.
        calib: calibration data (see ``qinject.core.calib_data``); None calibrates on random inputs.
        method: activation range method: minmax, percentile, mse or entropy.
        target: a latency table (or target name/path): the result's ``cost`` is the plan's
            estimated latency on it (``latency_batch`` for a symbolic batch dimension).
        search: search for a mixed-precision plan (``SearchOptions``) minimising latency on
            ``target`` (default local-cpu) within an accuracy budget, instead of applying ``plan``;
            ``result.search`` says what it chose, measured and cost.
        adaround, bias_correction: AdaRound / bias-correct the plan's static nodes with at most 4-bit
            per-channel or 8-bit per-tensor weights, on the calibration data (for a search, set them
            in ``SearchOptions``).
        rules: ``qinject.rules.Rules`` giving the plan instead of ``plan`` (rules that match no node
            are reported as a warning).
        input_shapes: input name -> shape for the latency estimate (default: the shapes the
            calibration data had, with the batch at ``latency_batch``).
        force: quantize every node the plan covers, also those whose integer kernel onnxruntime's
            CPU runs slower than float (grouped convolutions), which are otherwise kept float with a
            note unless the plan names them or ``target`` is an accelerator; and those ``target``'s
            table prices faster in float (kept float otherwise, with a note: ``passes/target/fit_target.py``).
        auto_mode: with ``target``, run each node in the execution mode its table prices fastest at
            the plan's width (static or dynamic at 8 bits, static or weight-only at 4).
        profile: first measure on this machine the entries the measured ``target`` (default
            local-cpu) lacks for this model, and cache the extended table (``qinject profile``).
        measure: with a measured ``target`` (a CPU: this machine), time the plan's rewrite against the
            float model here before writing it, and keep float the nodes that make it slower (all of
            them if need be: then nothing is quantized); ``result.measured`` has the timing. Not with
            ``force``.
        finetune: train the plan's scales and weights before the rewrite (``FinetuneOptions``;
            ``qinject.finetune`` is the short way).

    Example:
        >>> result = quantize_onnx("models/digits_cnn/model.onnx", "/tmp/q.onnx",
        ...                        calib="models/digits_cnn/calib.npz")  # doctest: +SKIP
    """
    plugins.load()
    plan = plan or Plan()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        onnx_backend.check_output_path(output, input_path)  # before any work, not after calibration
    ir_model = model if isinstance(model, ir.Model) else load_onnx(model)
    _give_shapes(ir_model, input_shapes)
    if rules is not None and search is None:
        plan = _plan_from_rules(rules, ir_model)
    kept_float: dict[str, str] = {}
    if search is None:
        if not force and not _accelerator(target):
            plan, kept_float = keep_slow_kernels_float(ir_model, plan)
    elif not force and not _accelerator(target or "local-cpu"):
        search, kept_float = _pin_slow_kernels_float(ir_model, search)
    result = _quantize(ir_model, plan, calib, method, batch_size, percentile, progress, target, latency_batch,
                       search, adaround, bias_correction, kept_float, fit=not force, auto_mode=auto_mode,
                       profile=profile, measure=measure, finetune=finetune)
    if not isinstance(model, ir.Model):
        result.rerun = lambda options: quantize_onnx(
            model, plan=result.plan, calib=calib, method=method, batch_size=batch_size, percentile=percentile,
            progress=progress, target=target, latency_batch=latency_batch, input_shapes=input_shapes, force=True,
            finetune=options)
    # A search that keeps every node float writes nothing: the file would be the float model
    # re-serialised (at opset 21: keras MobileNetV2 ran 1.02x-1.03x of its source), never faster.
    if output is not None and (result.quantized or result.search is None):
        result.output = save_onnx(result.model, output, input_path=input_path)
    return result


def _accelerator(target: LatencyTable | str | None) -> bool:
    if target is None:
        return False
    return (target if isinstance(target, LatencyTable) else load_target(target)).kind == "analytic"


def _pin_slow_kernels_float(model: ir.Model, search: SearchOptions) -> tuple[SearchOptions, dict[str, str]]:
    """The search with the main-graph nodes whose CPU integer kernel is slower than float pinned float
    (after the user's own rules, which win where they match)."""


    _, kept = keep_slow_kernels_float(model, Plan())
    kept = {name: reason for name, reason in kept.items()
            if any(n.name == name for n in model.graph)}  # rules pin main-graph nodes
    if not kept:
        return search, {}
    user = search.rules if search.rules is not None else Rules()
    pins = tuple(Rule(name=re.escape(name), skip=True, comment="slower quantized on onnxruntime's CPU")
                 for name in kept)
    return dataclasses.replace(search, rules=Rules((*user.rules, *pins), user.default)), kept


def quantize_jax(fn: Callable, params: Any, *example_inputs: Any, output: str | os.PathLike | None = None,
                 plan: Plan | None = None, calib: object = None, method: str = "minmax",
                 percentile: float = 99.99, progress: bool = True,
                 target: LatencyTable | str | None = None, search: SearchOptions | None = None,
                 finetune: FinetuneOptions | None = None) -> QuantizeResult:
    """Trace ``fn(params, *example_inputs)``, calibrate and quantize it, optionally write ONNX.

    The same passes as ``quantize_onnx`` run on the traced graph; calibration runs through the
    JAX backend. The result's ``to_jax(mode)`` is the quantized function of the inputs (weights
    baked in), ``save(path)`` writes it as a QDQ ONNX file.

    Args:
        fn: a JAX function whose first argument is the parameter pytree.
        params: the parameters (their values become the weights).
        example_inputs: arrays with the shapes and dtypes the quantized function will take (a traced
            graph is specialised to them, as a jaxpr is).
        calib: calibration inputs: an array (single-input functions), a dict keyed by input name
            (the function's parameter names: ``x`` for ``fn(params, x)``), or any source
            ``quantize_onnx`` accepts. Calibration runs in batches of the example's batch size.
        target: a latency table (or target name/path): the result's ``cost`` is the plan's
            estimated latency on it.
        search: search for a mixed-precision plan instead of applying ``plan`` (see ``quantize_onnx``).
        finetune: train the plan's scales and weights before the rewrite (see ``qinject.finetune``).

    Example:
        >>> result = quantize_jax(forward, params, x[:64], calib=x_calib)  # doctest: +SKIP
        >>> qfn = jax.jit(result.to_jax("integer"))                        # doctest: +SKIP
        >>> logits = qfn(x[:64])                                           # doctest: +SKIP
    """
    plugins.load()
    plan = plan or Plan()
    if output is not None:
        onnx_backend.check_output_path(output)
    ir_model = trace_jax(fn, params, *example_inputs)
    result = _quantize(ir_model, plan, calib, method, 16, percentile, progress, target, 1, search,
                       finetune=finetune)
    result.rerun = lambda options: quantize_jax(fn, params, *example_inputs, plan=result.plan, calib=calib,
                                                method=method, percentile=percentile, progress=progress,
                                                target=target, finetune=options)
    if output is not None:
        result.output = result.save(output)
    return result


def _quantize(ir_model: ir.Model, plan: Plan, calib: object, method: str, batch_size: int, percentile: float,
              progress: bool, target: LatencyTable | str | None = None, latency_batch: int = 1,
              search: SearchOptions | None = None, adaround: bool = False,
              bias_correction: bool = False, kept_float: dict[str, str] | None = None, fit: bool = False,
              auto_mode: bool = False, profile: bool = False, measure: bool = False,
              finetune: FinetuneOptions | None = None) -> QuantizeResult:

    if not any(op_facts.fact(n).quantizable for n in ir_model.graph.all_nodes()):
        raise UnsupportedModelError(_nothing_to_quantize(ir_model))
    for node in qir.quantizable_nodes(ir_model):  # before any work: a NaN weight would poison every scale
        weight = op_facts.weight_of(node)
        if weight is not None and weight.const_value is not None:
            array = weight.const_value.numpy()
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise UnsupportedModelError(f"node {node.name!r}: weight {weight.name!r} contains NaN or Inf")
    needs_arrays = search is not None or adaround or bias_correction or (finetune is not None and finetune.data is None)
    if needs_arrays and calib is None:

        raise CalibrationDataError("a search, AdaRound, bias correction and fine-tuning need calibration data")
    analysis = _calibration_arrays(calib, ir_model) if needs_arrays else None
    if search is not None and search.eval_data is not None:

        # loaded once, here: bad evaluation data fails before any work, and the search reuses it
        search = dataclasses.replace(search, eval_data=AnalysisData.load(search.eval_data, ir_model, search.limit))
    manager = PassManager(standard_pipeline(plan, calib, method, batch_size, percentile, progress, target,
                                            latency_batch, search, analysis, adaround, bias_correction, fit,
                                            auto_mode, profile, measure, finetune,
                                            slow_kernels=tuple(kept_float or ())))
    ir_model = manager.run(ir_model).model
    found = search_result(ir_model)
    if found is not None:
        plan = found.plan
    plan = ir_model.meta.get(qir.CHOSEN_PLAN, plan)
    result = QuantizeResult(ir_model, plan, timings=manager.timings, cost=ir_model.meta.get(qir.COST_REPORT),
                            search=found, measured=ir_model.meta.get(qir.MEASURED_LATENCY),
                            finetune=ir_model.meta.get(FINETUNE_RESULT))
    inner = [n for n in ir_model.graph.all_nodes() if n.graph is not ir_model.graph]
    for node in [*ir_model.graph, *inner]:  # main graph first, then control-flow bodies
        if qir.QUANT_APPLIED in node.meta:
            result.quantized.append(node.name)
        for key in _NOTE_KEYS:
            if node.meta.get(key):
                result.notes.setdefault(node.name, []).extend(node.meta[key])
    for name, reason in (kept_float or {}).items():
        if name not in result.quantized:  # fit-measured may have found it pays on integers here
            result.notes.setdefault(name, []).append(reason)
    # nothing left of what was asked (or searched): fit-target or fit-measured kept it all float
    if not result.quantized and (_plans_anything(plan) or (found is not None and _plans_anything(found.plan))):
        raise UnsupportedModelError(_nothing_to_quantize(ir_model, result.notes))
    return result


# Where passes leave notes on nodes: the rewrite's, and AdaRound's and bias correction's
# (passes/adaround.NOTES, passes/bias_correction.NOTES; named here so a plain quantize need not
# import jax and optax).
_NOTE_KEYS = (qir.QUANT_NOTES, "qinject.adaround.notes", "qinject.bias_correction.notes")


def _plans_anything(plan: Plan) -> bool:
    return plan.default is not None or any(c is not None for c in plan.nodes.values())


def _nothing_to_quantize(model: ir.Model, notes: dict[str, list[str]] | None = None) -> str:
    """Why a model has no quantizable node: its weights are not constants, or it has no such op; or
    why nothing was quantized (each node's note says why it stayed float)."""

    if notes:
        # a quantizable node's own reason first (a container's note only sums up its bodies')
        searchable = {n.name for n in qir.searchable_nodes(model)}
        node, reasons = next(((n, r) for n, r in notes.items() if n in searchable), next(iter(notes.items())))
        return f"nothing was quantized: {len(notes)} node(s) stayed float (node {node!r}: {reasons[-1]})"
    nodes = list(model.graph.all_nodes())
    candidates = [n for n in nodes if op_facts.fact(n).quantizable and op_facts.weight_index(n) is not None]
    if candidates:
        node = candidates[0]
        weight = node.inputs[op_facts.weight_index(node)] if op_facts.weight_index(node) < len(node.inputs) else None
        where = "a graph input" if weight is not None and weight.is_graph_input() else "computed at run time"
        return (f"nothing to quantize: the weights of {len(candidates)} node(s) are not constants (node "
                f"{node.name!r} ({node.op_type}) reads {weight.name if weight else 'its weight'!r}, {where}); "
                "make the weights initializers (e.g. export with the parameters baked in)")
    ops = sorted({n.op_type for n in nodes})
    why = next((f" ({n.op_type}: {r.removeprefix('left float: ')})" for n in nodes
                if (r := op_facts.fact(n).float_reason) is not None), "")  # GRU: no integer kernel at all
    return (f"the model has no quantizable op (Conv, ConvTranspose, Gemm, MatMul, LSTM, ...; it has "
            f"{', '.join(ops[:8])}{', ...' if len(ops) > 8 else ''}): nothing to quantize{why}")


def finetune(model_or_result: QuantizeResult | str | os.PathLike | onnx.ModelProto | ir.Model, data: object,
             steps: int = 500, loss: Callable[..., Any] | None = None, *, output: str | os.PathLike | None = None,
             plan: Plan | None = None, calib: object = None, method: str = "minmax", progress: bool = True,
             **options: Any) -> QuantizeResult:
    """Quantization-aware fine-tuning: the plan's quantized model trained on ``data``, then written in the
    same QDQ form as a plain quantization (``passes/rounding/finetune.py``).

    Args:
        model_or_result: a ``QuantizeResult`` of ``quantize_onnx`` (from a file or ModelProto) or
            ``quantize_jax``: the same quantization is run again with fine-tuning, on its plan (a
            search's too); or a float ONNX model (path, ModelProto, IR model), quantized by ``plan``.
        data: training inputs (an ``.npz``, a dict by input name or an array; ``labels`` optional).
        steps: optimisation steps.
        loss: ``loss(outputs, batch) -> scalar`` in JAX; None: distillation from the float model
            (KL for classifiers, normalised MSE otherwise), which needs no labels.
        output: where to write the fine-tuned QDQ ONNX model.
        plan: for a float model: the plan (default W8A8); calib: its calibration data (default ``data``);
            method: its calibration range method (as ``quantize_onnx``'s).
        options: ``FinetuneOptions`` fields (batch, lr, weight_lr, optimizer, train_weights, init,
            act_init, oscillation, checkpoint, checkpoint_every, seed, limit).

    Returns:
        The ``QuantizeResult``; its ``finetune`` says what the training did.

    Example:
        >>> result = quantize_jax(forward, params, x[:64], calib=x_calib, plan=Plan.uniform(4, 8))  # doctest: +SKIP
        >>> tuned = finetune(result, x_train, steps=300)                                          # doctest: +SKIP
        >>> tuned.save("model.qat.onnx"); qfn = tuned.to_jax("integer")                           # doctest: +SKIP
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(FinetuneOptions)})
    if unknown:
        raise QinjectError(f"finetune: unknown option(s) {unknown} (expected some of "
                           f"{sorted(f.name for f in dataclasses.fields(FinetuneOptions))})")
    settings = FinetuneOptions(data=data, steps=steps, loss=loss, **options)
    if isinstance(model_or_result, QuantizeResult):
        if model_or_result.rerun is None:
            raise QinjectError("this QuantizeResult was quantized from an IR model, which the rewrite changed in "
                               "place; fine-tune from the float model instead: qinject.finetune('model.onnx', data, "
                               "plan=result.plan)")
        if output is not None:
            onnx_backend.check_output_path(output)
        result = model_or_result.rerun(settings)
        if output is not None:
            result.output = result.save(output)
        return result
    return quantize_onnx(model_or_result, output, plan=plan, calib=data if calib is None else calib, method=method,
                         progress=progress, finetune=settings)


def analyze(model: str | os.PathLike | onnx.ModelProto | ir.Model, calib: object, metrics: Sequence[str],
            *, eval_data: object = None, bits: tuple[int, ...] = (16, 8, 4), method: str = "minmax",
            workers: int | None = None, seed: int = 0, limit: int | None = 512, progress: bool = True,
            executor: str | None = None) -> ir.Model:
    """Run sensitivity signals (``qinject.passes.sensitivity.SIGNALS``: quant-error, noise, hessian,
    interlayer, bit-error) and return the calibrated model with every quantizable node annotated;
    ``qinject.passes.sensitivity.report(model)`` gathers them.

    Args:
        calib: calibration data (as for ``quantize_onnx``); also the evaluation data when
            ``eval_data`` is None (then damage is measured against the float model's outputs).
        eval_data: an ``.npz`` (inputs by name, optional ``labels``), a dict or an array.
        limit: at most this many evaluation samples.
        executor: where the evaluations run: None or "process" (a local pool of ``workers``
            processes), "ray" (a local Ray) or "ray://HOST:PORT" (a Ray cluster; ``qinject[ray]``).
    """
    plugins.load()

    ir_model = model if isinstance(model, ir.Model) else load_onnx(model)
    if eval_data is None:
        eval_data = _calibration_arrays(calib, ir_model)
    data = AnalysisData.load(eval_data, ir_model, limit)  # bad data fails before any work
    passes = analysis_pipeline(metrics, calib, data, bits=bits, method=method, workers=workers, seed=seed,
                               progress=progress, executor=executor)
    return PassManager(passes).run(ir_model).model


def to_jax(model: ir.Model, mode: str = "integer") -> Callable[..., Any]:
    """Any IR graph (quantized or not, ONNX- or JAX-sourced) as a jittable JAX function.

    ``mode="integer"`` runs quantized dots and convolutions on int8 operands with int32
    accumulation; ``"simulated"`` quantizes and dequantizes in float and is differentiable.
    """

    return jax_backend.to_jax(model, mode)


def export_onnx(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write any IR graph as ONNX, lowering jaxpr equations to ONNX ops first (on a copy: the
    model itself keeps its jax nodes, so it still runs exactly as traced)."""
    if qir.has_jax_nodes(model):

        model = PassManager([LowerJaxToOnnx()]).run(model.clone()).model
    return save_onnx(model, path)


def save_onnx(model: ir.Model, path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Write the model atomically after a full onnx.checker check; with external data when the
    input model had it (or the model is too large for one protobuf)."""
    external = True if input_path is not None and onnx_backend.uses_external_data(input_path) else None
    return onnx_backend.save(model, path, input_path=input_path, external_data=external)

