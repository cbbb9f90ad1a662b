"""What ``qinject inspect`` shows: the quantizable nodes of a model, after weight folding."""

from __future__ import annotations

import math
import os

from qinject import op_facts
from qinject.frontends.onnx_frontend import load_onnx
from qinject.ir import quantizable_nodes
from qinject.passes import FoldConstantWeights


def quantizable_table(path: str | os.PathLike) -> list[list[object]]:
    model = load_onnx(path)
    FoldConstantWeights()(model)
    rows = []
    for node in quantizable_nodes(model):
        w = op_facts.weight_of(node)
        shape = list(w.shape) if w is not None and w.shape is not None else "-"
        params = math.prod(w.shape) if w is not None and w.shape is not None else 0
        macs = op_facts.macs(node)
        rows.append([node.name, node.op_type, shape, "?" if macs is None else f"{macs:,}", f"{params:,}"])
    return rows
