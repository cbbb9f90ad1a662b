"""The report that proposes fixes: for every quantizable node of a quantized plan, its SQNR, its share
of the output error and of the latency on a target, and a ready-to-apply rule with its predicted
effect ("keep conv2 at 16 bits: +3.1 dB output SQNR, +0.012 ms on nvidia-a100").

How the predictions are made, without re-running the model per fix:

- *Error shares* come from one evaluation per node: the model with that node alone quantized as
  the plan says; its output error energy ``e_n`` (sum of squared differences from the float
  output). Quantization errors of different nodes are nearly uncorrelated, so the plan's output error
  is predicted as ``Σ e_n`` and a node's share is ``e_n / Σ e``.
- *A fix* changes one node's width. Its predicted output error is ``Σ e − e_n + e_n'``, with
  ``e_n'`` the node's error alone at the new width (one more evaluation per node, at the proposed
  width), so the predicted SQNR change is ``10·log10(Σ e / (Σ e − e_n + e_n'))``. Its latency
  change comes from the latency table (``cost.estimate``), no run at all.
- *Verification*: the plan itself, and the fixes of the ``verify`` nodes with the largest shares,
  are run for real; the report prints each prediction beside the measurement and the error in dB.

Proposals: a node with an above-average share of the error is raised one level (4 → 8, 8 → 16
bits); any other node whose lower width the target runs faster is lowered one level; a node already
at 16 bits with a large share is proposed to stay float; the rest are kept. ``to_markdown`` / ``to_html``
render the page with the latency (#4), sensitivity (#5) and, when given, search (#6) plots embedded.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qinject.app.plots import node_latency_plot, sensitivity_plot
from qinject.core import ir as qir
from qinject.core.numerics import sqnr_db
from qinject.core.plan import STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.core.rules import Rule
from qinject.cost.estimate import estimate, priced_model
from qinject.cost.latency_table import LatencyTable
from qinject.passes.sensitivity.base import signals_present
from qinject.runtime.executor import Executor

RAISE = {4: 8, 8: 16}
LOWER = {16: 8, 8: 4}


@dataclass
class NodeRow:
    node: str
    op: str
    choice: NodeQuant | None
    sqnr_db: float  # of the node's own output in the quantized model
    error_share: float
    latency_share: float
    rule: Rule | None
    action: str
    predicted_db: float  # output SQNR change if the rule is applied
    latency_ms: float  # latency change if the rule is applied
    measured_db: float | None = None


@dataclass
class FixReport:
    model_name: str
    target: str
    plan: Plan
    output_sqnr_db: float
    predicted_sqnr_db: float
    latency_ms: float
    rows: list[NodeRow]
    evaluations: int
    plots: dict[str, Path] = field(default_factory=dict)

    def verified(self) -> list[NodeRow]:
        return [r for r in self.rows if r.measured_db is not None]

    def prediction_errors(self) -> list[float]:
        return [abs(r.predicted_db - r.measured_db) for r in self.verified()]

    # -- rendering --------------------------------------------------------------------------------
    def to_markdown(self, image_dir: str | os.PathLike | None = None) -> str:
        lines = [f"# Quantization report: {self.model_name}", "",
                 f"- target: `{self.target}`; estimated latency of the plan: {self.latency_ms:.3f} ms",
                 f"- output SQNR of the plan vs float: measured {self.output_sqnr_db:.1f} dB, predicted from "
                 f"per-node errors {self.predicted_sqnr_db:.1f} dB",
                 f"- model evaluations: {self.evaluations}", "",
                 "| node | op | bits | node SQNR (dB) | share of output error | share of latency | proposal | "
                 "predicted effect |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            bits = "float" if r.choice is None else r.choice.label
            effect = f"{r.predicted_db:+.2f} dB, {r.latency_ms * 1e3:+.2f} us" if r.rule else ""
            lines.append(f"| {r.node} | {r.op} | {bits} | {_db(r.sqnr_db)} | {r.error_share:.1%} | "
                         f"{r.latency_share:.1%} | {r.action} | {effect} |")
        lines += ["", "## Ready-to-apply rules", "",
                  "Each line is a rule for `qinject quantize --rules` (put the ones you accept before the plan's "
                  "own rules: the first match wins).", "", "```json"]
        lines += [_rule_json(r.rule) + "," for r in self.rows if r.rule]
        lines += ["```", "", "## Predictions checked against real runs", ""]
        if self.verified():
            lines += ["| fix | predicted | measured | error |", "|---|---|---|---|"]
            lines += [f"| {r.action} | {r.predicted_db:+.2f} dB | {r.measured_db:+.2f} dB | "
                      f"{abs(r.predicted_db - r.measured_db):.2f} dB |" for r in self.verified()]
            errors = self.prediction_errors()
            lines += ["", f"Mean absolute prediction error {np.mean(errors):.2f} dB, largest {max(errors):.2f} dB "
                          f"(over {len(errors)} fixes)."]
        else:
            lines.append("No prediction was verified.")
        if self.plots:
            lines += ["", "## Plots", ""]
            for title, path in self.plots.items():
                ref = os.path.relpath(path, image_dir) if image_dir is not None else str(path)
                lines.append(f"![{title}]({Path(ref).as_posix()})")
                lines.append("")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained page: the Markdown's content, plots embedded as data URIs."""
        body = []
        in_code = False
        table: list[list[str]] = []

        def flush() -> None:
            if table:
                head, rows = table[0], [r for r in table[2:]]
                body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                            + "</table>")
                table.clear()

        for line in self.to_markdown().splitlines():
            if line.startswith("```"):
                flush()
                body.append("</pre>" if in_code else "<pre>")
                in_code = not in_code
            elif in_code:
                body.append(html.escape(line))
            elif line.startswith("|"):
                table.append([c.strip() for c in line.strip("|").split("|")])
            else:
                flush()
                if line.startswith("# "):
                    body.append(f"<h1>{html.escape(line[2:])}</h1>")
                elif line.startswith("## "):
                    body.append(f"<h2>{html.escape(line[3:])}</h2>")
                elif line.startswith("!["):
                    title, path = re.match(r"!\[(.*)\]\((.*)\)", line).groups()
                    data = base64.b64encode(Path(path).read_bytes()).decode()
                    body.append(f'<p><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></p>')
                elif line.startswith("- "):
                    body.append(f"<p>{html.escape(line[2:])}</p>")
                elif line:
                    body.append(f"<p>{html.escape(line)}</p>")
        flush()
        style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}pre{background:#f6f6f6;padding:6px}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.model_name)}</title>"
                f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.html`` (self-contained) or ``.md`` (plots as PNG files beside it)."""
        path = Path(path)
        text = self.to_html() if path.suffix.lower() in (".html", ".htm") else self.to_markdown(path.parent)
        path.write_text(text)
        return path


def build_report(model: ir.Model, plan: Plan, table: LatencyTable, inputs: dict[str, np.ndarray], *,
                 batch: int = 1, verify: int = 3, workers: int | None = None,
                 plot_dir: str | os.PathLike | None = None) -> FixReport:
    """The report for ``plan`` on the calibrated float ``model`` (``qinject.analyze`` prepares one).

    Args:
        inputs: the data the errors are measured on (by input name).
        verify: how many fixes (largest error shares first) to run for real.
        plot_dir: where to write the latency and sensitivity plots (None: no plots).
    """
    nodes = qir.quantizable_nodes(model)
    choices = {n.name: plan.choice(n.name) for n in nodes}
    priced = priced_model(model, batch)
    current = estimate(priced, plan, table, batch, baselines=False)
    node_us = {c.node: c.latency_us for c in current.nodes}

    proposals: dict[str, tuple[NodeQuant | None, str]] = {}
    with Executor(model, inputs, workers=workers) as ex:
        reference = ex.reference().astype(np.float64)
        quantized = [n for n in nodes if choices[n.name] is not None]
        alone = dict(zip([n.name for n in quantized],
                         ex.run(ex.quantized(Plan(None, {n.name: choices[n.name]})) for n in quantized)))
        energy = {n: _energy(reference, out) for n, out in alone.items()}
        total = sum(energy.values()) or 1e-30
        mean_share = 1.0 / max(len(energy), 1)
        for node in nodes:
            choice = choices[node.name]
            if choice is None:
                continue
            share = energy[node.name] / total
            if share > mean_share and choice.weights in RAISE:
                wider = RAISE[choice.weights]
                proposals[node.name] = (_at(choice, wider), f"keep {node.name} at {wider} bits")
            elif choice.weights in LOWER and share <= mean_share:
                narrower = _at(choice, LOWER[choice.weights])
                saved = estimate(priced, _with(plan, node.name, narrower), table, batch, baselines=False).total_us
                if saved < current.total_us:  # lowering only pays where the target runs it faster
                    proposals[node.name] = (narrower, f"lower {node.name} to {narrower.weights} bits")
            elif choice.weights == 16 and share > mean_share:
                proposals[node.name] = (None, f"keep {node.name} in float")
        changed = [n for n, (c, _) in proposals.items() if c is not None]
        alternative = dict(zip(changed, ex.run(ex.quantized(Plan(None, {n: proposals[n][0]})) for n in changed)))
        (full,) = ex.run([ex.quantized(plan)])
        full_energy = _energy(reference, full)
        signal = float(np.sum(reference**2))

        rows = []
        for node in nodes:
            choice = choices[node.name]
            share = energy.get(node.name, 0.0) / total
            rule, action, predicted_db, latency_ms = None, "keep", 0.0, 0.0
            if node.name in proposals:
                new, action = proposals[node.name]
                e_new = _energy(reference, alternative[node.name]) if new is not None else 0.0
                after = max(total - energy[node.name] + e_new, 1e-30)
                predicted_db = 10 * math.log10(total / after)
                fixed_plan = _with(plan, node.name, new)
                latency_ms = (estimate(priced, fixed_plan, table, batch, baselines=False).total_us
                              - current.total_us) / 1e3
                rule = Rule(name=re.escape(node.name), skip=new is None,
                            weights=None if new is None else new.weights,
                            activations=None if new is None else new.activations,
                            mode=None if new is None or new.mode == STATIC else new.mode,
                            block_size=new.block_size if new is not None and new.mode == WEIGHT_ONLY else None,
                            comment=f"{action}: {predicted_db:+.2f} dB output SQNR, {latency_ms:+.4f} ms on "
                                    f"{table.target} (predicted)")
            rows.append(NodeRow(node.name, node.op_type, choice, _node_sqnr(model, ex, plan, node), share,
                                node_us.get(node.name, 0.0) / current.total_us, rule, action, predicted_db,
                                latency_ms))
        order = sorted((r for r in rows if r.rule is not None), key=lambda r: -r.error_share)[:verify]
        measured = ex.run(ex.quantized(_with(plan, r.node, proposals[r.node][0])) for r in order)
        for r, out in zip(order, measured):
            r.measured_db = 10 * math.log10(max(full_energy, 1e-30) / max(_energy(reference, out), 1e-30))
        evaluations = ex.count
    report = FixReport(model.graph.name or "model", table.target, plan,
                       10 * math.log10(signal / max(full_energy, 1e-30)),
                       10 * math.log10(signal / total), current.total_us / 1e3, rows, evaluations)
    if plot_dir is not None:

        plot_dir = Path(plot_dir)
        plot_dir.mkdir(parents=True, exist_ok=True)
        report.plots["latency per node and bit width"] = node_latency_plot(priced, table, plot_dir / "latency.png",
                                                                           batch)
        for signal in signals_present(model):
            report.plots[f"{signal} sensitivity"] = sensitivity_plot(model, signal, plot_dir / f"{signal}.png")
    return report


def _energy(reference: np.ndarray, outputs: np.ndarray) -> float:
    return float(np.sum((reference - np.asarray(outputs, dtype=np.float64)) ** 2))


def _at(choice: NodeQuant, bits: int) -> NodeQuant:
    """``choice`` at ``bits``-bit weights, in its mode where the mode has that width (weight-only: 4
    and 8 bits), else static."""
    if choice.mode == WEIGHT_ONLY and bits in (4, 8):
        return dataclasses.replace(choice, weights=bits)
    return NodeQuant(weights=bits, activations=max(bits, choice.activations if bits < 16 else 16),
                     per_channel=choice.per_channel)


def _with(plan: Plan, node: str, choice: NodeQuant | None) -> Plan:
    return Plan(plan.default, {**plan.nodes, node: choice})


def _node_sqnr(model: ir.Model, ex: Executor, plan: Plan, node: ir.Node) -> float:
    """SQNR of the node's own output in the quantized model vs the float model (one run of each
    with that tensor as the graph's output)."""

    variants = []
    for quantize in (False, True):
        variant = ex.quantized(plan) if quantize else model.clone()
        target = next(n for n in variant.graph if n.name == node.name).outputs[0]
        variant.graph.outputs.clear()
        variant.graph.outputs.append(target)
        variants.append(variant)
    ref, out = ex.run(variants)
    return sqnr_db(ref, out)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _rule_json(rule: Rule) -> str:

    return json.dumps(rule.to_dict())
