"""Bisection search: the longest prefix of a sensitivity order that can be lowered, level by level."""

from __future__ import annotations

from qinject.passes.search.base import SearchPass, SearchSpace, last_passing

from qinject.core.search_result import SearchResult


class Bisection(SearchPass):
    """Lower nodes 16 → 8 → 4 bits in order of sensitivity per microsecond saved, keeping the
    longest prefix that meets the budget at each level (found by ``last_passing``: about log2(N)
    evaluations per level, fewer when the predicted damage tracks the metric), or the fastest
    shorter one.

    Each level starts from the previous level's plan; its candidates are that plan with the first
    k nodes of the level's order lowered (k = 0..N). The first level starts from uniform W16A16.

    Options (beyond ``SearchPass``'s):
        guided: place probes by the predicted damage (False: plain midpoints).
    """

    name = "search-bisection"
    algorithm = "bisection"

    def __init__(self, *args: object, guided: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.guided = guided

    def search(self, space: SearchSpace) -> SearchResult:
        current = space.uniform(space.levels[0])
        for high, low in zip(space.levels, space.levels[1:]):
            order = space.lowering_order(current, high, low)
            candidates = [{**current, **dict.fromkeys(order[:k], low)} for k in range(len(order) + 1)]
            k = last_passing(space, candidates, f"W{low} prefix", guided=self.guided)
            # Damage grows along the order but latency need not fall at every step (the last nodes
            # may save nothing alone): take the fastest prefix within the boundary.
            k = min(range(k + 1), key=lambda i: (space.latency(candidates[i]), -i))
            current = candidates[k]
            if k == 0:
                break  # nothing could go to this width: no node can go lower either
        return space.finish(self.algorithm, current)
