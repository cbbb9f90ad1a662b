"""Plots people would rather look at than read; matplotlib, headless (Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from qinject import ir as qir
from qinject.cost import estimate
from qinject.latency_table import FLOAT_BITS, LatencyTable
from qinject.plan import NodeQuant, Plan

BIT_WIDTHS = ((FLOAT_BITS, FLOAT_BITS), (16, 16), (8, 8), (4, 8), (4, 4))


def node_latency_plot(model: ir.Model, table: LatencyTable, path: str | os.PathLike, batch: int = 1) -> Path:
    """Per quantizable node, its estimated latency at each bit width (one bar group per node),
    with the measured-or-roofline source marked: where the time goes on ``table``'s target."""
    names = [n.name for n in qir.quantizable_nodes(model)]
    series = {}
    for w, a in BIT_WIDTHS:
        plan = Plan(None) if w == FLOAT_BITS else Plan(NodeQuant(weights=w, activations=a))
        report = estimate(model, plan, table, batch=batch, baselines=False)
        costs = {c.node: c for c in report.nodes}
        series[(w, a)] = [costs[n] for n in names]
    title = f"{model.graph.name or 'model'} on {table.target} (batch {batch}; hatched: roofline)"
    bars = {("float" if w == FLOAT_BITS else f"W{w}A{a}"): [c.latency_us for c in costs]
            for (w, a), costs in series.items()}
    hatched = {("float" if w == FLOAT_BITS else f"W{w}A{a}"): [c.source != "measured" for c in costs]
               for (w, a), costs in series.items()}
    return grouped_bars(names, bars, "estimated latency (us)", title, path, hatched=hatched)


def sensitivity_plot(model: ir.Model, signal: str, path: str | os.PathLike) -> Path:
    """``signal`` per node: one bar group per node, one bar per bit width (symmetric log scale:
    damages span decades, and a loss can also fall)."""
    from qinject.sensitivity import signal_of

    values = signal_of(model, signal)
    names = [n.name for n in qir.quantizable_nodes(model) if n.name in values]
    bits = sorted({b for v in values.values() for b in v.score}, reverse=True)
    bars = {f"{b}-bit": [values[n].score.get(b, 0.0) for n in names] for b in bits}
    scores = [abs(v) for n in names for v in values[n].score.values() if v]
    return grouped_bars(names, bars, f"{signal} score",
                        f"{model.graph.name or 'model'}: {signal} sensitivity per node", path,
                        symlog=min(scores) if scores else 1e-12)


def grouped_bars(names: list[str], bars: dict[str, list[float]], ylabel: str, title: str,
                 path: str | os.PathLike, hatched: dict[str, list[bool]] | None = None,
                 symlog: float | None = None) -> Path:
    """One group of bars per name, one bar per series; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4.2))
    for k, (label, heights) in enumerate(bars.items()):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(names))]
        drawn = ax.bar(xs, heights, width, label=label)
        for bar, hatch in zip(drawn, (hatched or {}).get(label, [])):
            if hatch:
                bar.set_hatch("//")
    if symlog is not None:
        ax.set_yscale("symlog", linthresh=symlog)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_plot(result: object, path: str | os.PathLike) -> Path:
    """A search's measured frontier: metric vs estimated latency saving vs W16A16, every evaluated
    plan in grey, the Pareto front joined, the budget's floor dashed and the chosen plan ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
