"""Keep onnxruntime from fusing a residual Add and the LayerNormalization after it into one
SkipLayerNormalization kernel, on a machine where that kernel runs slower than the two it replaces.

onnxruntime's ``SkipLayerNormFusion`` matches a default-domain Add whose only reader is a
LayerNormalization (and, in its test, whose inputs are 3-D of one static shape: a fixed-length
export). On this repository's machine (AMD EPYC, onnxruntime 1.32, 2 threads) the fused kernel took
275 us on [1, 128, 768] where Add and LayerNormalization took 89 us, and BERT-base's 24 of them
took 6.9 ms of its 50 ms int8 run. A two-input Sum computes what Add does and is not matched, so the
rewrite writes those Adds as Sum. Whether that pays depends on the machine's kernels, so
``fit-measured`` times the rewrite both ways and records its choice
(``qinject.core.ir.SPLIT_SKIP_LAYERNORM``); by default this pass applies only that choice.
"""

from __future__ import annotations

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.pass_manager import Pass, PassResult


class SplitSkipLayerNorm(Pass):
    """Write as Sum each Add that onnxruntime would fuse with the LayerNormalization after it.

    Options:
        always: split wherever onnxruntime would fuse (False: only where ``fit-measured`` timed the
            rewrite faster so, ``meta[qir.SPLIT_SKIP_LAYERNORM]``).
    """

    name = "split-skip-layernorm"

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def call(self, model: ir.Model) -> PassResult:
        if not (self.always or model.meta.get(qir.SPLIT_SKIP_LAYERNORM)):
            return PassResult(model, False)
        adds = fused_adds(model.graph)
        for add in adds:
            add.op_type = "Sum"
        return PassResult(model, bool(adds))


def fused_adds(graph: ir.Graph) -> list[ir.Node]:
    """The Adds of ``graph`` that onnxruntime fuses into SkipLayerNormalization with their reader.

    Its shape test is left out: onnxruntime infers the shapes itself, and a Sum where it would not have
    fused costs what the Add did."""
    found = []
    for node in graph:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        value = node.inputs[0]
        add = value.producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not graph:
            continue
        if not value.is_graph_output() and len(value.uses()) == 1 and all(v is not None for v in add.inputs):
            found.append(add)
    return found
