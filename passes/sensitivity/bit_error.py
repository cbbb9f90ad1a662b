"""Sensitivity signal 5: bit errors in the stored weights (approximate memories).

For each quantizable node and bit width b, the node alone is quantized (``alone(node, b)``) and each
bit of its stored integer weight (the initializer behind the weight's DequantizeLinear: int4, int8 or
int16, flipped in two's complement of that width, so an int4 code stays in [-8, 7]) is flipped
independently with probability = the bit-error rate, for each rate in ``rates`` and each of ``seeds``
seeds; the damage (``qinject.damage``) against the float model is measured. Scales, zero points and
the int32 bias are assumed to sit in reliable memory and are never flipped.

Score at b: the mean damage over seeds at ``score_rate`` (default 1e-3), *raw*: quantization and bit
errors together, what the model would suffer on such a memory, comparable across widths. The
damage without flips (``details['baseline']``) is the quantization-error signal's score at b (one
more evaluation per node and width, so that the two parts can be told apart without that signal);
``details['net_mean']`` is the damage net of it, the part due to the bit errors alone. Unlike
rounding noise, bit errors do not shrink as b grows: a flip of the top bit moves a code by half the
range at any width, and a wider code has more bits to flip, so the score often rises with b.

Details per width: ``baseline``; per rate ``damage_mean``, ``damage_std`` (over seeds),
``net_mean``, ``flips_mean`` (mean number of flipped bits); ``stored_bits`` (elements × width: the
expected flips are rate × stored_bits). A rate of 0 in ``rates`` is the baseline itself (no extra
evaluations). Nodes without a constant weight (attention MatMuls) get only the baseline.

The flips of one seed are nested across rates (common random numbers): the flip positions are drawn
at the highest rate as a Bernoulli process (geometric gaps, so memory and time follow the number of
flips, not the weight's size), and each lower rate r keeps each of them with probability
r / max(rates), which is again an independent Bernoulli(r) pattern. So at one seed a higher rate
flips a superset of the bits, and the damage's growth with the rate is not blurred by luck.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np
import onnx_ir as ir
from qinject.passes.sensitivity.base import (
    BITS,
    AnalysisData,
    NodeSignal,
    SensitivityPass,
    alone,
)

from qinject.core import op_facts
from qinject.core.errors import QinjectError
from qinject.runtime.damage import damage
from qinject.runtime.executor import Executor

# Stored code type -> (width in bits, the unsigned type its bit pattern is held in while flipping).
_PATTERNS = {
    np.dtype(ml_dtypes.int4): (4, np.uint8), np.dtype(ml_dtypes.uint4): (4, np.uint8),
    np.dtype(np.int8): (8, np.uint8), np.dtype(np.uint8): (8, np.uint8),
    np.dtype(np.int16): (16, np.uint16), np.dtype(np.uint16): (16, np.uint16),
}


class BitError(SensitivityPass):
    """Damage of random bit flips in one node's stored integer weight, per width and error rate.

    Options (besides ``SensitivityPass``'s evaluation data, bit widths, seed, workers, progress,
    method):
        rates: bit-error rates (probabilities per stored bit), default (1e-4, 1e-3, 1e-2).
        seeds: flip patterns per rate, node and width (default 3).
        score_rate: the rate whose mean damage is the score (one of ``rates``; default 1e-3).
    """

    name = "sensitivity-bit-error"
    signal = "bit_error"

    def __init__(self, data: AnalysisData | object, bits: tuple[int, ...] = BITS, *,
                 rates: tuple[float, ...] = (1e-4, 1e-3, 1e-2), seeds: int = 3, score_rate: float = 1e-3,
                 **options: object) -> None:
        super().__init__(data, bits, **options)
        self.rates = tuple(sorted({float(r) for r in rates}))
        if not self.rates or not all(0.0 <= r <= 1.0 for r in self.rates):
            raise QinjectError(f"sensitivity-bit-error: rates must be probabilities in [0, 1], got {rates}")
        if float(score_rate) not in self.rates:
            raise QinjectError(f"sensitivity-bit-error: score_rate {score_rate} is not one of the rates "
                               f"{self.rates}")
        if seeds < 1:
            raise QinjectError(f"sensitivity-bit-error: seeds must be at least 1, got {seeds}")
        self.seeds, self.score_rate = seeds, float(score_rate)

    def measure(self, model: ir.Model, executor: Executor, data: AnalysisData) -> dict[str, NodeSignal]:
        nodes = self.targets(model)
        flipping = [r for r in self.rates if r > 0]
        reference = executor.reference()
        # Filled while the variants are built: per evaluation (node, bits, rate or None for the
        # baseline, flipped bits), and the stored bits of each node's weight per width.
        keys: list[tuple[str, int, float | None, int]] = []
        stored: dict[tuple[str, int], int] = {}
        runs = len(flipping) * self.seeds
        total = sum(len(self.bits) * (1 + (runs if op_facts.weight_of(n) is not None else 0)) for n in nodes)
        outputs = executor.run(self._variants(executor, nodes, flipping, keys, stored),
                               progress=self.progress and "bit errors", total=total)
        found: dict[tuple[str, int, float | None], list[tuple[float, int]]] = {}
        for (name, bits, rate, flips), out in zip(keys, outputs, strict=True):
            found.setdefault((name, bits, rate), []).append((damage(reference, out, data.labels), flips))
        signals = {}
        for node in nodes:
            score: dict[int, float] = {}
            details: dict[str, dict] = {k: {} for k in ("baseline", "damage_mean", "damage_std", "net_mean",
                                                          "flips_mean", "stored_bits")}
            for bits in self.bits:
                base = found[(node.name, bits, None)][0][0]
                details["baseline"][bits], details["stored_bits"][bits] = base, stored[(node.name, bits)]
                for k in ("damage_mean", "damage_std", "net_mean", "flips_mean"):
                    details[k][bits] = {}
                for rate in self.rates:
                    # Rate 0, and any rate for a node without a weight, is the baseline itself.
                    a = np.array((found.get((node.name, bits, rate)) if rate > 0 else None) or [(base, 0)], float)
                    details["damage_mean"][bits][rate] = float(a[:, 0].mean())
                    details["damage_std"][bits][rate] = float(a[:, 0].std())
                    details["net_mean"][bits][rate] = float(a[:, 0].mean() - base)
                    details["flips_mean"][bits][rate] = float(a[:, 1].mean())
                score[bits] = details["damage_mean"][bits][self.score_rate]
            signals[node.name] = NodeSignal(score, details)
        return signals

    def _variants(self, executor: Executor, nodes: list[ir.Node], flipping: list[float], keys: list,
                  stored: dict) -> Iterator[ir.Model]:
        for index, node in enumerate(nodes):
            for bits in self.bits:
                base = executor.quantized(alone(node.name, bits))
                codes = _stored_weight(base, node)
                q = None if codes is None else codes.const_value.numpy()
                width = 0 if q is None else _PATTERNS[q.dtype][0]
                stored[(node.name, bits)] = 0 if q is None else width * q.size
                keys.append((node.name, bits, None, 0))
                yield base
                if q is None:
                    continue
                for seed in range(self.seeds):
                    rng = np.random.default_rng([self.seed, index, bits, seed])
                    positions = bernoulli_positions(rng, q.size * width, flipping[-1])
                    keep = rng.random(positions.size)
                    for rate in flipping:
                        chosen = positions[keep < rate / flipping[-1]]
                        variant = base.clone()
                        variant.graph.initializers[codes.name].const_value = ir.tensor(flip_bits(q, chosen),
                                                                                       name=codes.name)
                        keys.append((node.name, bits, rate, int(chosen.size)))
                        yield variant


def _stored_weight(variant: ir.Model, node: ir.Node) -> ir.Value | None:
    """The integer initializer behind the DequantizeLinear that feeds, in ``variant``, the input that
    is ``node``'s weight in the float model (a jax dot_general's weight input is whichever operand is
    constant, so it is looked up before quantization), if any."""
    idx = op_facts.weight_index(node) if op_facts.weight_of(node) is not None else None
    quantized = variant.graph.node(node.name)
    producer = quantized.inputs[idx].producer() if idx is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    codes = producer.inputs[0]
    return codes if codes.const_value is not None and codes.name in variant.graph.initializers else None


def bernoulli_positions(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Sorted indices in [0, n) where independent Bernoulli(``rate``) trials succeed, drawn as
    cumulative geometric gaps (work and memory follow the number of successes, not ``n``)."""
    if rate <= 0.0 or n == 0:
        return np.empty(0, np.int64)
    if rate >= 1.0:
        return np.arange(n, dtype=np.int64)
    parts, last = [], -1
    while True:
        expected = (n - 1 - last) * rate
        gaps = rng.geometric(rate, size=int(expected + 6 * np.sqrt(expected) + 16))
        positions = last + np.cumsum(gaps)
        if positions[-1] >= n:
            parts.append(positions[positions < n])
            return np.concatenate(parts)
        parts.append(positions)
        last = int(positions[-1])


def flip_bits(codes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A copy of ``codes`` (int4/uint4/int8/uint8/int16/uint16) with the given bits flipped.

    Bit ``p`` is bit ``p % width`` of element ``p // width`` (flat order) in the two's-complement
    pattern of the stored width, so int4 codes stay in [-8, 7] and int16 codes in [-32768, 32767].
    """
    width, unsigned = _PATTERNS[codes.dtype]
    if width == 4:
        pattern = (codes.astype(np.int8).view(np.uint8) & 0xF).ravel()
    else:
        pattern = codes.view(unsigned).ravel().copy()
    np.bitwise_xor.at(pattern, positions // width, (1 << (positions % width)).astype(unsigned))
    if width == 4:
        values = pattern.astype(np.int8)
        if codes.dtype == np.dtype(ml_dtypes.int4):
            values[values >= 8] -= 16
        return values.astype(codes.dtype).reshape(codes.shape)
    return pattern.view(codes.dtype).reshape(codes.shape)
