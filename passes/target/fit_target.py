"""Fit a plan to a target: each node in its fastest execution mode, and float where float is faster.

An analysis run just before the rewrite, on the calibrated float graph, for a plain quantize (a
search makes the same choices inside its own loop, see ``qinject.search``). Two steps, each priced
by the whole plan's estimate on the target's latency table (``qinject.cost``), conversions included:

1. with ``auto_mode``, a node may switch from static to the other mode of its width that the target
   prices faster: dynamic at 8 bits, weight-only at 4 bits (``qinject.op_facts.modes``);
2. a node running on an integer kernel (8-bit static, dynamic, weight-only MatMul/Gemm) that the
   target prices faster in float goes float (two sweeps in graph order, a flip kept where it lowers
   the estimate), and so does each region of such nodes joined on the integers through a residual
   Add or Concat that runs on them (and range-preserving ops and ReLUs) where all of it at once is
   cheaper: no single node of a chain of QLinearConv -> QLinearAdd -> QLinearConv pays to go float
   alone (it adds conversions at both ends), where the whole region may (MobileNetV2 with its
   depthwise convolutions float: priced 8% slower than float before region flips). Widths without such a kernel (4- or 16-bit static: dequantize + float on a CPU)
   were asked for their size or accuracy, not their speed; they are kept, with a note when the
   target prices them slower than float.

Nodes the plan names are left as named; every change is said in a note on its node. The fitted plan
is stored in the model's meta (``qinject.ir.CHOSEN_PLAN``), where the rewrite and the cost estimate
read it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.calib_data import QinjectWarning
from qinject.core.errors import UnsupportedModelError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import DYNAMIC, STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.cost.estimate import estimate, priced_model
from qinject.cost.latency_table import LatencyTable, load_target


class FitTarget(Pass):
    """Switch nodes to their fastest mode (``auto_mode``) and keep float those priced faster in float.

    Options:
        plan: the plan to fit.
        target: a latency table, or a target name or path.
        batch: the size given to a symbolic batch dimension.
        auto_mode: also try each node's other mode at its width (dynamic, weight-only).
        slow_kernels: nodes the plan keeps float only for onnxruntime's slower kernel (depthwise
            convolutions); a second plan is fitted with them free (``qir.ALTERNATIVE_PLAN``), which
            fit-measured times against the first: beside integer neighbours they can pay.
    """

    name = "fit-target"
    analysis = True

    def __init__(self, plan: Plan, target: LatencyTable | str, batch: int = 1, auto_mode: bool = False,
                 slow_kernels: Collection[str] = ()) -> None:
        self.plan, self.batch, self.auto_mode = plan, batch, auto_mode
        self.table = target if isinstance(target, LatencyTable) else load_target(target)
        # nodes the plan keeps float only because onnxruntime's kernel for them is slower alone
        # (depthwise convolutions): a second plan is fitted with them free, for fit-measured to time
        self.slow_kernels = frozenset(slow_kernels)

    def call(self, model: ir.Model) -> PassResult:
        try:
            priced = priced_model(model, self.batch)
        except UnsupportedModelError as exc:  # no shapes: nothing to price, the plan stays as given
            warnings.warn(f"fitting the plan to {self.table.target} skipped: {exc}", QinjectWarning, stacklevel=2)
            return PassResult(model, False)
        plan, notes = self._fit(priced, self.plan)
        for node in model.graph.all_nodes():
            for note in notes.get(node.name, ()):
                node.meta.setdefault(qir.QUANT_NOTES, []).append(note)
        model.meta[qir.CHOSEN_PLAN] = plan
        if self.slow_kernels:
            free = Plan(self.plan.default, {n: c for n, c in self.plan.nodes.items() if n not in self.slow_kernels})
            other, other_notes = self._fit(priced, free)
            if any(other.choice(n) is not None for n in self.slow_kernels):
                model.meta[qir.ALTERNATIVE_PLAN] = (other, other_notes, notes, self.slow_kernels)
        return PassResult(model, False)

    def _fit(self, priced: ir.Model, plan: Plan) -> tuple[Plan, dict[str, list[str]]]:
        """``plan`` fitted to the table, and the notes on the nodes it changed."""
        fitter = _Fitter(priced, plan, self.table, self.batch)
        if self.auto_mode:
            fitter.fastest_modes()
        if fitter.float_where_faster() and self.auto_mode:
            # a neighbour gone float changes what each mode's conversions cost (BERT's attention
            # output projection: static while the context MatMul before it was int8, dynamic after)
            fitter.fastest_modes()
        fitter.note_modes()
        return Plan(plan.default, fitter.choices_differing()), fitter.notes


class _Fitter:
    def __init__(self, model: ir.Model, plan: Plan, table: LatencyTable, batch: int) -> None:
        self.model, self.plan, self.table, self.batch = model, plan, table, batch
        self.nodes = {n.name: n for n in qir.searchable_nodes(model)}
        self.choices = {name: plan.choice(name) for name in self.nodes}
        self.free = [name for name in self.nodes if name not in plan.nodes and self.choices[name] is not None]
        self.notes: dict[str, list[str]] = {}
        self.current = self._price(self.choices)

    def _price(self, choices: dict[str, NodeQuant | None]) -> float:
        return estimate(self.model, Plan(None, choices), self.table, self.batch, baselines=False).total_us

    def _try(self, name: str, choice: NodeQuant | None) -> float | None:
        """Adopt ``choice`` for ``name`` if it lowers the estimate; the time saved, else None."""
        trial = {**self.choices, name: choice}
        us = self._price(trial)
        if us >= self.current:
            return None
        saved, self.choices, self.current = self.current - us, trial, us
        return saved

    def fastest_modes(self) -> None:
        """Every quantized node that has one switched to its other mode at once where that is cheaper
        (neighbours in one mode share conversions, so single switches can miss it), then node by node
        either way."""
        given = {name: self.plan.choice(name) for name in self.free if self.choices[name] is not None}
        pairs = {name: (c, other) for name, c in given.items()
                 if (other := _other_mode(c, op_facts.modes(self.nodes[name]))) is not None}
        self.choices, self.current = switch_where_faster(self._price, self.choices, pairs, self.current)

    def note_modes(self) -> None:
        """A note on each node now running its other mode."""
        for name in self.free:
            given, choice = self.plan.choice(name), self.choices[name]
            if choice is None or choice == given or choice != _other_mode(given, op_facts.modes(self.nodes[name])):
                continue
            had_static = STATIC in op_facts.modes(self.nodes[name])  # else the static choice was float
            self.notes.setdefault(name, []).append(
                f"runs {choice.label}: {self.table.target} prices the plan faster than with "
                f"{given.label if had_static else 'it float (it has no static form)'} here")

    def float_where_faster(self) -> bool:
        """Single nodes in graph order, then whole regions, then single nodes again if that changed
        anything; whether any node went float."""
        changed = self._float_singles()
        if self._float_regions() or changed:
            self._float_singles()
            return True
        return False

    def _float_singles(self) -> bool:
        changed = False
        for name in self.free:
            choice = self.choices[name]
            if choice is not None and _on_kernel(self.nodes[name], choice) and (
                    saved := self._try(name, None)) is not None:
                changed = True
                self.notes[name] = [
                    f"kept float: {self.table.target} prices it {saved:.1f} us faster in float than "
                    f"{choice.label} (quantize anyway with --force or by naming it in the plan)"]
        return changed

    def _float_regions(self) -> bool:
        """Each region (``_regions``) of two or more free nodes on integer kernels set float at once
        where that lowers the estimate; whether any was."""
        changed = False
        for region in _regions(self.model, {n for n in self.free if (c := self.choices[n]) is not None
                                            and _on_kernel(self.nodes[n], c)}):
            trial = {**self.choices, **{name: None for name in region}}
            us = self._price(trial)
            if us >= self.current:
                continue
            saved, labels = self.current - us, {name: self.choices[name].label for name in region}
            self.choices, self.current, changed = trial, us, True
            for name in region:
                self.notes[name] = [f"kept float: {self.table.target} prices it and the {len(region) - 1} node(s) "
                                    f"joined to it on the integers {saved:.1f} us faster in float than {labels[name]} "
                                    "(quantize anyway with --force or by naming it in the plan)"]
        return changed

    def choices_differing(self) -> dict[str, NodeQuant | None]:
        """The plan's own per-node choices, plus every node whose choice changed."""
        out = dict(self.plan.nodes)
        out.update({n: c for n, c in self.choices.items() if n in self.free and c != self.plan.choice(n)})
        return out


