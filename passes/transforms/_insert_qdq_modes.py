"""The dynamic and weight-only forms of the Q/DQ rewrite (``passes/transforms/insert_qdq.py``).

Neither puts calibrated Q/DQ on the node's activations (so neither needs calibration statistics);
each writes the pattern onnxruntime fuses:

- ``dynamic`` (MatMul, Gemm with a constant weight): ``DynamicQuantizeLinear(x) -> MatMulInteger(xq,
  Wq, x_zp) -> Cast(float) -> Mul(x_scale * w_scale) [-> Add(bias)]``, the pattern of onnxruntime's
  own ``quantize_dynamic``, fused into DynamicQuantizeMatMul (the bias too) or, where several
  consumers share a DynamicQuantizeLinear, MatMulIntegerToFloat. Each node gets its own
  DynamicQuantizeLinear, so each fuses whole (the cost model prices the quantizing pass per node).
- ``dynamic`` (LSTM with constant W and R): onnxruntime's DynamicQuantizeLSTM
  (``passes/transforms/_insert_qdq_lstm.py``); the op facts' ``dynamic_lowering`` picks it.
- ``weight-only``: the weight becomes an int4/int8 initializer behind a block-wise DequantizeLinear
  (opset 21, ``block_size`` weights per scale along the reduction axis). A 2-D MatMul weight fuses
  into MatMulNBits; Conv and N-D MatMul weights run as dequantize + the float op.

Gemm is lowered to MatMul first (transB and alpha folded into the weight, beta into the bias, C
added after): the form both fusions match. Gemm with transA=1 stays float with a note.

onnxruntime 1.32 fuses MatMulNBits for any K, the last block partial (K = 72 at block 32, K = 64
at block 256, 4 and 8 bits, checked), as the ONNX spec allows: the plan's block size is used as is.

onnxruntime 1.32's QDQ selectors give up on any node whose lone consumer is a Relu that is not
followed by a QuantizeLinear (they take such a Relu for a clip a QuantizeLinear makes redundant), so
DQ -> MatMul [-> Add] -> Relu would run as dequantize + float MatMul: the rewrite writes that Relu
as Max(y, 0), the same function, which they leave alone. A weight-only MatMul whose output a
QuantizeLinear reads (a static consumer) does not fuse either; ``unfused_note`` says so.

In control-flow bodies the new initializers live in the body itself: onnxruntime 1.32 fails to
load a body whose block-wise DequantizeLinear reads outer-scope initializers (TransposeDQWeights
ForMatMulNBits "Missing required weight").
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir

from qinject.passes.transforms import _insert_qdq_lstm

from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.errors import UnsupportedModelError
from qinject.core.plan import DYNAMIC, STATIC, NodeQuant

# op_facts' ``dynamic_lowering`` -> (refusal, lowering) of that dynamic form
_DYNAMIC_FORMS = {"recurrent": (_insert_qdq_lstm.refusal, _insert_qdq_lstm.lower)}


class Namer(Protocol):
    """What the lowering takes from the rewrite (``insert_qdq._Rewrite``)."""

    def fresh(self, base: str) -> str:
        """A value, node or initializer name unused anywhere in the model."""

    def representable(self, scale: np.ndarray, value: ir.Value) -> np.ndarray:
        """``scale`` rounded to what ``value``'s float type stores."""


def refusal(node: ir.Node, choice: NodeQuant) -> str | None:
    """Why ``node`` cannot run in ``choice.mode`` (it then stays float), or None."""
    modes = op_facts.modes(node)
    if choice.mode not in modes:
        why = op_facts.fact(node).no_static if choice.mode == STATIC else None
        return (f"left float: mode {choice.mode!r} is not available for this {node.op_type} "
                f"(it can run {', '.join(modes) or 'float only'}{f': {why}' if why else ''}); "
                "choose one of those in the plan")
    if choice.mode == DYNAMIC:
        odd = [v for v in _activations(node) if v.dtype is not None and v.dtype != ir.DataType.FLOAT]
        if odd:
            return (f"left float: DynamicQuantizeLinear takes float32 activations, {odd[0].name!r} is "
                    f"{odd[0].dtype.name.lower()}")
    form = _DYNAMIC_FORMS.get(op_facts.fact(node).dynamic_lowering) if choice.mode == DYNAMIC else None
    if form is not None:
        return form[0](node, choice)
    return _onnx_refusal(node, choice) if _is_onnx(node) else None


