"""Mixed-precision searches over the shared machinery in ``base`` (``SearchSpace``, ``Evaluator``,
``last_passing``, ``SearchPass``): ``bisection``, ``greedy``, ``ilp`` and the ``pareto`` sweep.
``SEARCH_PASSES`` names them for the command line and the pipeline strings."""

from __future__ import annotations

from qinject.passes.search.bisection import BisectionSearch
from qinject.passes.search.greedy import GreedySearch
from qinject.passes.search.ilp import IlpSearch
from qinject.passes.search.pareto import ParetoSweep

SEARCH_PASSES = {"bisection": BisectionSearch, "greedy": GreedySearch, "ilp": IlpSearch, "pareto": ParetoSweep}
SEARCHES = tuple(SEARCH_PASSES)

__all__ = ["SEARCHES", "SEARCH_PASSES", "BisectionSearch", "GreedySearch", "IlpSearch", "ParetoSweep"]
