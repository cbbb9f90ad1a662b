"""Mixed-precision searches over the shared machinery in ``base`` (``SearchSpace``, ``Evaluator``,
``last_passing``, ``SearchPass``): ``bisection``, ``greedy``, ``ilp`` and the ``pareto`` sweep.
``SearchWidths`` (``_widths``) decides the widths a search on a target measures and searches.
``SEARCH_PASSES`` names them for the command line and the pipeline strings."""

from __future__ import annotations

from qinject.passes.search._widths import SearchWidths
from qinject.passes.search.bisection import Bisection
from qinject.passes.search.greedy import Greedy
from qinject.passes.search.ilp import Ilp
from qinject.passes.search.pareto import Pareto

# The searches by name (``search{algo=...}``, ``--search``): a search's name is its module's and its
# class's, and its pass's ``algorithm`` (tests/compiler/test_names.py).
SEARCH_PASSES = {cls.algorithm: cls for cls in (Bisection, Greedy, Ilp, Pareto)}
SEARCHES = tuple(SEARCH_PASSES)

__all__ = ["SEARCHES", "SEARCH_PASSES", "Bisection", "Greedy", "Ilp", "Pareto", "SearchWidths"]
