"""Pareto sweep: the accuracy-vs-latency frontier, every point measured."""

from __future__ import annotations

import os
from pathlib import Path

from qinject.passes.search.base import SearchSpace
from qinject.passes.search.ilp import Ilp

from qinject.core.errors import QinjectError
from qinject.core.search_result import SearchResult, Trial


class Pareto(Ilp):
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


def pareto_plot(result: SearchResult, path: str | os.PathLike) -> Path:
    """A search's measured frontier: metric vs estimated latency saving vs W16A16, every evaluated
    plan in grey, the Pareto front joined, the budget's floor dashed and the chosen plan ringed."""
    import matplotlib  # slow to import, and only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (lazily too: after the Agg backend is chosen)

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    saving = lambda t: 100 * (1 - t.latency_us / result.sixteen_bit_us)  # noqa: E731
    ax.scatter([saving(t) for t in result.trials], [t.score for t in result.trials], s=14, color="0.6",
               label="evaluated plans")
    front = sorted(result.frontier, key=saving)
    ax.plot([saving(t) for t in front], [t.score for t in front], "o-", color="C0", ms=4, label="Pareto front")
    ax.axhline(result.floor, color="C3", ls="--", lw=1, label=f"budget ({result.budget})")
    ax.scatter([100 * result.saving_vs_16_bit], [result.score], s=120, facecolors="none", edgecolors="C2",
               linewidths=2, label="chosen", zorder=3)
    ax.set_xlabel(f"estimated latency saving vs W16A16 (%), {result.target}")
    ax.set_ylabel(result.metric)
    ax.set_title(f"accuracy vs latency ({result.algorithm}, {result.evaluations} evaluations)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
