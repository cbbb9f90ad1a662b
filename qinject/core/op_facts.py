"""The one table of op facts, keyed by (domain, op_type).

For each op: is it quantizable, which input is the activation, which the weight and the bias (and
when the bias cannot join the integer kernel), the weight's output-channel and reduction axes, the
output's channel axis, how to count its multiply-accumulates and group it in a latency key, its
execution modes, which integer kernel the JAX backend builds for it, and whether the Q/DQ of a
quantized producer may move past it. Ops not listed here flow through every pass unchanged; a new
quantizable op is one entry here plus how it runs in JAX (``qinject.backends``).

Two domains: ONNX's default domain, and ``jax``, whose nodes stand for jaxpr equations (op_type is
the primitive's name; the primitive and its parameters are kept in the node's ``meta`` under
``JAX_EQN``). How each op runs in JAX lives with the JAX backend (``qinject.backends.jax_ops``),
and how a jax primitive becomes ONNX with the lowering pass (``passes/transforms/lower_jax_to_onnx.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from qinject.core.errors import QinjectError

ONNX = ""
JAX = "jax"
JAX_EQN = "qinject.jax.eqn"  # node meta key holding the JaxEqn of a jax-domain node


@dataclass(frozen=True)
class JaxEqn:
    """What a ``jax``-domain node stands for: a primitive and its parameters, re-bound exactly."""

    primitive: Any
    params: dict[str, Any]


def jax_params(node: ir.Node) -> dict[str, Any]:
    """The jaxpr parameters of a jax-domain node (e.g. ``dimension_numbers``)."""
    eqn = node.meta.get(JAX_EQN)
    if eqn is None:
        raise KeyError(f"jax node {node.name!r} ({node.op_type}) has lost its equation (meta {JAX_EQN!r})")
    return eqn.params


@dataclass(frozen=True)
class OpFact:
    """What the passes need to know about one op type.

    Attributes:
        quantizable: whether the op can run on integer operands (a weight and/or activations).
        activation_inputs: indices of inputs that are activations to quantize (or a function of
            the node, for ops whose weight may sit on either side, such as jax's dot_general).
        weight_input: index of the constant weight input, a function of the node, or None.
        bias_input: index of the optional bias (quantized to int32 with scale s_x * s_w).
        channel_axis: the weight's output-channel axis, as a function of the node (attributes).
        macs: multiply-accumulates of one execution, from shapes; None if shapes are unknown.
        needs_quantized_output: onnxruntime fuses the op into an integer kernel only when its output
            is quantized too (QLinearConv), or a function of the node saying when: Gemm and MatMul
            fuse with a float output (QGemm, MatMulIntegerToFloat) unless a ReLU follows.
        range_preserving: moves or selects values without changing their range (MaxPool, Reshape):
            a Q/DQ after it may share the scale of the Q/DQ before it, letting onnxruntime run the
            op on integers or drop it from the integer chain. Its first output carries the range
            (MaxPool's indices, Dropout's mask do not), or every output where ``splits``. A
            function of the node where it depends on attributes (Resize: nearest only).
        splits: a range-preserving op whose every output is a piece of its input (Split), each
            carrying the input's range (onnxruntime runs it on integers when all share one scale).
        epilogue: whether this node, as the only consumer of a quantized node's output, belongs
            to that node's output stage (a ReLU; in jax graphs also the bias add), so the output's
            Q/DQ goes after it. A function of the consumer node.
        zero_copy: only relabels its input (Reshape, Flatten, Squeeze): a runtime moves no bytes,
            so a latency model charges it the fixed per-op overhead alone.
        joins_integers: with every input quantized and its output read quantized, runs on the
            integers (Concat: onnxruntime's QLinearConcat, whatever the inputs' scales).
        lookup_range: a unary op onnxruntime runs on integers by a table lookup (QLinearSigmoid)
            when its input is quantized: maps the input's range to the output's (a monotone
            function), so its output's Q/DQ needs no calibration. Used where its output feeds an
            op that joins integers (SiLU: Mul(x, Sigmoid(x))).
        float_reason: an op with weights that the Q/DQ rewrite leaves float, and why (said on the
            node, so a user sees what stayed float).
        slower_on_cpu: a function of the node giving why onnxruntime's CPU integer kernel for it is
            slower than its float one (None: it is not). A plain quantize leaves such nodes float
            unless forced, so the output is never slower than the float model for their sake.
        dynamic: the op has a dynamic-quantization form (activations quantized at run time): MatMul
            and Gemm with a constant weight, which onnxruntime fuses into DynamicQuantizeMatMul, jax's
            dot_general, and LSTM (onnxruntime's DynamicQuantizeLSTM).
        reduction_axis: the weight's reduction (input-channel) axis, as a function of the node:
            weight-only blocks run along it (None: the op has no weight-only form).
        two_activations: without a constant weight the op multiplies two activations (attention
            scores: MatMul, dot_general) and both inputs are quantized.
        weight_only_kernel: a weight-only node runs on an integer-weight kernel (onnxruntime's
            MatMulNBits for MatMul/Gemm) rather than as dequantize + the float op (Conv).
        bias_unfused: a function of the node and its bias array giving why the bias cannot be stored
            in the integer kernel's layout (int32 at scale s_x * s_w), or None (it can).
        output_channel_axis: the output's channel axis (negative: from the end), along which the
            bias is added: bias correction averages the output's shift over the other axes.
        dense: a dense layer: it acts on each row (the last axis) of its activation alone, so a
            [..., K] activation may be taken as rows [N, K] (AdaRound samples rows).
        sets_layout: onnxruntime chooses a spatial layout (NCHWc float, NHWC integer) for the op's
            kernel and keeps its neighbours in it: the profiler times probes beside one.
        groups: the number of groups of a grouped op, a function of the node (None: the default
            domain's ``group`` attribute), which its latency key records.
        integer_kernel: the name of the JAX backend's integer-kernel builder for the op
            (``qinject.backends.jax_integer.INTEGER_KERNELS``), or None: it runs in float on
            dequantized operands there.
        no_static: why the op has no static form (calibrated Q/DQ around it), or None (it has one):
            such an op runs only its other modes (LSTM: dynamic), and a static choice leaves it float.
        dynamic_lowering: how the Q/DQ rewrite writes the op's dynamic form: None, the MatMulInteger
            pattern (MatMul, Gemm); "recurrent", onnxruntime's DynamicQuantizeLSTM (LSTM).
        weight_inputs: every constant weight input of an op with several (LSTM's W and R), which a
            dynamic form stores as integers; None: only ``weight_input``.
    """

    quantizable: bool = False
    activation_inputs: tuple[int, ...] | Callable[[ir.Node], tuple[int, ...]] = (0,)
    weight_input: int | Callable[[ir.Node], int | None] | None = None
    bias_input: int | None = None
    channel_axis: Callable[[ir.Node], int | None] | None = None
    macs: Callable[[ir.Node], int | None] | None = None
    needs_quantized_output: bool | Callable[[ir.Node], bool] = False
    range_preserving: bool | Callable[[ir.Node], bool] = False
    splits: bool = False
    epilogue: Callable[[ir.Node], bool] | None = None
    zero_copy: bool = False
    joins_integers: bool | Callable[[ir.Node], bool] = False
    lookup_range: Callable[[float, float], tuple[float, float]] | None = None
    float_reason: str | None = None
    slower_on_cpu: Callable[[ir.Node], str | None] | None = None
    dynamic: bool = False
    reduction_axis: Callable[[ir.Node], int | None] | None = None
    two_activations: bool = False
    weight_only_kernel: bool = False
    bias_unfused: Callable[[ir.Node, np.ndarray], str | None] | None = None
    output_channel_axis: int | None = None
    dense: bool = False
    sets_layout: bool = False
    groups: Callable[[ir.Node], int] | None = None
    integer_kernel: str | None = None
    no_static: str | None = None
    dynamic_lowering: str | None = None
    weight_inputs: tuple[int, ...] | None = None


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in value.shape]
    return None if None in dims else dims


def _conv_macs(node: ir.Node) -> int | None:
    out, w = _dims(node.outputs[0]), _dims(node.inputs[1])
    if out is None or w is None:
        return None
    # Each output element sums C_in/group * kernel products; the weight is [C_out, C_in/group, k...].
    return math.prod(out) * math.prod(w[1:])


def _conv_transpose_macs(node: ir.Node) -> int | None:
    x, w = _dims(node.inputs[0]), _dims(node.inputs[1])
    if x is None or w is None:
        return None
    # Every input element is scattered through a [C_out/group, k...] slice of the weight.
    return math.prod(x) * math.prod(w[1:])


def _matmul_macs(node: ir.Node) -> int | None:
    a, out = _dims(node.inputs[0]), _dims(node.outputs[0])
    if a is None or out is None:
        return None
    return math.prod(out) * a[-1]


def _gemm_macs(node: ir.Node) -> int | None:
    a, out = _dims(node.inputs[0]), _dims(node.outputs[0])
    if a is None or out is None:
        return None
    k = a[0] if _attr_int(node, "transA", 0) else a[1]
    return math.prod(out) * k


def _lstm_macs(node: ir.Node) -> int | None:
    """Per step and direction, [batch, input] @ W' and [batch, hidden] @ R' (each [.., 4 * hidden])."""
    x, w, r = _dims(node.inputs[0]), _dims(node.inputs[1]), _dims(node.inputs[2])
    if x is None or w is None or r is None:
        return None
    directions, gates, inputs = w
    steps_by_batch = x[0] * x[1]  # [seq, batch] or [batch, seq] (layout 1): the same product
    return steps_by_batch * directions * gates * (inputs + r[2])


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


# -- jax primitives -----------------------------------------------------------------------------------
def _dot_weight(node: ir.Node) -> int | None:
    """dot_general's weight is whichever operand is constant (x @ W or W @ x); rhs if both are."""
    if _is_const(node.inputs[1]):
        return 1
    return 0 if _is_const(node.inputs[0]) else None


def _dot_activations(node: ir.Node) -> tuple[int, ...]:
    w = _dot_weight(node)
    return (0, 1) if w is None else (1 - w,)


def _dot_channel_axis(node: ir.Node) -> int | None:
    """The weight's last free (neither contracting nor batch) dimension: an output channel, so a
    per-channel scale along it factors out of the sum. None (per tensor) if it has no free dim."""
    w = _dot_weight(node)
    if w is None:
        return None
    (contract_l, contract_r), (batch_l, batch_r) = jax_params(node)["dimension_numbers"]
    taken = set(contract_r if w == 1 else contract_l) | set(batch_r if w == 1 else batch_l)
    free = [d for d in range(len(node.inputs[w].shape)) if d not in taken]
    return free[-1] if free else None


def _dot_macs(node: ir.Node) -> int | None:
    lhs, out = _dims(node.inputs[0]), _dims(node.outputs[0])
    if lhs is None or out is None:
        return None
    (contract_l, _), _ = jax_params(node)["dimension_numbers"]
    return math.prod(out) * math.prod(lhs[d] for d in contract_l)


def _dot_reduction_axis(node: ir.Node) -> int | None:
    """The weight's last contracting dimension: weight-only blocks may run along any contracted
    dimension (the weight is dequantized before the dot), and ONNX's block-wise DequantizeLinear
    takes one axis. None when the weight contracts nothing (an outer product) or there is no weight."""
    w = _dot_weight(node)
    if w is None:
        return None
    contract = jax_params(node)["dimension_numbers"][0][w]
    return max(contract) if contract else None


def _conv_out_feature_axis(node: ir.Node) -> int:
    return jax_params(node)["dimension_numbers"].rhs_spec[0]


def _conv_in_feature_axis(node: ir.Node) -> int:
    return jax_params(node)["dimension_numbers"].rhs_spec[1]


def _jax_conv_macs(node: ir.Node) -> int | None:
    out, w = _dims(node.outputs[0]), _dims(node.inputs[1])
    if out is None or w is None:
        return None
    # Each output element sums (C_in / groups) * kernel products: the weight's size over C_out.
    return math.prod(out) * math.prod(w) // w[_conv_out_feature_axis(node)]


def _is_scalar_zero(value: ir.Value | None) -> bool:
    if not _is_const(value):
        return False
    array = value.const_value.numpy()
    return array.size == 1 and float(array.reshape(-1)[0]) == 0.0


def _jax_relu(node: ir.Node) -> bool:
    """``max(x, 0)``: jax.nn.relu as it appears in a jaxpr."""
    return len(node.inputs) == 2 and any(_is_scalar_zero(v) for v in node.inputs)


def _jax_bias_add(node: ir.Node) -> bool:
    """``x + b`` with a constant b: the bias of the dot or convolution before it."""
    return len(node.inputs) == 2 and _is_const(node.inputs[1]) and not _is_const(node.inputs[0])


def _grouped_conv(node: ir.Node) -> str | None:
    """Measured on this machine's onnxruntime (2 threads, batch 1): MobileNetV3-small 1.28x slower than
    fp32 with its 11 depthwise convolutions quantized, 0.27x with them float; EfficientNet-B0 0.89x
    against 0.73x (tools/bench_realworld.py, BENCHMARKS.md)."""
    if _attr_int(node, "group", 1) == 1:
        return None
    return ("kept float: onnxruntime's CPU integer kernel for grouped/depthwise convolution is slower than "
            "its float one (quantize anyway with --force)")


def _gemm_bias_unfused(node: ir.Node, bias: np.ndarray) -> str | None:
    """onnxruntime's QGemm adds a 1-D int32 C at scale s_a * s_b, with alpha = beta = 1."""
    if bias.ndim != 1 or _attr_float(node, "alpha", 1.0) != 1.0 or _attr_float(node, "beta", 1.0) != 1.0:
        return "Gemm bias is not a plain 1-D vector with alpha = beta = 1"
    return None


def _quantized_output_before_epilogue(node: ir.Node) -> bool:
    """Gemm/MatMul fuse with a float output, which must end at the op itself: with a ReLU after them
    they run in float unless their output is quantized (after the ReLU)."""
    uses = node.outputs[0].uses()
    return len(uses) == 1 and is_epilogue(uses[0].node)


def _group_attr(node: ir.Node) -> int:
    return _attr_int(node, "group", 1)


OP_FACTS: dict[tuple[str, str], OpFact] = {
    (ONNX, "Conv"): OpFact(True, (0,), 1, 2, lambda n: 0, _conv_macs, needs_quantized_output=True,
                           slower_on_cpu=_grouped_conv, reduction_axis=lambda n: 1, output_channel_axis=1,
                           sets_layout=True, groups=_group_attr, integer_kernel="onnx-conv"),
    # ConvTranspose weights are [C_in, C_out/group, k...]: output channels live on axis 1.
    (ONNX, "ConvTranspose"): OpFact(True, (0,), 1, 2, lambda n: 1, _conv_transpose_macs,
                                    needs_quantized_output=True, output_channel_axis=1, sets_layout=True,
                                    groups=_group_attr),
    # Gemm computes A' @ B' + C; B is [K, N] or, with transB, [N, K].
    (ONNX, "Gemm"): OpFact(True, (0,), 1, 2, lambda n: 0 if _attr_int(n, "transB", 0) else 1, _gemm_macs,
                           needs_quantized_output=_quantized_output_before_epilogue, dynamic=True,
                           reduction_axis=lambda n: 1 if _attr_int(n, "transB", 0) else 0, weight_only_kernel=True,
                           bias_unfused=_gemm_bias_unfused, output_channel_axis=-1, dense=True,
                           integer_kernel="onnx-gemm"),
    # MatMul's weight (when input 1 is constant) is [..., K, N]: output channels on the last axis.
    (ONNX, "MatMul"): OpFact(True, (0,), 1, None, lambda n: len(n.inputs[1].shape) - 1, _matmul_macs,
                             needs_quantized_output=_quantized_output_before_epilogue, dynamic=True,
                             reduction_axis=lambda n: len(n.inputs[1].shape) - 2, two_activations=True,
                             weight_only_kernel=True, output_channel_axis=-1, dense=True,
                             integer_kernel="onnx-matmul"),
}
for _op in ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"):
    OP_FACTS[(ONNX, _op)] = OpFact(range_preserving=True,
                                   zero_copy=_op not in ("MaxPool", "Transpose"))
OP_FACTS[(ONNX, "Split")] = OpFact(range_preserving=True, splits=True)
# (Slice would be one too, and onnxruntime runs it on uint8, but TorchScript's ShuffleNetV2 then
# measured 0.93x of float against 0.89x without: its chunks are Slices between depthwise
# convolutions that stay float, and the plan fit-target found with them converted more.)
# nearest picks input values (onnxruntime runs it on uint8); linear mixes them (it dequantizes)
OP_FACTS[(ONNX, "Resize")] = OpFact(range_preserving=lambda n: _attr_str(n, "mode", "nearest") == "nearest")
for _op in ("Shape", "Constant", "Size"):
    OP_FACTS[(ONNX, _op)] = OpFact(zero_copy=True)
# (a constant among the inputs would need a Q/DQ of its own for onnxruntime to fuse QLinearConcat)
OP_FACTS[(ONNX, "Concat")] = OpFact(joins_integers=lambda n: not any(_is_const(v) for v in n.inputs))
# A residual Add (or a two-input Sum, which the rewrite writes as Add: onnxruntime has no QLinearSum)
# of two activations, or a Mul of two (SiLU's x * Sigmoid(x), a squeeze-excitation's scaling:
# QLinearMul); with a constant operand (a bias) it would need that constant quantized too.
for _op in ("Add", "Sum", "Mul"):
    OP_FACTS[(ONNX, _op)] = OpFact(joins_integers=lambda n: len(n.inputs) == 2 and not any(
        v is None or _is_const(v) for v in n.inputs))
OP_FACTS[(ONNX, "Sigmoid")] = OpFact(lookup_range=lambda lo, hi: (_sigmoid(lo), _sigmoid(hi)))
# LSTM's weights W [dirs, 4 * hidden, input] and R [dirs, 4 * hidden, hidden] have their gate rows
# (output channels) on axis 1. Its one integer kernel is onnxruntime's DynamicQuantizeLSTM.
OP_FACTS[(ONNX, "LSTM")] = OpFact(
    True, (0,), 1, 3, lambda n: 1, _lstm_macs, dynamic=True, dynamic_lowering="recurrent",
    weight_inputs=(1, 2), no_static=("onnxruntime has no Q/DQ integer kernel for LSTM; its integer kernel, "
                                     "DynamicQuantizeLSTM, runs mode 'dynamic'"))
for _op in ("GRU", "RNN"):
    OP_FACTS[(ONNX, _op)] = OpFact(float_reason=(
        f"left float: onnxruntime has no integer kernel for {_op} in any mode (static or dynamic: its one "
        "integer recurrent kernel is DynamicQuantizeLSTM, for LSTM); the ops around it are quantized"))
OP_FACTS[(ONNX, "Relu")] = OpFact(epilogue=lambda n: True)

OP_FACTS.update({
    (JAX, "dot_general"): OpFact(True, _dot_activations, _dot_weight, None, _dot_channel_axis, _dot_macs,
                                 dynamic=True, reduction_axis=_dot_reduction_axis, two_activations=True,
                                 weight_only_kernel=True, integer_kernel="jax-dot"),
    # Quantized output like ONNX Conv, so a JAX graph exported to ONNX fuses into QLinearConv.
    (JAX, "conv_general_dilated"): OpFact(True, (0,), 1, None, _conv_out_feature_axis, _jax_conv_macs,
                                          needs_quantized_output=True, reduction_axis=_conv_in_feature_axis,
                                          groups=lambda n: jax_params(n)["feature_group_count"],
                                          integer_kernel="jax-conv"),
    (JAX, "max"): OpFact(epilogue=_jax_relu),
    (JAX, "add"): OpFact(epilogue=_jax_bias_add),
})
for _op in ("reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "reduce_window_max",
            "reduce_max", "copy", "copy_p"):
    OP_FACTS[(JAX, _op)] = OpFact(range_preserving=True, zero_copy=_op in ("reshape", "squeeze", "expand_dims"))

_PASSTHROUGH = OpFact()


def fact(node: ir.Node) -> OpFact:
    """The facts of ``node``'s op; ops not in the table get an inert entry. (Plugin op facts are
    registered by the compiler layer, ``qinject.compiler.plugins.load``, before any pass runs.)"""
    return lookup(node.domain, node.op_type)


def preserves_range(node: ir.Node) -> bool:
    """Whether ``node`` moves or selects values without changing their range (``OpFact.range_preserving``)."""
    preserving = fact(node).range_preserving
    return preserving(node) if callable(preserving) else preserving


def carried(node: ir.Node) -> tuple[ir.Value, ...]:
    """The outputs of a range-preserving op that carry its input's range (``OpFact.splits``: every
    output; else the first); none for any other op."""
    if not preserves_range(node):
        return ()
    return tuple(v for v in node.outputs if v is not None) if fact(node).splits else tuple(node.outputs[:1])


def lookup(domain: str, op_type: str) -> OpFact:
    """The facts of op ``op_type`` of ``domain`` (``""`` or None: the default domain)."""
    found = OP_FACTS.get((domain or ONNX, op_type))
    return found if found is not None else _PASSTHROUGH



def register_facts(facts: dict[tuple[str, str], OpFact]) -> None:
    """Add op facts (a plugin's); an op already in the table cannot be redefined."""
    clash = sorted(f"{d or ONNX}::{t}" for d, t in facts if (d or ONNX, t) in OP_FACTS)
    if clash:
        raise QinjectError(f"op facts for {clash} already exist; a plugin may add ops, not redefine them")
    OP_FACTS.update({(d or ONNX, t): f for (d, t), f in facts.items()})


def weight_index(node: ir.Node) -> int | None:
    """Which input of ``node`` its op takes as the weight, if any."""
    w = fact(node).weight_input
    return w(node) if callable(w) else w


def weight_of(node: ir.Node) -> ir.Value | None:
    """The node's weight if it has one and it is a constant (an initializer), else None."""
    idx = weight_index(node)
    if idx is None or idx >= len(node.inputs):
        return None
    w = node.inputs[idx]
    return w if _is_const(w) else None


def is_quantizable(node: ir.Node) -> bool:
    """Quantizable ops with a constant weight; MatMul / dot_general of two activations count too."""
    f = fact(node)
    if not f.quantizable:
        return False
    return weight_of(node) is not None or f.two_activations


def activation_inputs(node: ir.Node) -> list[int]:
    """Indices of the node's inputs that are quantized as activations."""
    f = fact(node)
    idx = list(f.activation_inputs(node) if callable(f.activation_inputs) else f.activation_inputs)
    if f.two_activations and weight_of(node) is None:
        idx = [0, 1]  # activation x activation (attention scores)
    return [i for i in idx if i < len(node.inputs) and node.inputs[i] is not None]


def channel_axis(node: ir.Node) -> int | None:
    """The weight's output-channel axis (None: the weight has none, quantize it per tensor)."""
    f = fact(node)
    if f.channel_axis is None:
        raise KeyError(f"op {node.op_type!r} of node {node.name!r} has no weight channel axis in the op facts")
    return f.channel_axis(node)


def slower_on_cpu(node: ir.Node) -> str | None:
    """Why onnxruntime's CPU integer kernel for ``node`` is slower than float, or None."""
    check = fact(node).slower_on_cpu
    return check(node) if check is not None else None


def modes(node: ir.Node) -> tuple[str, ...]:
    """The execution modes (``qinject.plan.MODES``) the rewrite can give ``node``: static for every
    quantizable node whose op has a static form (not LSTM); dynamic and weight-only where the op has
    those forms and a constant weight."""
    if not is_quantizable(node):
        return ()
    f, has_weight = fact(node), weight_of(node) is not None
    static = ("static",) if f.no_static is None else ()
    return static + (("dynamic",) if f.dynamic and has_weight else ()) + (
        ("weight-only",) if has_weight and reduction_axis(node) is not None else ())  # an outer product has none


def weight_only_kernel(node: ir.Node) -> bool:
    """Whether a weight-only ``node`` runs on an integer-weight kernel (onnxruntime's MatMulNBits for
    MatMul/Gemm) rather than as dequantize + the float op (Conv)."""
    return fact(node).weight_only_kernel


def reduction_axis(node: ir.Node) -> int | None:
    """The weight's reduction axis, along which weight-only blocks run (None: no weight-only form)."""
    f = fact(node)
    return f.reduction_axis(node) if f.reduction_axis is not None else None


def runs_on_integer_kernel(node: ir.Node, weight_bits: int, activation_bits: int) -> bool:
    """Whether onnxruntime runs ``node`` quantized at these widths as one integer kernel
    (QLinearConv, QGemm, QLinearMatMul): 8-bit activations, and 8-bit weights if it has one. Its
    4- and 16-bit forms run as dequantize + the float op."""
    return activation_bits == 8 and (weight_bits == 8 or weight_of(node) is None)


def needs_quantized_output(node: ir.Node) -> bool:
    """Whether onnxruntime fuses ``node`` into an integer kernel only if its output is quantized:
    Conv always (QLinearConv); Gemm/MatMul when a ReLU follows (fused with a float output they must
    end at the op itself, so with a ReLU after them they would run in float)."""
    needs = fact(node).needs_quantized_output
    return needs(node) if callable(needs) else needs


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + math.exp(-x))) if x > -700 else 0.0


def looked_up_from(value: ir.Value) -> ir.Value | None:
    """The input a lookup op (``OpFact.lookup_range``: Sigmoid) makes ``value`` from, where ``value``
    has one reader (the join that would run the op on integers with it) and is no graph output."""
    producer = value.producer()
    if producer is None or fact(producer).lookup_range is None or len(value.uses()) != 1 or value.is_graph_output():
        return None
    return producer.inputs[0]


def joins_integers(node: ir.Node) -> bool:
    """Whether ``node`` runs on the integers when all its inputs and its output point are quantized
    at one 8-bit width (QLinearConcat, QLinearAdd; see OpFact)."""
    joins = fact(node).joins_integers
    return joins(node) if callable(joins) else joins


def is_epilogue(node: ir.Node) -> bool:
    """Whether ``node`` belongs to the output stage of the quantized op before it (see OpFact)."""
    f = fact(node)
    return f.epilogue is not None and f.epilogue(node)


def macs(node: ir.Node) -> int | None:
    f = fact(node)
    return f.macs(node) if f.macs else None


def latency_key(node: ir.Node) -> tuple[str, str] | None:
    """The node's latency-table key without the bit widths: (op type, shape signature).

    The signature lists the dims of the node's non-bias inputs, then ``->`` and its outputs' dims,
    plus ``g<groups>`` for grouped convolutions (same shapes, other MACs):
    ``Conv`` ``1x64x56x56;64x64x3x3->1x64x56x56``. None if a shape is not fully known.
    """
    f = fact(node)
    parts = []
    for i, value in enumerate(node.inputs):
        if value is None or i == f.bias_input:
            continue
        dims = _dims(value)
        if dims is None:
            return None
        parts.append("x".join(map(str, dims)) or "scalar")
    outs = []
    for value in node.outputs:
        dims = _dims(value)
        if dims is None:
            return None
        outs.append("x".join(map(str, dims)) or "scalar")
    signature = ";".join(parts) + "->" + ";".join(outs)
    group = groups(node)
    return node.op_type, signature + (f" g{group}" if group != 1 else "")


def groups(node: ir.Node) -> int:
    """The groups of a grouped op (1: not grouped); any default-domain op's ``group`` attribute counts."""
    f = fact(node)
    if f.groups is not None:
        return f.groups(node)
    return _attr_int(node, "group", 1) if node.domain in ("", "ai.onnx") else 1


def bias_unfused(node: ir.Node, bias: np.ndarray) -> str | None:
    """Why ``node``'s bias cannot be stored in its integer kernel's layout (s_x * s_w), or None."""
    check = fact(node).bias_unfused
    return check(node, bias) if check is not None else None


def output_channel_axis(node: ir.Node, rank: int) -> int:
    """The channel axis of ``node``'s output of rank ``rank`` (the axis its bias is added along)."""
    axis = fact(node).output_channel_axis
    if axis is None:
        raise KeyError(f"op {node.op_type!r} of node {node.name!r} has no output channel axis in the op facts")
    return axis % rank
