"""The built-in passes under their stable pipeline names, with typed options.

A factory builds each pass from its options and the caller's ``Context`` (calibration and
evaluation data, target); the pass classes themselves live in ``passes/``. Importing this module
registers them.
"""

from __future__ import annotations

from typing import Any

from qinject.compiler.registry import Context, Option, register
from qinject.core.pass_manager import Pass
from qinject.core.plan import Plan
from qinject.core.stats import METHODS
from qinject.passes.rounding.adaround import AdaRound
from qinject.passes.rounding.bias_correction import BiasCorrection
from qinject.passes.rounding.finetune import OSCILLATION, Finetune
from qinject.passes.search import SEARCH_PASSES, SEARCHES
from qinject.passes.search.base import SearchPass
from qinject.passes.sensitivity import SIGNALS, signal_pass
from qinject.passes.sensitivity.base import SensitivityPass
from qinject.passes.target.estimate_cost import EstimateCost
from qinject.passes.target.fit_measured import FitMeasured
from qinject.passes.target.fit_target import FitTarget
from qinject.passes.transforms.calibrate import Calibrate
from qinject.passes.transforms.fold_constants import FoldConstants
from qinject.passes.transforms.fold_conv_affine import FoldConvAffine
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.passes.transforms.lower_jax_to_onnx import LowerJaxToOnnx
from qinject.passes.transforms.split_skip_layernorm import SplitSkipLayerNorm
from qinject.passes.transforms.upgrade_opset import UpgradeOpset

# The choices of sensitivity{metric=...} and search{algo=...}, from the tables of the pass groups; the
# command line reads them back from the registry (``registry.choices``).
SIGNAL_NAMES = tuple(SIGNALS)
SEARCH_NAMES = SEARCHES
_METHOD = Option("method", str, "minmax", "how activation ranges are chosen", METHODS)


def _calib(context: Context) -> object:
    """Calibration data as whole arrays where the CLI offers them (built on first need), else as given."""
    arrays = context.extra.get("calib_arrays", context.calib)
    return arrays() if callable(arrays) else arrays


@register("fold-constants", pass_class=FoldConstants,
          doc="""Fold the constant chains feeding quantizable nodes' weights and biases
(Constant, Identity, Cast, Reshape, ConstantOfShape, ...), so the rewrite sees constant weights.""")
def _fold_constants(context: Context, o: dict[str, Any]) -> Pass:

    return FoldConstants()


@register("fold-conv-affine", pass_class=FoldConvAffine,
          doc="""Fold BatchNormalization, and Mul/Add by per-channel constants, after a
Conv into the Conv, so the integer kernel computes what was quantized.""")
def _fold_conv_affine(context: Context, o: dict[str, Any]) -> Pass:

    return FoldConvAffine()


@register("upgrade-opset", (Option("opset", int, 21, "the least default-domain opset"),),
          pass_class=UpgradeOpset,
          doc="""Convert the model to at least this opset (per-axis Q/DQ needs 13; int4/int16 need 21).""")
def _upgrade_opset(context: Context, o: dict[str, Any]) -> Pass:

    return UpgradeOpset(o["opset"])


@register("calibrate", (_METHOD, Option("batch-size", int, 16, "samples per run for a symbolic batch")),
          pass_class=Calibrate,
          doc="""Collect activation statistics (min/max and histograms) on the calibration data.""")
def _calibrate(context: Context, o: dict[str, Any]) -> Pass:

    return Calibrate(context.calib, method=o["method"], batch_size=o["batch-size"], progress=context.progress)


@register("sensitivity", (Option("metric", str, "quant-error", "the signal", SIGNAL_NAMES),
                          Option("seed", int, 0), Option("limit", int, 512, "at most this many samples")),
          pass_class=SensitivityPass,
          doc="""Annotate every quantizable node with a sensitivity signal per bit width, measured on the
calibration data (see `qinject analyze`).""")
def _sensitivity(context: Context, o: dict[str, Any]) -> Pass:

    return signal_pass(o["metric"], _calib(context), seed=o["seed"], workers=context.workers,
                       executor=context.executor, progress=context.progress, limit=o["limit"])