def _onnx_refusal(node: ir.Node, choice: NodeQuant) -> str | None:
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return (f"left float: Gemm with transA=1 has no {choice.mode} form (it is lowered to MatMul, "
                    "which takes A untransposed); transpose A in the model, or run it static")
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and c.const_value is None and _attr(node, "beta", 1.0) != 1.0:
            return f"left float: Gemm's C {c.name!r} is computed at run time and beta != 1"
    w = op_facts.weight_of(node)
    if choice.mode == DYNAMIC and len(w.const_value.shape) != 2:
        return (f"left float: dynamic mode needs a 2-D weight (DynamicQuantizeMatMul), {w.name!r} is "
                f"{len(w.const_value.shape)}-D")
    return None


def lower(node: ir.Node, choice: NodeQuant, namer: Namer) -> ir.Node:
    """Rewrite ``node`` (``refusal`` said yes) into ``choice.mode``; returns the node that stands for it
    (its name and meta): MatMulInteger, or the MatMul a Gemm became, DynamicQuantizeLSTM, or
    ``node`` itself.

    Ops of other domains (jax's dot_general, conv_general_dilated) keep their op: a weight-only one
    reads the block-wise DequantizeLinear, a dynamic one reads DequantizeLinear(DynamicQuantizeLinear(x))
    and an int8 weight behind a DequantizeLinear (what the JAX backend runs; lowered to ONNX, the op
    becomes MatMul/Conv)."""
    onnx_op = _is_onnx(node)
    form = _DYNAMIC_FORMS.get(op_facts.fact(node).dynamic_lowering) if choice.mode == DYNAMIC else None
    if form is not None:
        return form[1](node, choice, namer)
    if choice.mode == DYNAMIC:
        return _dynamic(node, choice, namer) if onnx_op else _dynamic_dequantized(node, choice, namer)
    if onnx_op and node.op_type == "Gemm":
        node = _weight_only_gemm(node, choice, namer)
    else:
        w = op_facts.weight_of(node)
        axis = op_facts.reduction_axis(node) % len(w.const_value.shape)
        node.replace_input_with(op_facts.weight_index(node), _blocked_weight(node, w, _float_weight(node, w), axis,
                                                                             choice, namer))
    if onnx_op and node.op_type == "MatMul":
        _relu_as_max(node, namer)
    return node


def unfused_note(node: ir.Node) -> str | None:
    """Why onnxruntime will not fuse the weight-only MatMul ``node`` (see the module doc), or None."""
    if node.op_type != "MatMul" or not any(c.op_type == "QuantizeLinear" for c in _epilogue(node)):
        return None
    return ("runs as dequantize + float MatMul in onnxruntime 1.32 (no MatMulNBits): a QuantizeLinear reads its "
            "output (a static consumer); weight-only or dynamic consumers keep it fused")


# -- dynamic --------------------------------------------------------------------------------------------------
def _dynamic(node: ir.Node, choice: NodeQuant, namer: Namer) -> ir.Node:
    graph, x, out = node.graph, node.inputs[0], node.outputs[0]
    w = op_facts.weight_of(node)
    # per output column of [K, N]: a [N] scale, which DynamicQuantizeMatMul takes
    q, scale, zp = _int8_weight(_matmul_weight(node, w), 1 if choice.per_channel else None, choice)
    const = _consts(graph, namer)
    stem = f"{w.name}_dynamic"
    dql = _dynamic_quantize(x, namer)
    xq, xs, xz = dql.outputs
    # A zero point of 0 is MatMulInteger's default: written only for asymmetric weights.
    inputs = [xq, const(f"{stem}_quantized", q), xz] + ([const(f"{stem}_zero_point", zp)] if np.any(zp) else [])
    mmi = ir.node("MatMulInteger", inputs, name=node.name)
    cast = ir.node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=namer.fresh(f"{node.name}_Cast"))
    both = ir.node("Mul", [xs, const(f"{stem}_scale", scale)], name=namer.fresh(f"{node.name}_scale_Mul"))
    mul = ir.node("Mul", [cast.outputs[0], both.outputs[0]], name=namer.fresh(f"{node.name}_Mul"))
    _typed(mmi.outputs[0], namer.fresh(f"{out.name}_int32"), ir.DataType.INT32, out.shape)
    _typed(cast.outputs[0], namer.fresh(f"{out.name}_int32_float"), ir.DataType.FLOAT, out.shape)
    _typed(both.outputs[0], namer.fresh(f"{out.name}_dynamic_scale"), ir.DataType.FLOAT, ir.Shape(scale.shape))
    _typed(mul.outputs[0], namer.fresh(f"{out.name}_unbiased"), ir.DataType.FLOAT, out.shape)
    _replace(node, [dql, mmi, cast, both, mul] + _bias_add(node, mul.outputs[0], namer), mmi)
    return mmi


