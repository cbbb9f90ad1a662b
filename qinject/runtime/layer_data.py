"""One layer at a time, through the JAX backend: what layer-wise rewrites (AdaRound, bias correction)
need: each node's float input activations on calibration data, and the node as a JAX function of
its input and its weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import onnx_ir as ir

from qinject.backends.jax_backend import Program
from qinject.core import op_facts
from qinject.core.calib_data import rows, take


def node_function(program: Program, node: ir.Node) -> Callable[[Any, Any], Any]:
    """``f(x, w)``: the node's first output for activation ``x`` and weight ``w`` (other inputs,
    such as the bias, as in the model)."""
    act, widx = op_facts.activation_inputs(node)[0], op_facts.weight_index(node)
    fixed = [None if v is None else program.constants.get(v.name) for v in node.inputs]

    def f(x: Any, w: Any) -> Any:
        args = list(fixed)
        args[act], args[widx] = x, w
        return program._dispatch(node, args, {})[0]

    return f


def layer_inputs(model: ir.Model, inputs: dict[str, np.ndarray], nodes: Sequence[ir.Node],
                 batch: int | None = None) -> dict[str, np.ndarray]:
    """Each node's activation input (its first) over all samples of the float model, by node name.

    A graph with a fixed batch dimension runs in whole batches of that size (a remainder is left
    out, since an activation's rows need not be samples; fewer samples than one batch are padded by
    repeating the last), so every row returned is a real sample's.
    """
    program = Program(model)
    names = [n.inputs[op_facts.activation_inputs(n)[0]].name for n in nodes]
    order = [v.name for v in model.graph.inputs]
    fixed = model.graph.inputs[0].shape[0] if model.graph.inputs[0].shape is not None else None
    step = fixed if isinstance(fixed, int) else (batch or 64)
    run = jax.jit(lambda *xs: program.run(program.constants, xs, fetch=names)[len(program.outputs):])
    n = rows(inputs)
    stop = max(n - n % step, 1) if isinstance(fixed, int) else n
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, stop, step):
        idx = np.minimum(np.arange(start, start + step), n - 1) if isinstance(fixed, int) else \
            np.arange(start, min(start + step, n))
        feeds = take(inputs, idx)
        outs = run(*[feeds[k] for k in order])
        for part, out in zip(parts, outs):
            part.append(np.asarray(out))
    return {node.name: np.concatenate(p) for node, p in zip(nodes, parts)}
