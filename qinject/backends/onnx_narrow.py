"""4-bit activation Q/DQ pairs written as Clip -> 8-bit Q/DQ, the form onnxruntime can load.

onnxruntime's default optimisation (ORT_ENABLE_EXTENDED and above: every default session) moves a
4-bit QuantizeLinear that follows a MaxPool in front of it (QDQPropagationTransformer), then drops
the DequantizeLinear -> MaxPool -> QuantizeLinear around it (QDQSelectorActionTransformer's
drop-Q/DQ rule), leaving a MaxPool on uint4, which no kernel takes: the session refuses the graph.
The same file loads at the basic level, so the numbers are right; only the form is rejected.

So, in the serialised file only (the IR, which the JAX backend runs, keeps the 4-bit types), a
per-tensor pair ``x -> Q(s, z: uint4) -> DQ(s, z)`` is written as
``x -> Clip((qmin - z)·s, (qmax - z)·s) -> Q(s, z: uint8) -> DQ(s, z)`` (int4: int8). This is exactly
the 4-bit pair: inside the clip bounds ``⌊x/s⌉ + z`` already lies in ``[qmin, qmax]`` (the bound
divided by ``s`` is within an ulp of an integer, so it rounds to it), and outside them the 4-bit
saturation and the clip give the same end code; the 8-bit saturation never acts. No onnxruntime
transform moves or drops the pair any more (its QuantizeLinear now follows a Clip, not a MaxPool;
ClipQuantFusion removes a Clip only when it is wider than the quantizer's own range), and the 8-bit
types have kernels everywhere. Keeping int4 and avoiding the propagated patterns instead would have
to track every op that onnxruntime propagates Q/DQ through (MaxPool, Reshape, Transpose, ...) and
its kernels' types, release by release.

A pair this cannot express (per-axis or block-wise scales, a QuantizeLinear output read by anything
but its DequantizeLinear, a zero point that is not an initializer) is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# 4-bit type -> (its 8-bit stand-in, the 4-bit code range)
_WIDER = {TensorProto.UINT4: (TensorProto.UINT8, np.uint8, 0, 15),
          TensorProto.INT4: (TensorProto.INT8, np.int8, -8, 7)}


def widen_four_bit_activations(proto: onnx.ModelProto) -> int:
    """Rewrite, in place, every per-tensor 4-bit activation Q/DQ pair of ``proto`` (all graphs,
    control-flow bodies included) as Clip -> 8-bit Q/DQ; returns how many QuantizeLinear were."""
    main = proto.graph
    graphs = list(_graphs(main))
    names = {name for g in graphs for name in _names(g)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for g in graphs:
        for node in g.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
    outputs = {o.name for g in graphs for o in g.output}
    inits = {t.name: t for g in graphs for t in g.initializer}  # names are unique model-wide
    wide_zp: dict[str, str] = {}  # a 4-bit zero point -> its 8-bit initializer
    bounds: dict[tuple[str, str], tuple[str, str]] = {}  # (scale, zero point) -> the clip's bounds

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.add(name)
        return name

    def constant(base: str, array: np.ndarray) -> str:
        name = fresh(base)
        main.initializer.append(numpy_helper.from_array(array, name))
        return name

    count = 0
    for g in graphs:
        count_here, infos = 0, {info.name: info for info in g.value_info}
        for position, q in enumerate(list(g.node)):
            pair = _widenable(q, inits, consumers, outputs) if q.op_type == "QuantizeLinear" else None
            if pair is None:
                continue
            scale, zp, (wide_type, wide_dtype, qmin, qmax) = pair
            s, z = numpy_helper.to_array(scale), numpy_helper.to_array(zp).astype(np.int64)
            if zp.name not in wide_zp:
                wide_zp[zp.name] = constant(f"{zp.name}_8bit", z.astype(wide_dtype))
            if (scale.name, zp.name) not in bounds:  # in the scale's float type, which QuantizeLinear divides by
                bounds[scale.name, zp.name] = tuple(
                    constant(f"{q.input[0]}_{end}_4bit", ((code - z) * s.astype(np.float64)).astype(s.dtype))
                    for end, code in (("lo", qmin), ("hi", qmax)))
            clipped = fresh(f"{q.input[0]}_clipped_4bit")
            clip = onnx.helper.make_node("Clip", [q.input[0], *bounds[scale.name, zp.name]], [clipped],
                                         name=fresh(f"{q.name}_Clip"))
            g.node.insert(position + count_here, clip)  # just before the QuantizeLinear (references stay valid)
            count_here += 1
            q.input[0] = clipped
            for node in [q, *consumers[q.output[0]]]:
                node.input[2] = wide_zp[zp.name]
            if q.output[0] in infos:
                infos[q.output[0]].type.tensor_type.elem_type = wide_type
        count += count_here
    if count:
        used = {name for g in graphs for node in g.node for name in node.input}
        for g in graphs:
            for t in [t for t in g.initializer if t.data_type in _WIDER and t.name not in used]:
                g.initializer.remove(t)
    return count


def _widenable(q: onnx.NodeProto, inits: dict[str, TensorProto], consumers: dict[str, list[onnx.NodeProto]],
               outputs: set[str]) -> tuple[TensorProto, TensorProto, tuple] | None:
    """The scale, zero point and 8-bit stand-in of a per-tensor 4-bit pair, or None."""
    if len(q.input) < 3 or any(a.name == "block_size" and a.i for a in q.attribute):
        return None
    scale, zp = inits.get(q.input[1]), inits.get(q.input[2])
    if scale is None or zp is None or zp.data_type not in _WIDER or len(scale.dims) or len(zp.dims):
        return None
    readers = consumers.get(q.output[0], [])
    if q.output[0] in outputs or not readers or any(
            n.op_type != "DequantizeLinear" or list(n.input[1:3]) != list(q.input[1:3]) for n in readers):
        return None
    return scale, zp, _WIDER[zp.data_type]


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    yield from (v.name for v in (*graph.input, *graph.output, *graph.value_info))
    yield from (t.name for t in graph.initializer)
    for node in graph.node:
        yield node.name
        yield from node.output
