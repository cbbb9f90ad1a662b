"""What ``qinject inspect`` shows: the quantizable nodes of a model, after weight folding."""

from __future__ import annotations

import math
import os

from qinject.core import op_facts
from qinject.core.ir import quantizable_nodes, subgraph_owners, subgraph_quantizable_nodes
from qinject.frontends.onnx_frontend import load_onnx
from qinject.passes.transforms.fold_constants import FoldConstants


def quantizable_table(path: str | os.PathLike) -> tuple[list[list[object]], int]:
    """One row per quantizable node: main graph first, then nodes inside control-flow bodies, whose
    name says which main-graph node holds them (``name (in loop)``; MACs there are per iteration).
    Returns the rows and how many of them are inside bodies."""
    model = load_onnx(path)
    FoldConstants()(model)
    owners = subgraph_owners(model)
    rows = []
    inner = subgraph_quantizable_nodes(model)
    for node in quantizable_nodes(model) + inner:
        w = op_facts.weight_of(node)
        shape = list(w.shape) if w is not None and w.shape is not None else "-"
        params = math.prod(w.shape) if w is not None and w.shape is not None else 0
        macs = op_facts.macs(node)
        owner = owners.get(id(node.graph))
        name = node.name if owner is None else f"{node.name} (in {owner.name or owner.op_type})"
        rows.append([name, node.op_type, shape, "?" if macs is None else f"{macs:,}", f"{params:,}"])
    return rows, len(inner)
