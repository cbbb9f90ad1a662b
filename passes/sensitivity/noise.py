"""Sensitivity signal 2: noise injection.

For each quantizable node and bit width b, noise with the variance of b-bit rounding (Δ²/12) is
injected at that node only, and the damage (``qinject.damage``: loss increase with labels, else KL to
the float model's outputs, or output NMSE for non-classifiers) is measured:

- weight noise: Gaussian N(0, Δ_c²/12) added to the node's weight, Δ_c the b-bit step of output
  channel c (symmetric, per channel, as the rewrite quantizes it). The noisy weight is a new
  initializer read by this node only, so a weight shared with another node stays clean there;
- activation noise: ``RandomNormalLike(x, scale=Δ/√12, seed=…) + Add`` in front of each of the
  node's activation inputs x, read by this node only (other consumers of x see it clean). Δ is the
  step at ``choice_for(b).activations`` bits (max(b, 8)), unsigned asymmetric over the range the
  rewrite picks from the calibration statistics (``stats.select_range`` with the pass's method).
  onnxruntime's generator is seeded by the ``seed`` attribute when the session is built, so a
  variant gives the same noise every time it runs (each runs in a fresh session);
- a zero Δ (a weight channel or an activation that is all zeros, which quantization represents
  exactly) gets no noise, although ``numerics.scale_zero_point`` writes scale 1 for such ranges.

Only rounding noise is modelled: clipping by a percentile/MSE/entropy range is not (with the
default minmax nothing is clipped), nor the correlation of rounding errors with the values.

Score at b: the mean over ``draws`` of the damage with weight and activation noise injected
together (one evaluation per node, width and draw). The draws use common random numbers across
widths: draw d of a node uses the same standard-normal weight pattern and the same generator seed at
every b, only scaled by Δ_b, so the scores of one node at different widths differ by the noise level
alone, not by the luck of the draw. With ``separate=True`` the damage of each kind alone is measured
too (``details['weight_damage']``, ``details['activation_damage']``): three evaluations per draw
instead of one, off by default. Details also hold the injected noise power relative to the signal
(``weight_noise_nmse``, ``activation_noise_nmse`` of the first activation input) and, with more than
one draw, the damage's standard deviation over draws.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from qinject.passes.sensitivity.base import (
    BITS,
    AnalysisData,
    NodeSignal,
    SensitivityPass,
    choice_for,
)

from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.errors import QinjectError
from qinject.core.stats import select_range
from qinject.runtime.damage import damage
from qinject.runtime.executor import Executor


class Noise(SensitivityPass):
    """Damage of b-bit rounding noise injected at one node's weight and activation inputs.

    Options (besides ``SensitivityPass``'s evaluation data, bit widths, seed, workers, progress,
    method):
        draws: noise draws per node and width, averaged (default 2).
        separate: also measure weight noise alone and activation noise alone (3x the evaluations).
    """

    name = "sensitivity-noise"
    signal = "noise"

    def __init__(self, data: AnalysisData | object, bits: tuple[int, ...] = BITS, *, draws: int = 2,
                 separate: bool = False, **options: object) -> None:
        super().__init__(data, bits, **options)
        if draws < 1:
            raise QinjectError(f"sensitivity-noise: draws must be at least 1, got {draws}")
        self.draws, self.separate = draws, separate

    def measure(self, model: ir.Model, executor: Executor, data: AnalysisData) -> dict[str, NodeSignal]:
        nodes = self.targets(model)
        # (weight noise, activation noise) per evaluation: both, then each alone with ``separate``.
        kinds = ((True, True),) + (((True, False), (False, True)) if self.separate else ())
        reference = executor.reference()
        variants = (self._variant(model, k, node, bits, draw, weight_on, act_on)
                    for k, node in enumerate(nodes) for bits in self.bits for draw in range(self.draws)
                    for weight_on, act_on in kinds)
        total = len(nodes) * len(self.bits) * self.draws * len(kinds)
        it = iter(executor.run(variants, progress=self.progress and "noise", total=total))
        signals = {}
        for node in nodes:
            score, details = {}, {"weight_damage": {}, "activation_damage": {}, "damage_std": {},
                                  "weight_noise_nmse": {}, "activation_noise_nmse": {}}
            for bits in self.bits:
                found = np.array([[damage(reference, next(it), data.labels) for _ in kinds]
                                  for _ in range(self.draws)])
                score[bits] = float(found[:, 0].mean())
                if self.draws > 1:
                    details["damage_std"][bits] = float(found[:, 0].std())
                if self.separate:
                    details["weight_damage"][bits] = float(found[:, 1].mean())
                    details["activation_damage"][bits] = float(found[:, 2].mean())
                sigma = weight_sigma(node, bits)
                if sigma is not None:
                    w = op_facts.weight_of(node).const_value.numpy().astype(np.float64)
                    details["weight_noise_nmse"][bits] = float(np.mean(np.broadcast_to(sigma, w.shape) ** 2)
                                                               / max(np.mean(w**2), 1e-300))
                acts = op_facts.activation_inputs(node)
                if acts:
                    stats = node.inputs[acts[0]].meta.get(qir.ACT_STATS)
                    power = stats.sum_squares / stats.count if stats is not None and stats.count else 0.0
                    s = activation_sigma(node, acts[0], bits, self.method)
                    details["activation_noise_nmse"][bits] = s**2 / power if power > 0 else 0.0
            signals[node.name] = NodeSignal(score, {k: v for k, v in details.items() if v})
        return signals

    def _variant(self, model: ir.Model, index: int, node: ir.Node, bits: int, draw: int, weight_on: bool,
                 act_on: bool) -> ir.Model:
        """A copy of the model with noise at ``node``: its weight (``weight_on``) and its activation
        inputs (``act_on``). The noise pattern depends on (seed, node index, draw), not on ``bits``."""
        variant = model.clone()
        graph = variant.graph
        target = graph.node(node.name)
        sigma = weight_sigma(node, bits) if weight_on else None
        if sigma is not None:
            widx = op_facts.weight_index(target)
            old = target.inputs[widx]
            w = old.const_value.numpy()
            z = np.random.default_rng([self.seed, index, draw]).standard_normal(w.shape)
            noisy = qir.add_initializer(graph, f"{old.name}_noisy", (w + sigma * z).astype(w.dtype))
            target.replace_input_with(widx, noisy)
            if not old.uses() and not old.is_graph_output():
                del graph.initializers[old.name]
        if act_on:
            seen: dict[str, ir.Value] = {}
            for j, i in enumerate(op_facts.activation_inputs(node)):
                x = target.inputs[i]
                if x.name not in seen:
                    s = activation_sigma(node, i, bits, self.method)
                    if s == 0.0:
                        continue
                    seed = np.random.SeedSequence([self.seed, index, draw, j]).generate_state(1)[0] % 2**24
                    seen[x.name] = _add_noise(graph, target, x, s, int(seed))
                target.replace_input_with(i, seen[x.name])
        return variant


def weight_sigma(node: ir.Node, bits: int) -> np.ndarray | None:
    """The standard deviation Δ/√12 of b-bit rounding of the node's weight, shaped to broadcast
    against it (per output channel; 0 for an all-zero channel); None without a weight."""
    weight = op_facts.weight_of(node)
    if weight is None:
        return None
    w = weight.const_value.numpy()
    axis = op_facts.channel_axis(node) if w.ndim > 1 else None
    lo, hi = numerics.weight_range(w.astype(np.float32), axis)
    scale, _ = numerics.scale_zero_point(lo, hi, numerics.QType(bits, True), symmetric=True)
    sigma = np.where(np.maximum(-lo, hi) > 0, scale.astype(np.float64), 0.0) / math.sqrt(12)
    if axis is None:
        return sigma.reshape(())
    shape = [1] * w.ndim
    shape[axis] = sigma.size
    return sigma.reshape(shape)


def activation_sigma(node: ir.Node, index: int, bits: int, method: str = "minmax") -> float:
    """Δ/√12 of the node's activation input ``index`` quantized unsigned asymmetric over its calibrated
    range at the activation width of sensitivity width ``bits`` (``choice_for(bits).activations``);
    0 when the range is empty (an all-zero tensor is represented exactly)."""
    value = node.inputs[index]
    stats = value.meta.get(qir.ACT_STATS)
    if stats is None:
        raise QinjectError(f"node {node.name!r}: no calibration statistics for activation {value.name!r} "
                           "(run the calibrate pass first)")
    qtype = numerics.QType(choice_for(bits).activations, False)
    lo, hi = select_range(stats, method, qtype, False)
    if min(lo, 0.0) == max(hi, 0.0):
        return 0.0
    scale, _ = numerics.scale_zero_point(lo, hi, qtype, symmetric=False)
    return float(scale) / math.sqrt(12)


def _add_noise(graph: ir.Graph, node: ir.Node, x: ir.Value, sigma: float, seed: int) -> ir.Value:
    """``x + RandomNormalLike(x)`` inserted before ``node``; returns the noisy value."""
    stem = f"{x.name}_noise_{node.name}"
    rnd = ir.node("RandomNormalLike", [x], {"mean": 0.0, "scale": float(sigma), "seed": float(seed)},
                  name=f"{stem}_RandomNormalLike")
    add = ir.node("Add", [x, rnd.outputs[0]], name=f"{stem}_Add")
    rnd.outputs[0].name, add.outputs[0].name = f"{stem}_draw", stem
    for out in (rnd.outputs[0], add.outputs[0]):
        out.shape, out.type = x.shape, x.type
    graph.insert_before(node, [rnd, add])
    return add.outputs[0]