def _dynamic_dequantized(node: ir.Node, choice: NodeQuant, namer: Namer) -> ir.Node:
    """The dynamic form of an op kept as it is: its activations through DynamicQuantizeLinear ->
    DequantizeLinear, its weight int8 behind a DequantizeLinear (per output channel, or per tensor)."""
    graph, const = node.graph, _consts(node.graph, namer)
    for i in op_facts.activation_inputs(node):
        x = node.inputs[i]
        dql = _dynamic_quantize(x, namer)
        dq = ir.node("DequantizeLinear", dql.outputs, name=namer.fresh(f"{x.name}_dynamic_DequantizeLinear"))
        _typed(dq.outputs[0], namer.fresh(f"{x.name}_dynamic_dequantized"), x.dtype, x.shape)
        graph.insert_before(node, [dql, dq])
        node.replace_input_with(i, dq.outputs[0])
    w = op_facts.weight_of(node)
    array = _float_weight(node, w)
    axis = op_facts.channel_axis(node) if choice.per_channel and array.ndim > 1 else None
    q, scale, zp = _int8_weight(array, axis, choice)
    stem = f"{w.name}_dynamic"
    inputs = [const(f"{stem}_quantized", q), const(f"{stem}_scale", scale.astype(w.dtype.numpy())),
              const(f"{stem}_zero_point", zp)]
    dq = ir.node("DequantizeLinear", inputs, {} if axis is None else {"axis": axis},
                 name=namer.fresh(f"{stem}_DequantizeLinear"))
    _typed(dq.outputs[0], namer.fresh(f"{stem}_dequantized"), w.dtype, w.shape)
    graph.insert_before(node, dq)
    node.replace_input_with(op_facts.weight_index(node), dq.outputs[0])
    return node


def _int8_weight(array: np.ndarray, axis: int | None, choice: NodeQuant) -> tuple[np.ndarray, ...]:
    """Codes, scale and zero point of a dynamic node's weight (per ``axis``, or per tensor)."""
    lo, hi = numerics.weight_range(array, axis)
    scale, zp = numerics.scale_zero_point(lo, hi, choice.weight_qtype, choice.weight_symmetric)
    return numerics.quantize(array, scale, zp, choice.weight_qtype, axis), scale, zp


# -- weight-only ----------------------------------------------------------------------------------------------
def _weight_only_gemm(node: ir.Node, choice: NodeQuant, namer: Namer) -> ir.Node:
    """Gemm as MatMul(x, DQ(blocked W')) [+ Add(C')], which onnxruntime fuses into MatMulNBits."""
    w, out = op_facts.weight_of(node), node.outputs[0]
    dq = _blocked_weight(node, w, _matmul_weight(node, w), 0, choice, namer)  # W' is [K, N]: blocks along K
    matmul = ir.node("MatMul", [node.inputs[0], dq], name=node.name)
    _typed(matmul.outputs[0], namer.fresh(f"{out.name}_unbiased"), out.dtype, out.shape)
    _replace(node, [matmul] + _bias_add(node, matmul.outputs[0], namer), matmul)
    return matmul


def _blocked_weight(node: ir.Node, w: ir.Value, array: np.ndarray, axis: int, choice: NodeQuant,
                    namer: Namer) -> ir.Value:
    """The block-wise DequantizeLinear of ``array`` (the node's weight ``w``, maybe transposed and
    scaled), inserted before ``node``; its initializers in the node's graph."""
    block, qtype = choice.block_size, choice.weight_qtype
    k = array.shape[axis]
    moved = np.moveaxis(array, axis, 0)
    blocks = -(-k // block)
    # Zero padding fills the last, partial block: the range always contains 0 anyway.
    padded = np.zeros((blocks * block, *moved.shape[1:]), np.float32)
    padded[:k] = moved
    grouped = padded.reshape(blocks, block, *moved.shape[1:])
    scale, zp = numerics.scale_zero_point(grouped.min(axis=1), grouped.max(axis=1), qtype, choice.weight_symmetric)
    scale = namer.representable(scale, w)
    q = numerics.quantize(moved, np.repeat(scale, block, 0)[:k], np.repeat(zp, block, 0)[:k], qtype)
    q, scale, zp = (np.ascontiguousarray(np.moveaxis(a, 0, axis)) for a in (q, scale, zp))
    const, stem = _consts(node.graph, namer), f"{w.name}_{qtype}_block{block}"
    inputs = [const(f"{stem}_quantized", q), const(f"{stem}_scale", scale.astype(w.dtype.numpy()))]
    if np.any(zp):  # 0 is DequantizeLinear's default: symmetric weights store none
        inputs.append(const(f"{stem}_zero_point", zp))
    dq = ir.node("DequantizeLinear", inputs, {"axis": axis, "block_size": block},
                 name=namer.fresh(f"{stem}_DequantizeLinear"))
    _typed(dq.outputs[0], namer.fresh(f"{stem}_dequantized"), w.dtype, ir.Shape(array.shape))
    node.graph.insert_before(node, dq)
    return dq.outputs[0]


def _epilogue(node: ir.Node) -> list[ir.Node]:
    """The consumers of ``node``'s output, past a lone bias Add (onnxruntime makes MatMul + Add a Gemm
    before its QDQ selectors look)."""
    uses = node.outputs[0].uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not node.outputs[0].is_graph_output():
        uses = uses[0].node.outputs[0].uses()
    return [u.node for u in uses]


def _relu_as_max(node: ir.Node, namer: Namer) -> None:
    """Write the Relu after a weight-only MatMul as Max(y, 0) where onnxruntime's selectors would
    take it for a redundant clip and leave the MatMul unfused (see the module doc)."""
    after = _epilogue(node)
    relu = after[0] if len(after) == 1 else None
    if relu is None or relu.op_type != "Relu" or not _is_onnx(relu):
        return
    out = relu.outputs[0]
    if len(out.uses()) != 1 or out.is_graph_output():  # what the selectors check: else they leave it alone
        return
    x = relu.inputs[0]
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    zero = _consts(relu.graph, namer)(f"{relu.name or out.name}_zero", np.zeros((), dtype))
    max_ = ir.node("Max", [x, zero], name=relu.name)
    _typed(max_.outputs[0], namer.fresh(f"{out.name}_max"), out.dtype, out.shape)
    _replace(relu, [max_], max_)


# -- shared -------------------------------------------------------------------------------------------------------
def _dynamic_quantize(x: ir.Value, namer: Namer) -> ir.Node:
    """DynamicQuantizeLinear of ``x``: uint8 codes, scale and zero point computed at run time."""
    dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=namer.fresh(f"{x.name}_DynamicQuantizeLinear"))
    for value, part, dtype, shape in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                         (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8),
                                         (x.shape, ir.Shape([]), ir.Shape([]))):
        _typed(value, namer.fresh(f"{x.name}_dynamic_{part}"), dtype, shape)
    return dql


