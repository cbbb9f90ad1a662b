"""Empirical bias correction (Nagel et al., 2019): remove the mean output shift weight rounding causes.

Quantizing a weight shifts each output channel's mean by ``E[f(x, Q(W)) − f(x, W)]``; with few
bits the shift is biased, and layers downstream read it as signal. This pass measures the shift per
output channel on calibration data (each node's input in the model as it stands, activations in
float, through the JAX backend) and subtracts it from the node's float bias, which the rewrite then
quantizes as usual. Nodes without a bias input (a bias-less Conv, MatMul, a jax dot) are left alone
with a note.

After AdaRound the weight already lies on the grid, so ``Q(W) = W``: the shift is measured against
the float weight AdaRound replaced (``adaround.FLOAT_WEIGHT``), that is, for the learned rounding's
error rather than round-to-nearest's. The nodes corrected are AdaRound's (``rounding_nodes``:
static mode, per-channel weights of at most ``max_bits`` bits, per-tensor ones of at most
``per_tensor_max_bits``); on a plan none of whose nodes qualifies (and that no search chose) the
pass refuses.
"""

from __future__ import annotations

import jax
import numpy as np
import onnx_ir as ir
from qinject.passes.rounding.adaround import FLOAT_WEIGHT, rounding_nodes, weight_grid
from qinject.passes.sensitivity.base import AnalysisData

from qinject.backends.jax_backend import Program
from qinject.core import numerics, op_facts
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import Plan
from qinject.runtime.layer_data import layer_inputs, node_function

NOTES = "qinject.bias_correction.notes"
APPLIED = "qinject.bias_correction.applied"  # node meta: the mean |shift| removed


class BiasCorrection(Pass):
    """Correct the float bias of the plan's low-bit static nodes for their weight-rounding shift.

    Options:
        data: calibration inputs; plan: the plan (None: the search result in the model's meta);
        max_bits: per-channel weights of at most this many bits are corrected (default 4);
        per_tensor_max_bits: per-tensor ones of at most this many (default 8); samples: calibration
        samples used.
    """

    name = "bias-correction"

    def __init__(self, data: object, plan: Plan | None = None, *, max_bits: int = 4,
                 per_tensor_max_bits: int = 8, samples: int = 256) -> None:
        self.data, self.plan, self.max_bits, self.samples = data, plan, max_bits, samples
        self.per_tensor_max_bits = per_tensor_max_bits

    def call(self, model: ir.Model) -> PassResult:
        plan, nodes = rounding_nodes(model, self.plan, self.max_bits, self.per_tensor_max_bits,
                                     "bias correction (--bias-correction)", NOTES)
        nodes = [n for n in nodes if _own_bias(n)]
        if not nodes:
            return PassResult(model, False)
        data = AnalysisData.load(self.data, model, self.samples)
        inputs = layer_inputs(model, data.inputs, nodes)
        program = Program(model)
        for node in nodes:
            w = np.asarray(op_facts.weight_of(node).const_value.numpy(), dtype=np.float32)
            g = weight_grid(node, w, plan.choice(node.name))
            wq = numerics.fake_quantize(w, g.scale, g.zero_point, g.qtype, g.axis)
            reference = np.asarray(node.meta.get(FLOAT_WEIGHT, w), dtype=np.float32)
            f = jax.jit(node_function(program, node))
            x = inputs[node.name]
            diff = np.asarray(f(x, wq)) - np.asarray(f(x, reference))
            shift = np.mean(diff, axis=_non_channel_axes(node, diff.ndim))
            bias = node.inputs[op_facts.fact(node).bias_input]
            old = bias.const_value.numpy()
            bias.const_value = ir.tensor((old - shift.reshape(old.shape)).astype(old.dtype), name=bias.name)
            node.meta[APPLIED] = float(np.mean(np.abs(shift)))
        return PassResult(model, True)


def _own_bias(node: ir.Node) -> bool:
    """Whether the node has a constant bias read by it alone, noting why not otherwise."""
    b = op_facts.fact(node).bias_input
    if b is None or b >= len(node.inputs) or node.inputs[b] is None or node.inputs[b].const_value is None:
        node.meta.setdefault(NOTES, []).append("no constant bias input: bias correction skipped")
        return False
    if len({use.node for use in node.inputs[b].uses()}) > 1:
        node.meta.setdefault(NOTES, []).append("bias shared with other nodes: bias correction skipped")
        return False
    return True


def _non_channel_axes(node: ir.Node, rank: int) -> tuple[int, ...]:
    """The output axes other than its channel one (the op facts': Conv's axis 1, Gemm's last)."""
    channel = op_facts.output_channel_axis(node, rank)
    return tuple(i for i in range(rank) if i != channel)
