"""Greedy search: walk the sensitivity order and lower each node whose lowering keeps the budget."""

from __future__ import annotations

from qinject.passes.search.base import SearchPass, SearchSpace

from qinject.core.search_result import SearchResult


class Greedy(SearchPass):
    """Lower nodes 16 → 8 → 4 bits one at a time, in order of sensitivity per microsecond saved,
    keeping each lowering that still meets the budget (one evaluation per node and level, after
    one for the whole level lowered at once, which settles the level when it passes and is faster).

    Unlike bisection it does not assume damage grows along the order: a sensitive node that fails
    is skipped and the walk goes on. A lowering that would make the plan slower is not tried.
    """

    name = "search-greedy"
    algorithm = "greedy"

    def search(self, space: SearchSpace) -> SearchResult:
        current = space.uniform(space.levels[0])
        for high, low in zip(space.levels, space.levels[1:]):
            order = space.lowering_order(current, high, low)
            if not order:
                continue
            whole = {**current, **dict.fromkeys(order, low)}
            if space.latency(whole) <= space.latency(current) and space.evaluate(whole, f"all W{low}").passed:
                current = whole
                continue
            for node in order:
                trial = {**current, node: low}
                if space.latency(trial) > space.latency(current):
                    continue  # slower alone (conversions): not worth an evaluation
                if space.evaluate(trial, f"{node} -> W{low}").passed:
                    current = trial
        return space.finish(self.algorithm, current)