def _activations(node: ir.Node) -> list[ir.Value]:
    return [node.inputs[i] for i in op_facts.activation_inputs(node)]


def _is_onnx(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _matmul_weight(node: ir.Node, w: ir.Value) -> np.ndarray:
    """The weight as MatMul's [..., K, N]: Gemm's transB undone and alpha folded in (alpha * A @ B' =
    A @ (alpha * B'), exact up to the weight's rounding)."""
    array = _float_weight(node, w)
    if node.op_type != "Gemm":
        return array
    if _attr(node, "transB", 0):
        array = array.T
    alpha = _attr(node, "alpha", 1.0)
    return array * np.float32(alpha) if alpha != 1.0 else array


def _bias_add(node: ir.Node, y: ir.Value, namer: Namer) -> list[ir.Node]:
    """Gemm's ``+ beta * C`` as an Add after ``y`` (onnxruntime fuses a 1-D one as the kernel's bias);
    no node for MatMul or a Gemm without C."""
    c = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if c is None:
        return []
    beta = _attr(node, "beta", 1.0)
    if beta != 1.0:  # refusal() let only a constant C through with beta != 1
        c = _consts(node.graph, namer)(f"{c.name}_beta", (c.const_value.numpy() * beta).astype(c.dtype.numpy()))
    add = ir.node("Add", [y, c], name=namer.fresh(f"{node.name}_bias_Add"))
    _typed(add.outputs[0], namer.fresh(f"{node.outputs[0].name}_biased"), y.dtype, node.outputs[0].shape)
    return [add]


def _replace(node: ir.Node, new_nodes: list[ir.Node], core: ir.Node) -> None:
    """Put ``new_nodes`` where ``node`` was; the last one's output takes over the node's output (its name,
    its consumers, its calibration statistics), and ``core`` takes the node's name."""
    old, new = node.outputs[0], new_nodes[-1].outputs[0]
    new.meta.update(old.meta)
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], new_nodes, [old], [new])
    core.name = node.name


def _consts(graph: ir.Graph, namer: Namer):
    """A function registering an initializer in ``graph`` under a fresh name (see the module doc for
    why a body's initializers stay in the body)."""
    return lambda name, array: qir.add_initializer(graph, namer.fresh(name), np.asarray(array))


def _float_weight(node: ir.Node, w: ir.Value) -> np.ndarray:
    array = w.const_value.numpy()
    if array.dtype.kind != "f":
        raise UnsupportedModelError(f"node {node.name!r}: weight {w.name!r} is {array.dtype}, not float")
    if not np.all(np.isfinite(array)):
        raise UnsupportedModelError(f"node {node.name!r}: weight {w.name!r} contains NaN or Inf")
    return array.astype(np.float32)


def _typed(value: ir.Value, name: str, dtype: ir.DataType | None, shape: ir.Shape | None) -> None:
    value.name, value.shape = name, shape
    value.type = ir.TensorType(dtype) if dtype is not None else None


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value
