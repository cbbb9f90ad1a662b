"""Which widths a search on a target can use, so the sensitivity pass measures only those.

A search lowers nodes level by level (16 → 8 → 4). On a CPU target some levels buy nothing:
onnxruntime runs 16-bit and 4-bit static nodes as dequantize + float, so the table prices them no
faster than the level above. Measuring each node's sensitivity at such a level costs one model
evaluation per node (on BERT-base, 97 evaluations of 0.13 s × the evaluation feeds per level) for a
score the search would never act on. ``SearchWidths`` decides, from the table alone and before any
evaluation:

- ``levels(model)``: the search's start level, then each lower level that saves at least 1% of the
  level kept above anywhere on the target: every node moved to it at once, one node alone, or all
  but one;
- ``measured(model)``: the levels whose sensitivity is measured. Every lower level is; the start
  level is only where moving to it from float saves, by the same test. A search takes its
  start plan to meet the budget unmeasured (bisection's first bracket, greedy's walk), so an
  unmeasured start level counts as no damage, and the search keeps no node at it that float beats
  (``SearchSpace.without_slow_nodes``);
- ``floated(model)``: the nodes no level pays for, alone in the float model or beside every other
  node at that level (attention's score MatMuls on a CPU: onnxruntime packs their second operand on
  every int8 run). The search keeps them float and the sensitivity pass skips them: on ViT-B/16,
  24 of 74 evaluations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir
from qinject.passes.sensitivity.base import choice_for
from qinject.passes.target.fit_target import switch_where_faster

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.plan import DYNAMIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.core.rules import Rules
from qinject.cost.estimate import estimate, priced_model
from qinject.cost.latency_table import LatencyTable, load_target

WIDTHS = "qinject.search.widths"  # model meta: {"key": what decided it, "levels": [...], "measured": [...]}
# A level is searched where it saves at least this share of the plan above: each searched level
# costs one sensitivity evaluation per node (ViT-B/16: 50 at W4A8, 118 s, for 52 us on its
# classifier head, 0.08% of the W8A8 plan, which then failed the budget anyway).
MIN_SAVING = 0.01
# the mode a width may run in besides static, where the target prices it faster
ALTERNATIVES = {8: NodeQuant(mode=DYNAMIC), 4: NodeQuant(weights=4, mode=WEIGHT_ONLY)}


def fastest_modes(priced: ir.Model, nodes: Sequence[str], fixed: Mapping[str, NodeQuant | None], bits: int,
                  modes: Sequence[str], table: LatencyTable, batch: int) -> dict[str, NodeQuant]:
    """Per node of ``nodes`` with a second mode at ``bits``, that mode where the target prices it
    faster with every other node at ``bits`` too (static unless another is strictly faster)."""
    static = choice_for(bits)
    alternative = ALTERNATIVES.get(bits)
    if alternative is None or alternative.mode not in modes:
        return {}
    by_name = {n.name: n for n in qir.searchable_nodes(priced)}
    eligible = [n for n in nodes if alternative.mode in op_facts.modes(by_name[n])]

    def price(choices: dict[str, NodeQuant | None]) -> float:
        return estimate(priced, Plan(None, choices), table, batch, baselines=False).total_us

    start = {**fixed, **dict.fromkeys(nodes, static)}
    chosen, _ = switch_where_faster(price, start, dict.fromkeys(eligible, (static, alternative)))
    return {name: alternative for name in eligible if chosen[name] == alternative}


@dataclass(frozen=True)
class SearchWidths:
    """The levels a search on ``target`` uses and the widths its sensitivity pass measures, per model
    (each is a callable the pipeline hands to the sensitivity pass and to the search pass).

    Attributes:
        target: the latency table the search prices plans on.
        batch: the batch of the latency estimate.
        modes: the execution modes a width may run in.
        levels_wanted: the levels the search would use on a target where every one pays.
        rules: pins; pinned nodes are not searched and do not decide a level.
        latency_model: price on this graph instead (as ``SearchPass``).
    """

    target: LatencyTable | str
    batch: int
    modes: tuple[str, ...]
    levels_wanted: tuple[int, ...] = (16, 8, 4)
    rules: Rules | None = None
    latency_model: ir.Model | None = None

    @property
    def table_name(self) -> str:
        return self.target.target if isinstance(self.target, LatencyTable) else str(self.target)

    def levels(self, model: ir.Model) -> tuple[int, ...]:
        return tuple(self._decide(model)["levels"])

    def measured(self, model: ir.Model) -> tuple[int, ...]:
        return tuple(self._decide(model)["measured"])

    def floated(self, model: ir.Model) -> tuple[str, ...]:
        return tuple(self._decide(model)["floated"])

    def _decide(self, model: ir.Model) -> dict[str, list[int]]:
        """Decided once per model, and recorded in its meta (``WIDTHS``) for the search's report."""
        key = [self.table_name, self.batch, list(self.modes), list(self.levels_wanted)]
        if model.meta.get(WIDTHS, {}).get("key") != key:
            pricing = _Pricing(self, model)
            wanted = sorted(self.levels_wanted, reverse=True)
            levels = [wanted[0]]
            for low in wanted[1:]:
                if pricing.pays(levels[-1], low):
                    levels.append(low)
            measured = levels if pricing.pays(None, levels[0]) else levels[1:]
            floated = [n for n in pricing.nodes if not any(pricing.node_pays(n, bits) for bits in levels)]
            if len(floated) == len(pricing.nodes):  # nothing pays: the search runs, and its report says so
                floated = []
            model.meta[WIDTHS] = {"key": key, "levels": levels, "measured": measured, "floated": floated}
        return model.meta[WIDTHS]


