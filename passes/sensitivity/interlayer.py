"""Sensitivity signal 4: inter-layer dependency (conditional sensitivity).

A node's damage alone says little about its damage once its neighbours are quantized too: errors of
consecutive layers add up, or cancel, and a search lowers many nodes at once. What is computed, per
bit width b (weights b bits, activations max(b, 8)):

1. The base order: quantizable nodes from least to most sensitive by a base signal at b (default
   the Hessian's Ω, as the research this builds on does; any signal present can be the base).
2. The prefix curve: d_k = damage(nodes 1..k quantized at b), k = 1..N; d_0 = 0. N evaluations.
3. The conditional sensitivity of the k-th node: c_k = d_k - d_(k-1), the damage it adds given that
   every node ranked less sensitive is already quantized: exactly the situation a search that
   lowers nodes in the base order meets when it reaches that node.
4. Optionally (``pairs=True``), the pairwise interaction of each pair of adjacent quantizable nodes
   (one reads what the other writes, directly or through non-quantizable ops, including residual
   branches that join at an Add): I_ij = d({i, j}) - d({i}) - d({j}). One evaluation per pair and
   one per node alone (reused from the quant-error signal when present).

The score at b, and so the combined ordering, is c_k: the base signal chooses the context each node
is measured in, the conditional damage ranks it in that context. Ties keep the base order. The
details keep the base order and the prefix curve, so a search can bisect on it directly.
"""

from __future__ import annotations

import onnx_ir as ir
from qinject.passes.sensitivity.base import (
    AnalysisData,
    NodeSignal,
    SensitivityPass,
    alone,
    choice_for,
    signal_of,
)

from qinject.core import ir as qir
from qinject.core.errors import QinjectError
from qinject.core.plan import Plan
from qinject.runtime.damage import damage
from qinject.runtime.executor import Executor


class Interlayer(SensitivityPass):
    """Conditional sensitivity along a base signal's order, and optional adjacent-pair interactions.

    Options (besides ``SensitivityPass``'s):
        base: the signal that orders the nodes (must have run before: ``hessian`` by default).
        pairs: also measure interactions of adjacent quantizable nodes.
    """

    name = "sensitivity-interlayer"
    signal = "interlayer"

    def __init__(self, data: object, bits: tuple[int, ...] = (16, 8, 4), *, base: str = "hessian",
                 pairs: bool = False, **options: object) -> None:
        super().__init__(data, bits, **options)
        self.base, self.pairs = base, pairs

    def measure(self, model: ir.Model, executor: Executor, data: AnalysisData) -> dict[str, NodeSignal]:
        base = signal_of(model, self.base)
        names = [n.name for n in qir.quantizable_nodes(model) if n.name not in self.skipped]
        if not base or not set(names) <= set(base):
            raise QinjectError(f"the interlayer signal orders nodes by the {self.base!r} signal, which has not "
                               f"run on every quantizable node (run sensitivity-{self.base.replace('_', '-')} first)")
        reference = executor.reference()
        signals = {name: NodeSignal({}, {"base": self.base, "position": {}, "prefix_damage": {}}) for name in names}
        for bits in self.bits:
            order = sorted(names, key=lambda n: (base[n].score[bits], names.index(n)))
            plans = (Plan(None, {n: choice_for(bits) for n in order[:k]}) for k in range(1, len(order) + 1))
            outputs = executor.run((executor.quantized(p) for p in plans), total=len(order),
                                   progress=self.progress and f"interlayer {bits}-bit")
            previous = 0.0
            for k, (name, out) in enumerate(zip(order, outputs)):
                d = damage(reference, out, data.labels)
                signals[name].score[bits] = d - previous
                signals[name].details["position"][bits] = k
                signals[name].details["prefix_damage"][bits] = d
                previous = d
            if self.pairs:
                self._pairs(model, executor, data, reference, bits, signals)
        return signals

    def _pairs(self, model: ir.Model, executor: Executor, data: AnalysisData, reference: object, bits: int,
               signals: dict[str, NodeSignal]) -> None:
        pairs = adjacent_pairs(model)
        singles = signal_of(model, "quant_error")
        needed = sorted({n for pair in pairs for n in pair if n not in singles or bits not in singles[n].score})
        alone_damage = {n: singles[n].score[bits] for n in singles if bits in singles[n].score}
        outs = executor.run((executor.quantized(alone(n, bits)) for n in needed), total=len(needed),
                            progress=self.progress and f"interlayer pairs {bits}-bit (singles)")
        alone_damage.update({n: damage(reference, o, data.labels) for n, o in zip(needed, outs)})
        plans = (Plan(None, {a: choice_for(bits), b: choice_for(bits)}) for a, b in pairs)
        outs = executor.run((executor.quantized(p) for p in plans), total=len(pairs),
                            progress=self.progress and f"interlayer pairs {bits}-bit")
        for (a, b), out in zip(pairs, outs):
            interaction = damage(reference, out, data.labels) - alone_damage[a] - alone_damage[b]
            for name, other in ((a, b), (b, a)):
                signals[name].details.setdefault("pair_interaction", {}).setdefault(bits, {})[other] = interaction


def adjacent_pairs(model: ir.Model) -> list[tuple[str, str]]:
    """Pairs (producer, consumer) of quantizable nodes with a path between them through
    non-quantizable nodes only: consecutive layers, and the two ends of a residual branch."""
    graph = qir.to_networkx(model.graph)
    quantizable = set(qir.quantizable_nodes(model))
    pairs = []
    for node in qir.quantizable_nodes(model):
        seen, stack = set(), list(graph.successors(node))
        while stack:
            nxt = stack.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in quantizable:
                pairs.append((node.name, nxt.name))
            else:
                stack.extend(graph.successors(nxt))
    return sorted(set(pairs))