def _regions(model: ir.Model, members: set[str]) -> list[list[str]]:
    """The nodes named ``members`` grouped where a tensor path joins them through nodes that keep
    integers integer (residual Add, Concat, range-preserving ops, ReLU), in graph order: the regions
    of two or more that hold a residual Add or Concat (the coupling single flips cannot undo; a plain
    chain of convolutions is left to them, as before the joins)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    def connector(node: ir.Node) -> bool:
        return node.name not in members and (op_facts.joins_integers(node) or op_facts.preserves_range(node)
                                              or op_facts.is_epilogue(node))

    nodes = [n for n in model.graph if n.name in members or connector(n)]
    keep = {id(n) for n in nodes}
    for node in nodes:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in keep:
                parent[find(producer.name)] = find(node.name)
    groups: dict[str, list[str]] = {}
    for node in nodes:
        if node.name in members:
            groups.setdefault(find(node.name), []).append(node.name)
    joined = {find(n.name) for n in nodes if n.name not in members and op_facts.joins_integers(n)}
    return [g for root, g in groups.items() if len(g) > 1 and root in joined]


def _on_kernel(node: ir.Node, choice: NodeQuant) -> bool:
    """Whether ``choice`` runs ``node`` on an integer kernel of onnxruntime's (not dequantize + float)."""
    if choice.mode == STATIC:
        return op_facts.runs_on_integer_kernel(node, choice.weights, choice.activations)
    return choice.mode == DYNAMIC or op_facts.weight_only_kernel(node)


