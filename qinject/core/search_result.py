"""What a search (or a fit to a target) chose for a model, kept in the model's ``meta``: the
``SearchResult`` a search pass stores, and ``chosen_plan``, which the passes after it read (the
rewrite, AdaRound, bias correction, the cost estimate). It lives in core because those passes sit
below the searches: a plan's choice belongs to the plan, not to the search that chose it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.errors import QinjectError
from qinject.core.plan import Plan

RESULT = "qinject.search.result"  # model meta: the SearchResult the rewrite applies


@dataclass(frozen=True)
class Trial:
    """One evaluated plan."""

    label: str
    bits: tuple[int, ...]  # per node, in the space's node order
    score: float
    passed: bool
    latency_us: float


@dataclass
class SearchResult:
    """What a search chose, what it measured, and what it cost."""

    algorithm: str
    plan: Plan
    bits: dict[str, int | None]  # None: float
    metric: str
    budget: str
    target: str
    float_score: float
    floor: float
    score: float
    latency_us: float
    float_us: float
    sixteen_bit_us: float
    evaluations: int
    seconds: float
    trials: list[Trial] = field(default_factory=list)
    message: str = ""
    frontier: list[Trial] = field(default_factory=list)  # the Pareto sweep's points
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # initializers the plan replaces (AdaRound, ...)
    searched: list[str] = field(default_factory=list)  # the nodes the search chose (not pinned); Trial.bits order
    score_format: Callable[[float], str] | None = field(default=None, repr=False, compare=False)  # the metric's
    levels: list[str] = field(default_factory=list)  # the widths searched, highest first ("W16A16", "W8A8")
    # the sensitivity it ranked by: signal, evaluations, seconds, the widths measured ("W8A8", ...)
    sensitivity: dict = field(default_factory=dict)

    def label(self, node: str) -> str:
        """How ``node``'s choice reads: "W8A8", "W8A8 dynamic", "W4 weight-only/32", "float"."""
        choice = self.plan.choice(node)
        return "float" if choice is None else choice.label

    def width_counts(self) -> dict[str, int]:
        """How many nodes got each choice ("W8A8", "W4 weight-only/32", "float", ...)."""
        counts: dict[str, int] = {}
        for node in self.bits:
            label = self.label(node)
            counts[label] = counts.get(label, 0) + 1
        return counts

    @property
    def saving_vs_16_bit(self) -> float:
        return 1.0 - self.latency_us / self.sixteen_bit_us

    @property
    def saving_vs_float(self) -> float:
        return 1.0 - self.latency_us / self.float_us

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "metric": self.metric, "budget": self.budget, "target": self.target,
                "float_score": self.float_score, "floor": self.floor, "score": self.score,
                "latency_us": self.latency_us, "float_us": self.float_us, "sixteen_bit_us": self.sixteen_bit_us,
                "saving_vs_16_bit": self.saving_vs_16_bit, "evaluations": self.evaluations,
                "seconds": self.seconds, "bits": self.bits, "message": self.message, "levels": self.levels,
                "sensitivity": self.sensitivity,
                "choices": {n: self.label(n) for n in self.bits},
                "trials": [{"label": t.label, "score": t.score, "passed": t.passed, "latency_us": t.latency_us}
                           for t in self.trials],
                "pareto_front": [{"score": t.score, "passed": t.passed, "latency_us": t.latency_us,
                                  "bits": dict(zip(self.searched, t.bits))} for t in self.frontier]}


def search_result(model: ir.Model) -> SearchResult | None:
    return model.meta.get(RESULT)


def chosen_plan(model: ir.Model, plan: Plan | None) -> Plan:
    """``plan``, or (None) the plan last fitted to a target (``fit-target``, ``fit-measured``), or the one a
    search pass chose for ``model``."""
    if plan is not None:
        return plan
    if qir.CHOSEN_PLAN in model.meta:  # a fit after the search (fit-measured) refines its plan
        return model.meta[qir.CHOSEN_PLAN]
    found = search_result(model)
    if found is not None:
        return found.plan
    raise QinjectError("no plan was given and no search or fit-target pass ran before this pass")


def format_result(result: SearchResult) -> str:
    """The report a user reads: per-node widths, latency saving, metric vs float, evaluations."""
    fmt = result.score_format or (lambda v: f"{v:.4g}")
    lines = [f"search: {result.algorithm} on {result.target}, budget {result.budget} of {result.metric}"]
    width = max(len("node"), *(len(n) for n in result.bits))
    lines.append(f"  {'node':<{width}}  choice")
    for name in result.bits:
        lines.append(f"  {name:<{width}}  {result.label(name)}")
    lines.append("  " + ", ".join(f"{v} x {k}" for k, v in sorted(result.width_counts().items())))
    lines.append(f"  {result.metric}: float {fmt(result.float_score)} -> quantized {fmt(result.score)} "
                 f"(floor {fmt(result.floor)})")
    lines.append(f"  estimated latency on {result.target}: {result.latency_us:.1f} us; saving "
                 f"{result.saving_vs_16_bit:.1%} vs W16A16 ({result.sixteen_bit_us:.1f} us), "
                 f"{result.saving_vs_float:.1%} vs float ({result.float_us:.1f} us)")
    lines.append(f"  full-model evaluations: {result.evaluations} (the float reference included), "
                 f"{result.seconds:.1f} s")
    if result.levels:
        lines.append(f"  widths searched: {' -> '.join(result.levels)}")
    if result.sensitivity:
        sens = result.sensitivity
        measured = ", ".join(sens["widths"]) or "no width"
        lines.append(f"  sensitivity ({sens['signal']}) measured at {measured}: {sens['evaluations']} "
                     f"{sens['unit']}, {sens['seconds']:.1f} s")
    if result.message:
        lines.append(f"  note: {result.message}")
    return "\n".join(lines)


__all__ = ["RESULT", "SearchResult", "Trial", "chosen_plan", "format_result", "search_result"]
