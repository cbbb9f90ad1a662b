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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n.name for n in qir.quantizable_nodes(model)]
    series = {}
    for w, a in BIT_WIDTHS:
        plan = Plan(None) if w == FLOAT_BITS else Plan(NodeQuant(weights=w, activations=a))
        report = estimate(model, plan, table, batch=batch, baselines=False)
        costs = {c.node: c for c in report.nodes}
        series[(w, a)] = [costs[n] for n in names]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4.2))
    for k, ((w, a), costs) in enumerate(series.items()):
        label = "float" if w == FLOAT_BITS else f"W{w}A{a}"
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [c.latency_us for c in costs], width, label=label)
        for bar, cost in zip(bars, costs):
            if cost.source != "measured":
                bar.set_hatch("//")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("estimated latency (us)")
    ax.set_title(f"{model.graph.name or 'model'} on {table.target} (batch {batch}; hatched: roofline)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