def switch_where_faster(price: Callable[[dict[str, NodeQuant | None]], float],
                        choices: dict[str, NodeQuant | None],
                        pairs: Mapping[str, tuple[NodeQuant | None, NodeQuant | None]],
                        current: float | None = None) -> tuple[dict[str, NodeQuant | None], float]:
    """``choices`` with each node of ``pairs`` in the one of its two modes (given, other) that
    ``price`` finds cheaper, and their price (``current``: that of ``choices``, when known): every node
    switched to its other mode at once first (neighbours in one mode share conversions, so single
    switches can miss it), then node by node either way. Shared by ``fit-target`` and the search's
    per-level mode choice."""
    current = price(choices) if current is None else current
    if not pairs:
        return choices, current
    together = {**choices, **{name: other for name, (_, other) in pairs.items()}}
    if (us := price(together)) < current:
        choices, current = together, us
    for name, (given, other) in pairs.items():
        trial = {**choices, name: given if choices[name] == other else other}
        if (us := price(trial)) < current:
            choices, current = trial, us
    return choices, current


def _other_mode(choice: NodeQuant, modes: tuple[str, ...]) -> NodeQuant | None:
    """The other mode of ``choice``'s width the node has: dynamic for W8A8, weight-only for 4-bit
    weights (static choices only; a chosen mode is kept)."""
    if choice.mode != STATIC:
        return None
    if choice.weights == 8 and choice.activations == 8 and DYNAMIC in modes:
        return NodeQuant(mode=DYNAMIC, per_channel=choice.per_channel)
    if choice.weights == 4 and WEIGHT_ONLY in modes:
        return NodeQuant(weights=4, mode=WEIGHT_ONLY, weight_signed=choice.weight_signed,
                         weight_symmetric=choice.weight_symmetric)
    return None
