"""The plan's execution modes (``qinject.plan``) as the JAX backend meets them in a rewritten graph.

The backend runs the graph the Q/DQ rewrite wrote, op by op; a mode is a shape of that graph, not
a switch of the backend:

- dynamic: ``DynamicQuantizeLinear`` quantizes an activation at run time, read either through a
  ``DequantizeLinear`` (any op: MatMul, Gemm, jax's dot_general) or by ``MatMulInteger``; or a
  contrib kernel quantizes its own activations (LSTM's ``DynamicQuantizeLSTM``, ``jax_ops_rnn``);
- weight-only: the weight is a ``DequantizeLinear`` of integer codes (block-wise along the reduction
  axis), the activations stay float.

The node the rewrite quantized keeps its choice in ``meta[qinject.ir.QUANT_APPLIED]``. ``check``
compares the two before anything runs, so a mode the op does not have, or a graph still holding
the static form (calibrated Q/DQ on an activation), is an error rather than a silent static run.
"""

from __future__ import annotations

import onnx_ir as ir

from qinject.backends.jax_ops import CONTRIB_OPS, attr
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import PlanError
from qinject.core.plan import DYNAMIC, STATIC, WEIGHT_ONLY

_ONNX_DOMAINS = ("", "ai.onnx")
WEIGHT = "weight"  # an input kind: dequantized from constant integer codes


def check(node: ir.Node) -> None:
    """Refuse a node whose applied mode its op lacks, or whose graph does not run that mode.

    Raises:
        PlanError: naming the node, its op and the mode, with what was found.
    """
    choice = node.meta.get(qir.QUANT_APPLIED)
    mode = getattr(choice, "mode", STATIC)
    if mode == STATIC:
        return
    where = f"node {node.name!r} ({node.op_type})"
    if mode == DYNAMIC and (node.domain, node.op_type) in CONTRIB_OPS:
        return  # a kernel that quantizes its own activations at run time (DynamicQuantizeLSTM)
    if op_facts.fact(node).quantizable:  # the rewrite may also leave the choice on the integer op it wrote
        available = op_modes(node)
        if mode not in available:
            raise PlanError(f"{where}: the plan's mode {mode!r} is not available for this op (it runs "
                            f"{', '.join(available)}); plan the node as one of those or leave it float")
    kinds = [input_kind(v) for v in node.inputs]
    if STATIC in kinds:
        i = kinds.index(STATIC)
        raise PlanError(f"{where} is planned {mode!r}, but input {i} ({node.inputs[i].name!r}) is quantized "
                        f"with a calibrated scale (static Q/DQ): rewrite the model with a Q/DQ pass that "
                        f"writes mode {mode!r}")
    if mode == DYNAMIC and DYNAMIC not in kinds:
        raise PlanError(f"{where} is planned 'dynamic', but no input is quantized at run time (no "
                        "DynamicQuantizeLinear before it): rewrite the model with a Q/DQ pass that writes it")
    if mode == WEIGHT_ONLY and (DYNAMIC in kinds or WEIGHT not in kinds):
        found = "an activation quantized at run time" if DYNAMIC in kinds else "no integer weight"
        raise PlanError(f"{where} is planned 'weight-only' (integer weight, float activations), but it has "
                        f"{found}: rewrite the model with a Q/DQ pass that writes it")


def op_modes(node: ir.Node) -> tuple[str, ...]:
    """The modes a quantizable node's op has (op_facts), whether or not its weight is still a
    constant: after the rewrite it is a DequantizeLinear output."""
    f = op_facts.fact(node)
    weight_only = f.reduction_axis is not None
    return (((STATIC,) if f.no_static is None else ()) + ((DYNAMIC,) if f.dynamic else ())
            + ((WEIGHT_ONLY,) if weight_only else ()))


def input_kind(value: ir.Value | None) -> str | None:
    """How an input was quantized: DYNAMIC (at run time), STATIC (calibrated QuantizeLinear),
    WEIGHT (constant codes behind a DequantizeLinear), or None (float)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.domain not in _ONNX_DOMAINS:
        return None
    if producer.op_type == "DynamicQuantizeLinear":
        return DYNAMIC  # read directly by MatMulInteger
    if producer.op_type != "DequantizeLinear":
        return None
    codes = producer.inputs[0]
    source = codes.producer()
    if source is None or source.op_type == "Constant":
        return WEIGHT if source is not None or codes.const_value is not None else None
    return {"DynamicQuantizeLinear": DYNAMIC, "QuantizeLinear": STATIC}.get(source.op_type)


def dequantizes_at_run_time(node: ir.Node) -> bool:
    """Whether the integer backend keeps this DequantizeLinear in the program, so a weight-only
    weight stays integer codes plus block scales there (instead of becoming a float constant at
    trace time): a block-wise one, or one read by a node planned weight-only."""
    if node.op_type != "DequantizeLinear" or node.domain not in _ONNX_DOMAINS:
        return False
    if attr(node, "block_size", 0) > 0:
        return True
    return any(getattr(use.node.meta.get(qir.QUANT_APPLIED), "mode", STATIC) == WEIGHT_ONLY
               for use in node.outputs[0].uses())