class _Pricing:
    """Plans of one model priced on the target: uniform at a level, one node moved at a time."""

    def __init__(self, widths: SearchWidths, model: ir.Model) -> None:
        table = widths.target
        self.table = table if isinstance(table, LatencyTable) else load_target(table)
        self.batch, self.modes = widths.batch, widths.modes
        self.priced = priced_model(widths.latency_model if widths.latency_model is not None else model, widths.batch)
        self.fixed = widths.rules.pins(model)[0] if widths.rules is not None else {}
        self.nodes = [n.name for n in qir.searchable_nodes(model) if n.name not in self.fixed]
        self._choices: dict[int | None, dict[str, NodeQuant | None]] = {None: dict.fromkeys(self.nodes)}
        self._prices: dict[tuple, float] = {}  # the level tests and the node tests price the same plans

    def choices(self, bits: int | None) -> dict[str, NodeQuant | None]:
        """Every node at ``bits`` in its fastest mode (None: float); once per width, as each level
        is compared with the one above and the one below."""
        if bits not in self._choices:
            faster = fastest_modes(self.priced, self.nodes, self.fixed, bits, self.modes, self.table, self.batch)
            self._choices[bits] = {n: faster.get(n) or choice_for(bits) for n in self.nodes}
        return self._choices[bits]

    def uniform_us(self, bits: int | None) -> float:
        """Every node at ``bits`` (None: float)."""
        return self.price(self.choices(bits))

    def price(self, choices: Mapping[str, NodeQuant | None]) -> float:
        key = tuple(choices.get(n) for n in self.nodes)
        if key not in self._prices:
            self._prices[key] = estimate(self.priced, Plan(None, {**self.fixed, **choices}), self.table, self.batch,
                                         baselines=False).total_us
        return self._prices[key]

    def pays(self, high: int | None, low: int) -> bool:
        """Whether lowering from ``high`` (None: float) to ``low`` saves at least ``MIN_SAVING`` of the
        plan above anywhere: every node at once, one node alone, or all but one (conversions between
        the two widths can make a lone node slower where a group is faster, and the other way round)."""
        above, below = self.choices(high), self.choices(low)
        high_us, low_us = self.uniform_us(high), self.uniform_us(low)
        least = MIN_SAVING * high_us
        return low_us < high_us - least or any(self._moving_pays(n, above, below, high_us, low_us, least)
                                               for n in self.nodes)

    def node_pays(self, node: str, bits: int) -> bool:
        """Whether quantizing ``node`` at ``bits`` saves on the target: alone in the float model, or
        beside every other node at ``bits``."""
        above, below = self.choices(None), self.choices(bits)
        return self._moving_pays(node, above, below, self.uniform_us(None), self.uniform_us(bits))

    def _moving_pays(self, node: str, above: Mapping[str, NodeQuant | None], below: Mapping[str, NodeQuant | None],
                     high_us: float, low_us: float, least: float = 0.0) -> bool:
        return (self.price({**above, node: below[node]}) < high_us - least
                or self.price({**below, node: above[node]}) > low_us + least)
