"""Plots people would rather look at than read; matplotlib, headless (Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.plan import NodeQuant, Plan
from qinject.cost.estimate import estimate
from qinject.cost.latency_table import FLOAT_BITS, LatencyTable
from qinject.passes.sensitivity.base import signal_of

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
    import matplotlib  # slow to import, and only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (lazily too: after the Agg backend is chosen)

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
