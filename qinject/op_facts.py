"""The one table of op facts, keyed by (domain, op_type).

For each op: is it quantizable, which input is the activation, which the weight and the bias, the
weight's output-channel axis, and how to count its multiply-accumulates. Ops not listed here flow
through every pass unchanged. Later issues add the JAX lowering and latency keys beside each entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

ONNX = ""


@dataclass(frozen=True)
class OpFact:
    """What the passes need to know about one op type.

    Attributes:
        quantizable: whether the op can run on integer operands (a weight and/or activations).
        activation_inputs: indices of inputs that are activations to quantize.
        weight_input: index of the constant weight input, or None.
        bias_input: index of the optional bias (quantized to int32 with scale s_x * s_w).
        channel_axis: the weight's output-channel axis, as a function of the node (attributes).
        macs: multiply-accumulates of one execution, from shapes; None if shapes are unknown.
        needs_quantized_output: onnxruntime fuses the op into an integer kernel only when its output
            is quantized too (QLinearConv); Gemm and MatMul fuse with a float output (QGemm,
            MatMulIntegerToFloat).
        range_preserving: moves or selects values without changing their range (MaxPool, Reshape):
            a Q/DQ after it may share the scale of the Q/DQ before it, letting onnxruntime run the
            op on integers or drop it from the integer chain.
    """

    quantizable: bool = False
    activation_inputs: tuple[int, ...] = (0,)
    weight_input: int | None = None
    bias_input: int | None = None
    channel_axis: Callable[[ir.Node], int] | None = None
    macs: Callable[[ir.Node], int | None] | None = None
    needs_quantized_output: bool = False
    range_preserving: bool = False


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


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


OP_FACTS: dict[tuple[str, str], OpFact] = {
    (ONNX, "Conv"): OpFact(True, (0,), 1, 2, lambda n: 0, _conv_macs, needs_quantized_output=True),
    # ConvTranspose weights are [C_in, C_out/group, k...]: output channels live on axis 1.
    (ONNX, "ConvTranspose"): OpFact(True, (0,), 1, 2, lambda n: 1, _conv_transpose_macs,
                                    needs_quantized_output=True),
    # Gemm computes A' @ B' + C; B is [K, N] or, with transB, [N, K].
    (ONNX, "Gemm"): OpFact(True, (0,), 1, 2, lambda n: 0 if _attr_int(n, "transB", 0) else 1, _gemm_macs),
    # MatMul's weight (when input 1 is constant) is [..., K, N]: output channels on the last axis.
    (ONNX, "MatMul"): OpFact(True, (0,), 1, None, lambda n: len(n.inputs[1].shape) - 1, _matmul_macs),
}
for _op in ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"):
    OP_FACTS[(ONNX, _op)] = OpFact(range_preserving=True)

_PASSTHROUGH = OpFact()


def fact(node: ir.Node) -> OpFact:
    """The facts of ``node``'s op; ops not in the table get an inert entry."""
    return OP_FACTS.get((node.domain or ONNX, node.op_type), _PASSTHROUGH)


def weight_of(node: ir.Node) -> ir.Value | None:
    """The node's weight if it has one and it is a constant (an initializer), else None."""
    f = fact(node)
    if f.weight_input is None or f.weight_input >= len(node.inputs):
        return None
    w = node.inputs[f.weight_input]
    return w if w is not None and w.const_value is not None and not w.is_graph_input() else None


def is_quantizable(node: ir.Node) -> bool:
    """Quantizable ops with a constant weight; MatMul of two activations counts too."""
    f = fact(node)
    if not f.quantizable:
        return False
    return weight_of(node) is not None or (node.op_type == "MatMul" and node.domain in ("", "ai.onnx"))


def activation_inputs(node: ir.Node) -> list[int]:
    """Indices of the node's inputs that are quantized as activations."""
    f = fact(node)
    idx = list(f.activation_inputs)
    if node.op_type == "MatMul" and weight_of(node) is None:
        idx = [0, 1]  # activation x activation (attention scores)
    return [i for i in idx if i < len(node.inputs) and node.inputs[i] is not None]


def channel_axis(node: ir.Node) -> int:
    f = fact(node)
    if f.channel_axis is None:
        raise KeyError(f"op {node.op_type!r} of node {node.name!r} has no weight channel axis in the op facts")
    return f.channel_axis(node)


def macs(node: ir.Node) -> int | None:
    f = fact(node)
    return f.macs(node) if f.macs else None