@register("search", (Option("algo", str, "bisection", "the search", SEARCH_NAMES),
                     Option("max-drop", str, "1%", "the budget: 1% relative, 0.5pt absolute points"),
                     Option("signal", str, "quant-error", "the sensitivity the nodes are ranked by", SIGNAL_NAMES),
                     Option("adaround", bool, False, "AdaRound 4-bit weights in the evaluations"),
                     Option("bias-correction", bool, False, "correct 4-bit nodes' biases in the evaluations"),
                     Option("limit", int, 2048, "at most this many evaluation samples")),
          pass_class=SearchPass,
          doc="""Choose 16/8/4 bits per node minimising the latency on the target within the accuracy budget
on the evaluation data (the calibration data without --eval). Needs the `sensitivity` pass of the
same signal before it; `insert-qdq` then applies the result.""")
def _search(context: Context, o: dict[str, Any]) -> Pass:

    data = _calib(context)
    evaluation = context.eval_data if context.eval_data is not None else data
    return SEARCH_PASSES[o["algo"]](evaluation, o["max-drop"], context.target, metric=context.metric,
                                    signal=o["signal"], batch=context.latency_batch, workers=context.workers,
                                    executor=context.executor,
                                    limit=o["limit"], adaround=o["adaround"], bias_correction=o["bias-correction"],
                                    calib=data, progress=context.progress)


@register("adaround", (Option("max-bits", int, 4, "round nodes with at most this many weight bits"),
                       Option("per-tensor-max-bits", int, 8, "and per-tensor weights of at most this many bits"),
                       Option("iterations", int, 500, "optimisation steps per layer")),
          pass_class=AdaRound,
          doc="""AdaRound the low-bit weights of the plan (the search's, else insert-qdq's uniform one is not
known yet: give a search first).""")
def _adaround(context: Context, o: dict[str, Any]) -> Pass:

    return AdaRound(_calib(context), None, max_bits=o["max-bits"], per_tensor_max_bits=o["per-tensor-max-bits"],
                    iterations=o["iterations"], progress=context.progress)


@register("bias-correction", (Option("max-bits", int, 4, "correct nodes with at most this many weight bits"),
                              Option("per-tensor-max-bits", int, 8,
                                     "and per-tensor weights of at most this many bits")),
          pass_class=BiasCorrection,
          doc="""Subtract each low-bit node's mean output shift from its float bias (the search's plan).""")
def _bias_correction(context: Context, o: dict[str, Any]) -> Pass:

    return BiasCorrection(_calib(context), None, max_bits=o["max-bits"],
                          per_tensor_max_bits=o["per-tensor-max-bits"])


@register("finetune", (Option("steps", int, 500, "optimisation steps"),
                       Option("batch", int, 32, "samples per step"),
                       Option("lr", float, 1e-2, "scale/offset step, as a fraction of the initial scale"),
                       Option("weight-lr", float, 1e-2, "weight step, as a fraction of the channel's quantization step"),
                       Option("train-weights", bool, True, "train float weights and biases too"),
                       Option("init", str, "mse", "weight scales from", ("mse", "minmax")),
                       Option("act-init", str, "calib", "activation scales from", ("calib", "mse")),
                       Option("oscillation", str, "auto", "oscillation control", OSCILLATION),
                       Option("checkpoint", str, "", "an .npz saved as it trains, resumed from if present"),
                       Option("weights", int, 8, "uniform weight bits when no search ran (as insert-qdq's)"),
                       Option("activations", int, 8, "uniform activation bits when no search ran"),
                       Option("plan", str, "", "a plan file to train instead"), _METHOD),
          pass_class=Finetune,
          doc="""Quantization-aware fine-tuning of the plan (the search's or fitted one, else the plan file, else
uniform bits: give insert-qdq the same): LSQ+ scales and offsets, and the weights, trained by
distillation from the float model on the calibration data; insert-qdq then writes the learned values.""")
def _finetune(context: Context, o: dict[str, Any]) -> Pass:

    return Finetune(_calib(context), steps=o["steps"], batch=o["batch"], lr=o["lr"], weight_lr=o["weight-lr"],
                    train_weights=o["train-weights"], init=o["init"], act_init=o["act-init"],
                    oscillation=o["oscillation"], checkpoint=o["checkpoint"] or None, method=o["method"], progress=context.progress,
                    plan=Plan.load(o["plan"]) if o["plan"] else None,
                    fallback=Plan.uniform(o["weights"], o["activations"]))


