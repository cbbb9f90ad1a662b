"""Estimate the latency of the plan about to be applied, on a target's latency table.

An analysis: it runs on the float graph just before the Q/DQ rewrite (after constant and
BatchNormalization folding, so it prices the graph the rewrite sees) and stores the
``qinject.cost.CostReport`` in the model's ``meta``.
"""

from __future__ import annotations

import warnings

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.calib_data import QinjectWarning
from qinject.core.errors import UnsupportedModelError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import Plan
from qinject.core.search_result import chosen_plan
from qinject.cost.estimate import estimate
from qinject.cost.latency_table import LatencyTable, load_target


class EstimateCost(Pass):
    """Annotate the model with the estimated latency of ``plan`` on ``target``.

    Options:
        plan: the plan to price (None: the one a search pass chose).
        target: a latency table, or a target name or path (see ``qinject.latency_table.load_target``).
        batch: the size given to a symbolic batch dimension.
    """

    name = "estimate-cost"
    analysis = True

    def __init__(self, plan: Plan | None, target: LatencyTable | str, batch: int = 1) -> None:
        self.plan, self.batch = plan, batch
        self.table = target if isinstance(target, LatencyTable) else load_target(target)

    def call(self, model: ir.Model) -> PassResult:

        plan = chosen_plan(model, self.plan)
        try:
            model.meta[qir.COST_REPORT] = estimate(model, plan, self.table, self.batch)
        except UnsupportedModelError as exc:  # an estimate never stops a quantization
            warnings.warn(f"latency estimate skipped: {exc}", QinjectWarning, stacklevel=2)
        return PassResult(model, False)
