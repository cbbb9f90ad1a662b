"""Pareto sweep: the accuracy-vs-latency frontier, every point measured."""

from __future__ import annotations

from pathlib import Path

from qinject.errors import QinjectError
from qinject.passes.search_ilp import IlpSearch
from qinject.search import SearchResult, SearchSpace, Trial


class ParetoSweep(IlpSearch):
    """Evaluate the ILP frontier (W16A16 to the fastest plan, ``points`` sensitivity budgets) and
    keep the measured Pareto front: the plans no other plan beats on both metric and latency. The
    chosen plan is the fastest front point that meets the budget. It costs one evaluation per
    frontier plan (a table and, with ``plot``, a PNG show what each budget would buy).
    """

    name = "search-pareto"
    algorithm = "pareto"

    def __init__(self, *args: object, plot: str | Path | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.plot = Path(plot) if plot else None

    def search(self, space: SearchSpace) -> SearchResult:
        candidates = self.frontier(space)
        trials = [space.evaluate(c, f"frontier {i}/{len(candidates) - 1}") for i, c in enumerate(candidates)]
        front = pareto_front(trials)
        passing = [t for t in front if t.passed]
        chosen = min(passing, key=lambda t: t.latency_us) if passing else trials[0]
        result = space.finish(self.algorithm, dict(zip(space.nodes, chosen.bits)), frontier=front)
        if self.plot is not None:
            from qinject.plots import pareto_plot

            pareto_plot(result, self.plot)
        return result


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """The trials no other trial beats on both score (higher) and latency (lower), fastest first."""
    if not trials:
        raise QinjectError("no plan was evaluated")
    front = []
    for t in sorted(trials, key=lambda t: (t.latency_us, -t.score)):
        if not front or t.score > front[-1].score:
            front.append(t)
    return front


def format_front(result: SearchResult) -> str:
    lines = ["| latency (us) | saving vs W16A16 | " + result.metric + " | meets budget |", "|---|---|---|---|"]
    for t in result.frontier:
        lines.append(f"| {t.latency_us:.1f} | {1 - t.latency_us / result.sixteen_bit_us:.1%} | {t.score:.4f} "
                     f"| {'yes' if t.passed else 'no'} |")
    return "\n".join(lines)