@register("estimate-cost", (Option("batch", int, 0, "batch for a symbolic batch dimension (0: --latency-batch)"),),
          pass_class=EstimateCost,
          doc="""Estimate the latency of the plan about to be applied on the target (the search's plan).""")
def _estimate_cost(context: Context, o: dict[str, Any]) -> Pass:

    return EstimateCost(None, context.target, o["batch"] or context.latency_batch)


@register("fit-target", (Option("weights", int, 8, "uniform weight bits"),
                         Option("activations", int, 8, "uniform activation bits"),
                         Option("per-channel", bool, True, "one weight scale per output channel"),
                         Option("plan", str, "", "a plan file to fit instead"),
                         Option("auto-mode", bool, False, "run each node in its fastest execution mode"),
                         Option("batch", int, 0, "batch for a symbolic batch dimension (0: --latency-batch)")),
          pass_class=FitTarget,
          doc="""Fit the plan to the target: nodes it prices faster in float stay float, and with
auto-mode each node runs in its fastest mode (static, dynamic, weight-only); insert-qdq applies it.""")
def _fit_target(context: Context, o: dict[str, Any]) -> Pass:

    plan = Plan.load(o["plan"]) if o["plan"] else Plan.uniform(o["weights"], o["activations"],
                                                                per_channel=o["per-channel"])
    return FitTarget(plan, context.target, o["batch"] or context.latency_batch, o["auto-mode"])


@register("fit-measured", (_METHOD, Option("percentile", float, 99.99, "for method=percentile"),
                           Option("budget", float, 2.0, "seconds each timing takes"),
                           Option("batch", int, 0, "batch for a symbolic batch dimension (0: --latency-batch)")),
          pass_class=FitMeasured,
          doc="""Time the plan's rewrite against the float model on this machine; if it is slower, keep float
the nodes the target's estimate credits least until it is faster (or all of them).""")
def _fit_measured(context: Context, o: dict[str, Any]) -> Pass:

    return FitMeasured(None, context.target, o["batch"] or context.latency_batch, method=o["method"],
                       percentile=o["percentile"], budget_s=o["budget"])


@register("insert-qdq", (Option("weights", int, 8, "uniform weight bits when no search ran"),
                         Option("activations", int, 8, "uniform activation bits when no search ran"),
                         Option("per-channel", bool, True, "one weight scale per output channel"),
                         Option("plan", str, "", "a plan file to apply instead"), _METHOD,
                         Option("percentile", float, 99.99, "for method=percentile")),
          pass_class=InsertQDQ,
          doc="""Insert QuantizeLinear/DequantizeLinear: the search's plan if a search ran, else the plan
file, else uniform weights/activations bits.""")
def _insert_qdq(context: Context, o: dict[str, Any]) -> Pass:

    plan = Plan.load(o["plan"]) if o["plan"] else None
    fallback = Plan.uniform(o["weights"], o["activations"], per_channel=o["per-channel"])
    return InsertQDQ(plan, method=o["method"], percentile=o["percentile"], fallback=fallback)


@register("split-skip-layernorm", (Option("always", bool, False,
                                          "split even where fit-measured did not time it faster"),),
          pass_class=SplitSkipLayerNorm,
          doc="""Write as Sum each Add onnxruntime would fuse with the LayerNormalization after it into
SkipLayerNormalization (slower than the two on some CPUs): where fit-measured timed it faster, or always.""")
def _split_skip_layernorm(context: Context, o: dict[str, Any]) -> Pass:

    return SplitSkipLayerNorm(always=o["always"])


@register("lower-jax-to-onnx", pass_class=LowerJaxToOnnx,
          doc="""Replace every jax-domain node by standard ONNX ops (for graphs traced
from JAX).""")
def _lower(context: Context, o: dict[str, Any]) -> Pass:

    return LowerJaxToOnnx()
