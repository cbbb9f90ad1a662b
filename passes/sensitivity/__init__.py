"""Sensitivity signals: one analysis pass per signal (``quant_error``, ``noise``, ``hessian``,
``interlayer``, ``bit_error``) over the shared machinery in ``base``; ``SIGNALS`` names them for the
pipelines and the command line, ``signal_pass`` builds one, ``report(model)`` gathers every signal present into one
JSON-able dict and ``format_table`` prints a signal per node and bit width.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from qinject.passes.sensitivity.base import (
    EVALUATIONS,
    FORMAT,
    VERSION,
    AnalysisData,
    NodeSignal,
    SensitivityPass,
    _json,
    alone,
    choice_for,
    ranking,
    signal_of,
    signals_present,
    width_label,
)
from qinject.passes.sensitivity.bit_error import BitError
from qinject.passes.sensitivity.hessian import Hessian
from qinject.passes.sensitivity.interlayer import Interlayer
from qinject.passes.sensitivity.noise import Noise
from qinject.passes.sensitivity.quant_error import QuantError

from qinject.core.errors import QinjectError

# The signals by name (``sensitivity{metric=...}``, ``--signal``, ``--metric``): a signal's name is its
# module's (``bit_error.py`` -> ``bit-error``) and its class's (``BitError``); its pass's ``signal`` is
# the key its values are stored under, the module's name again (tests/compiler/test_names.py).
SIGNALS: dict[str, type[SensitivityPass]] = {
    cls.signal.replace("_", "-"): cls for cls in (QuantError, Noise, Hessian, Interlayer, BitError)}


def signal_pass(metric: str, data: object, **options: object) -> SensitivityPass:
    """The analysis pass of the signal named ``metric`` (a key of ``SIGNALS``)."""

    if metric not in SIGNALS:
        raise QinjectError(f"unknown sensitivity metric {metric!r} (expected one of {', '.join(SIGNALS)})")
    return SIGNALS[metric](data, **options)


def report(model: ir.Model) -> dict:
    """Every signal present, per node, with the evaluations and seconds each took (JSON-able)."""
    costs = model.meta.get(EVALUATIONS, {})
    out: dict = {"format": FORMAT, "version": VERSION, "signals": {}}
    for signal in signals_present(model):
        nodes = {}
        for name, value in signal_of(model, signal).items():
            nodes[name] = {"score": {str(b): _json(v) for b, v in sorted(value.score.items())},
                           **({"details": _json(value.details)} if value.details else {})}
        evaluations, seconds = costs.get(signal, (None, None))
        out["signals"][signal] = {"evaluations": evaluations, "cost_unit": _cost_unit(signal), "seconds": seconds,
                                  "nodes": nodes}
    return out


def _cost_unit(signal: str) -> str:
    """What a signal's recorded count counts (its pass says: evaluations, or Hessian-vector products)."""

    for cls in SIGNALS.values():
        if cls.signal == signal:
            return cls.cost_unit
    return "model evaluations"


def format_table(model: ir.Model, signal: str) -> str:
    """One row per node: its score at each bit width, most sensitive (at the lowest width) first."""
    values = signal_of(model, signal)
    if not values:
        return f"no node has a {signal!r} signal"
    bits = sorted({b for v in values.values() for b in v.score}, reverse=True)
    lowest = min(bits)
    rows = sorted(values.items(), key=lambda kv: -kv[1].score.get(lowest, 0.0))
    width = max(len("node"), *(len(n) for n in values))
    lines = [f"{'node':<{width}}  " + "  ".join(f"{f'{b}-bit':>11}" for b in bits)]
    for name, value in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{value.score.get(b, math.nan):>11.4g}" for b in bits))
    evaluations, seconds = model.meta.get(EVALUATIONS, {}).get(signal, (None, None))
    if evaluations is not None:
        lines.append(f"{signal}: {evaluations} {_cost_unit(signal)}, {seconds:.1f} s")
    return "\n".join(lines)


__all__ = ["EVALUATIONS", "SIGNALS", "AnalysisData", "BitError", "Hessian", "Interlayer",
           "NodeSignal", "Noise", "QuantError", "SensitivityPass", "alone", "choice_for",
           "format_table", "ranking", "report", "signal_of", "signal_pass", "signals_present", "width_label"]
