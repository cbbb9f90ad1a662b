"""The dynamic form of ONNX LSTM (``passes/transforms/_insert_qdq_modes.py``): onnxruntime's
``com.microsoft::DynamicQuantizeLSTM``, the node its own ``quantize_dynamic`` writes for an LSTM.

Its inputs are the LSTM's, with W and R stored as int8 codes *transposed* to [dirs, input, 4 * hidden]
and [dirs, hidden, 4 * hidden], then W_scale, W_zero_point, R_scale, R_zero_point: per gate row
([dirs, 4 * hidden]) with ``per_channel``, else one per direction ([dirs]). B, sequence_lens,
initial_h/c and the peepholes P pass through as float. The kernel quantizes X (all steps at once) and
each step's hidden state to uint8 at run time from their own range, as DynamicQuantizeLinear does.

What stays float, with a note: R computed at run time; ``layout=1`` (the contrib op has no layout
attribute; onnxruntime's own quantizer drops it, though its LSTM kernels refuse layout=1 anyway);
asymmetric or unsigned weights (the kernel reads one weight zero point per matrix, the first one).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core import numerics
from qinject.core.errors import UnsupportedModelError
from qinject.core.plan import NodeQuant

MS_DOMAIN = "com.microsoft"
W, R = 1, 2  # LSTM's weight inputs
_CARRIED = (3, 4, 5, 6, 7)  # B, sequence_lens, initial_h, initial_c, P


def refusal(node: ir.Node, choice: NodeQuant) -> str | None:
    """Why the LSTM ``node`` has no DynamicQuantizeLSTM form under ``choice`` (it stays float), or None."""
    r = node.inputs[R] if len(node.inputs) > R else None
    if r is None or r.const_value is None or r.is_graph_input():
        return ("left float: DynamicQuantizeLSTM needs a constant recurrent weight R, it is computed at "
                "run time")
    attr = node.attributes.get("layout")
    if attr is not None and attr.value != 0:
        return ("left float: DynamicQuantizeLSTM has no 'layout' attribute (it takes [seq, batch, ...] "
                "tensors), this LSTM has layout=1 (which onnxruntime does not run in float either); "
                "export it time-major")
    if not choice.weight_symmetric or not choice.weight_signed:
        return ("left float: DynamicQuantizeLSTM reads one weight zero point per matrix, so it takes "
                "symmetric int8 weights; plan weight_symmetric and weight_signed true")
    return None


def lower(node: ir.Node, choice: NodeQuant, namer) -> ir.Node:
    """Replace the LSTM ``node`` (``refusal`` said yes) by DynamicQuantizeLSTM; returns the new node.
    ``namer`` is the rewrite's (``_insert_qdq_modes.Namer``)."""
    graph = node.graph
    inputs = [node.inputs[0]]
    quantized = []
    for i in (W, R):
        w = node.inputs[i]
        q, scale, zp = _int8_gates(node, w, choice)
        stem = f"{w.name}_dynamic"
        # codes [dirs, 4 * hidden, K] -> [dirs, K, 4 * hidden], the layout the kernel's GEMM reads
        codes = qir.add_initializer(graph, namer.fresh(f"{stem}_quantized"),
                                    np.ascontiguousarray(q.transpose(0, 2, 1)))
        inputs.append(codes)
        quantized.append((qir.add_initializer(graph, namer.fresh(f"{stem}_scale"), scale),
                          qir.add_initializer(graph, namer.fresh(f"{stem}_zero_point"), zp)))
    inputs += [node.inputs[i] if i < len(node.inputs) else None for i in _CARRIED]
    inputs += [v for pair in quantized for v in pair]
    attributes = [a for n, a in node.attributes.items() if n != "layout"]
    new = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", inputs, attributes, num_outputs=len(node.outputs),
                  name=node.name)
    for old, value in zip(node.outputs, new.outputs):
        value.name, value.shape, value.type = namer.fresh(f"{old.name}_dynamic"), old.shape, old.type
        value.meta.update(old.meta)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))
    new.name = node.name
    return new


def _int8_gates(node: ir.Node, w: ir.Value, choice: NodeQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Int8 codes of W or R ([dirs, 4 * hidden, K]) and their scale and zero point: per gate row
    ([dirs, 4 * hidden]) with ``per_channel``, else per direction ([dirs])."""
    array = w.const_value.numpy()
    if array.dtype != np.float32 or array.ndim != 3:
        raise UnsupportedModelError(f"node {node.name!r}: LSTM weight {w.name!r} is {array.dtype} of rank "
                                    f"{array.ndim}, expected float32 [dirs, 4 * hidden, K]")
    if not np.all(np.isfinite(array)):
        raise UnsupportedModelError(f"node {node.name!r}: weight {w.name!r} contains NaN or Inf")
    dirs, gates, k = array.shape
    rows = array.reshape(dirs * gates, k) if choice.per_channel else array.reshape(dirs, gates * k)
    lo, hi = numerics.weight_range(rows, 0)
    scale, zp = numerics.scale_zero_point(lo, hi, choice.weight_qtype, True)
    q = numerics.quantize(rows, scale, zp, choice.weight_qtype, 0).reshape(array.shape)
    shape = (dirs, gates) if choice.per_channel else (dirs,)
    return q, scale.astype(np.float32).reshape(shape), zp.astype(np.int8).reshape(shape)

