"""Sensitivity signal 1: quantization error.

For each quantizable node and bit width b:

- its weight's error at b bits (symmetric, per output channel as the rewrite does): normalised MSE
  (noise power over signal power) and SQNR in dB; computed from the weight alone;
- its input activation's error at b bits (asymmetric unsigned over the calibrated range, as the
  rewrite does): the expected NMSE and SQNR from the calibration histogram (rounding noise inside
  the range, clipping outside); no evaluation;
- its contribution to the model output's error: the damage (``qinject.damage``) of the model with
  only this node quantized at width b (weights b bits, activations max(b, 8), see
  ``qinject.sensitivity.choice_for``): one evaluation per node and width. This is the score.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qinject.passes.sensitivity.base import AnalysisData, NodeSignal, SensitivityPass, alone

from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.stats import expected_mse, select_range
from qinject.runtime.damage import damage
from qinject.runtime.executor import Executor


class QuantError(SensitivityPass):
    """Weight and activation quantization error per width, and each node's output damage alone.

    Options: see ``SensitivityPass`` (evaluation data, bit widths, seed, workers, progress).
    """

    name = "sensitivity-quant-error"
    signal = "quant_error"

    def measure(self, model: ir.Model, executor: Executor, data: AnalysisData) -> dict[str, NodeSignal]:
        nodes = self.targets(model)
        reference = executor.reference()
        variants = (executor.quantized(alone(n.name, b)) for n in nodes for b in self.bits)
        outputs = executor.run(variants, progress=self.progress and "quant error", total=len(nodes) * len(self.bits))
        signals = {}
        it = iter(outputs)
        for node in nodes:
            score, details = {}, {"weight_nmse": {}, "weight_sqnr_db": {}, "activation_nmse": {},
                                  "activation_sqnr_db": {}}
            for bits in self.bits:
                score[bits] = damage(reference, next(it), data.labels)
                w = weight_error(node, bits)
                if w is not None:
                    details["weight_nmse"][bits], details["weight_sqnr_db"][bits] = w
                a = activation_error(node, bits, self.method)
                if a is not None:
                    details["activation_nmse"][bits], details["activation_sqnr_db"][bits] = a
            signals[node.name] = NodeSignal(score, {k: v for k, v in details.items() if v})
        return signals


def weight_error(node: ir.Node, bits: int) -> tuple[float, float] | None:
    """(NMSE, SQNR dB) of the node's weight quantized symmetric per channel at ``bits``."""
    weight = op_facts.weight_of(node)
    if weight is None:
        return None
    w = weight.const_value.numpy().astype(np.float32)
    axis = op_facts.channel_axis(node) if w.ndim > 1 else None
    qtype = numerics.QType(bits, True)
    lo, hi = numerics.weight_range(w, axis)
    scale, zero = numerics.scale_zero_point(lo, hi, qtype, symmetric=True)
    approx = numerics.fake_quantize(w, scale, zero, qtype, axis)
    return _nmse_sqnr(float(np.mean((w.astype(np.float64) - approx) ** 2)), float(np.mean(w.astype(np.float64) ** 2)))


def activation_error(node: ir.Node, bits: int, method: str = "minmax") -> tuple[float, float] | None:
    """(NMSE, SQNR dB) expected for the node's first activation input at ``bits`` (uint, asymmetric)."""
    indices = op_facts.activation_inputs(node)
    stats = node.inputs[indices[0]].meta.get(qir.ACT_STATS) if indices else None
    if stats is None or stats.count == 0:
        return None
    qtype = numerics.QType(bits, False)
    lo, hi = select_range(stats, method, qtype, False)
    return _nmse_sqnr(expected_mse(stats, lo, hi, qtype, False), stats.sum_squares / stats.count)


def _nmse_sqnr(noise: float, signal: float) -> tuple[float, float]:
    if noise <= 0:
        return 0.0, float("inf")
    nmse = noise / max(signal, 1e-300)
    return nmse, float(-10 * np.log10(nmse))
