"""ILP search (HAWQ-V3 style): bits per node by ``scipy.optimize.milp`` over a latency model that
includes the conversions between precision regions."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qinject.passes.search.base import SearchPass, SearchSpace, last_passing

from qinject.core import ir as qir
from qinject.core.errors import QinjectError
from qinject.core.search_result import SearchResult

OBJECTIVES = ("latency", "sensitivity")


@dataclass
class LatencyModel:
    """A second-order model of a plan's estimated latency around uniform W16A16:
    ``base + Σ unary[n][b] + Σ pair[(u, v)][(a, b)]``.

    ``unary[n][b]`` is the change when only n is at b; ``pair`` the interaction of two *adjacent*
    nodes (one reads the other's output through non-quantizable ops, or both feed one join such as a
    residual Add or a Concat): mostly the Q/DQ conversions on the tensor between them, which vanish
    when both sides share a width. Fitted from ``cost.estimate`` (1 + N·L + P·L² estimates for N nodes,
    P pairs, L lower levels); exact when every conversion sits between two nodes.
    """

    nodes: list[str]
    levels: tuple[int, ...]
    base: float
    unary: dict[str, dict[int, float]]
    pair: dict[tuple[str, str], dict[tuple[int, int], float]]

    @classmethod
    def fit(cls, space: SearchSpace, pairs: Sequence[tuple[str, str]]) -> LatencyModel:
        top, lower = space.levels[0], space.levels[1:]
        start = space.uniform(top)
        base = space.latency(start)
        unary = {n: {top: 0.0, **{b: space.latency({**start, n: b}) - base for b in lower}} for n in space.nodes}
        pair = {}
        for u, v in pairs:
            pair[(u, v)] = {(a, b): space.latency({**start, u: a, v: b}) - base - unary[u][a] - unary[v][b]
                            for a in lower for b in lower}
        return cls(space.nodes, space.levels, base, unary, pair)

    def __call__(self, bits: Mapping[str, int]) -> float:
        total = self.base + sum(self.unary[n][bits[n]] for n in self.nodes)
        return total + sum(t.get((bits[u], bits[v]), 0.0) for (u, v), t in self.pair.items())


def adjacent_pairs(model: ir.Model) -> list[tuple[str, str]]:
    """Pairs of quantizable nodes whose widths meet on a tensor: one reaches the other through
    non-quantizable nodes, or both reach one join (a node with two or more data inputs)."""
    graph = qir.to_networkx(model.graph)
    quantizable = {n.name for n in qir.quantizable_nodes(model)}
    reached: dict[str, set[str]] = {}  # quantizable node -> what it reaches through non-quantizable nodes
    seen_by: dict[ir.Node, set[str]] = {}  # non-quantizable node -> quantizable nodes reaching it
    for node in qir.quantizable_nodes(model):
        stack, visited = list(graph.successors(node)), set()
        while stack:
            nxt = stack.pop()
            if nxt in visited:
                continue
            visited.add(nxt)
            if nxt.name in quantizable:
                reached.setdefault(node.name, set()).add(nxt.name)
                continue
            seen_by.setdefault(nxt, set()).add(node.name)
            stack.extend(graph.successors(nxt))
    pairs = {tuple(sorted((u, v))) for u, vs in reached.items() for v in vs if u != v}
    for join, sources in seen_by.items():
        if graph.in_degree(join) >= 2:
            pairs |= {tuple(sorted(p)) for p in itertools.combinations(sorted(sources), 2)}
    order = {n: i for i, n in enumerate(n.name for n in qir.quantizable_nodes(model))}
    return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))


class IlpProblem:
    """The 0/1 program: x[n, b] = 1 when node n runs at width b; y[(u, v), (a, b)] linearises
    x[u, a]·x[v, b] for each pair term of the latency model."""

    def __init__(self, model: LatencyModel, scores: Mapping[str, Mapping[int, float]],
                 tied: Sequence[tuple[str, str]] = ()) -> None:
        self.model, self.scores = model, scores
        self.x = {(n, b): i for i, (n, b) in enumerate(itertools.product(model.nodes, model.levels))}
        self.y = {}
        for (u, v), terms in model.pair.items():
            for ab, value in terms.items():
                if value != 0.0:
                    self.y[(u, v, *ab)] = len(self.x) + len(self.y)
        self.size = len(self.x) + len(self.y)
        self.latency = np.zeros(self.size)
        self.damage = np.zeros(self.size)
        for (n, b), i in self.x.items():
            self.latency[i] = model.unary[n][b]
            self.damage[i] = scores[n][b]
        for (u, v, a, b), i in self.y.items():
            self.latency[i] = model.pair[(u, v)][(a, b)]
        rows, lo, hi = [], [], []

        def row(entries: dict[int, float], low: float, high: float) -> None:
            r = np.zeros(self.size)
            for i, c in entries.items():
                r[i] += c
            rows.append(r)
            lo.append(low)
            hi.append(high)

        for n in model.nodes:  # one width per node
            row({self.x[(n, b)]: 1.0 for b in model.levels}, 1.0, 1.0)
        for (u, v, a, b), i in self.y.items():
            xu, xv = self.x[(u, a)], self.x[(v, b)]
            if self.latency[i] > 0:  # minimising pushes y down: y >= xu + xv - 1
                row({i: 1.0, xu: -1.0, xv: -1.0}, -1.0, np.inf)
            else:  # minimising pushes y up: y <= xu, y <= xv
                row({i: 1.0, xu: -1.0}, -np.inf, 0.0)
                row({i: 1.0, xv: -1.0}, -np.inf, 0.0)
        for u, v in tied:
            for b in model.levels:
                row({self.x[(u, b)]: 1.0, self.x[(v, b)]: -1.0}, 0.0, 0.0)
        self.rows, self.lo, self.hi = np.array(rows), np.array(lo), np.array(hi)

    def solve(self, objective: str, bound: float) -> dict[str, int] | None:
        """Minimise latency with summed sensitivity <= bound, or sensitivity with latency <= bound."""
        from scipy.optimize import (  # scipy is slow to import; only the ILP uses it
            Bounds,
            LinearConstraint,
            milp,
        )

        cost, limit = (self.latency, self.damage) if objective == "latency" else (self.damage, self.latency)
        cap = bound if objective == "latency" else bound - self.model.base
        constraints = LinearConstraint(np.vstack([self.rows, limit]), np.append(self.lo, -np.inf),
                                       np.append(self.hi, cap))
        # A tiny tie-break on the other objective picks, among equal optima, the better plan.
        tie = 1e-9 * (limit / max(np.abs(limit).max(), 1e-30))
        res = milp(cost + tie, constraints=constraints, integrality=np.ones(self.size), bounds=Bounds(0, 1))
        if res.status != 0 or res.x is None:
            return None
        return {n: b for (n, b), i in self.x.items() if res.x[i] > 0.5}


class Ilp(SearchPass):
    """Choose bits per node by integer programming over the latency model (``LatencyModel``:
    each node at each width plus the conversions between adjacent nodes of different widths) and
    the nodes' summed sensitivity.

    ``objective="latency"`` (default) minimises latency under a sensitivity budget;
    ``"sensitivity"`` minimises summed sensitivity under a latency budget (HAWQ-V3's form). Either
    way the budget is swept over ``points`` values, which gives a frontier of plans from W16A16 to
    the fastest; real evaluations then find the fastest frontier plan meeting the accuracy budget
    (``last_passing``). ``tie_residuals`` forces the nodes on the two sides of each join (a residual
    Add, a Concat) to one width; without it the ILP ties them itself where a conversion costs more
    than it saves.
    """

    name = "search-ilp"
    algorithm = "ilp"

    def __init__(self, *args: object, objective: str = "latency", points: int = 24, tie_residuals: bool = False,
                 guided: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if objective not in OBJECTIVES:
            raise QinjectError(f"ILP objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        if points < 2:
            raise QinjectError(f"ILP points must be at least 2, got {points}")
        self.objective, self.points, self.tie_residuals, self.guided = objective, points, tie_residuals, guided

    def frontier(self, space: SearchSpace) -> list[dict[str, int]]:
        """Distinct ILP solutions from W16A16 to the fastest, in order of growing summed sensitivity."""
        free = set(space.nodes)
        pairs = [(u, v) for u, v in adjacent_pairs(space.priced) if u in free and v in free]
        model = LatencyModel.fit(space, pairs)
        ilp = IlpProblem(model, space.scores, pairs if self.tie_residuals else ())
        top, bottom = space.uniform(space.levels[0]), space.uniform(space.levels[-1])
        if self.objective == "latency":
            most = space.damage(bottom) - space.damage(top)
            smallest = min((d for n in space.nodes for b, d in space.scores[n].items() if d > 0), default=most)
            bounds = [space.damage(top), *np.geomspace(max(smallest, 1e-30), max(most, 1e-30), self.points - 1)]
        else:
            fastest = ilp.solve("latency", np.inf) or bottom
            bounds = list(np.linspace(model(top), model(fastest), self.points))
        # The uniform plans join the frontier: the latency model is second-order, so the ILP can miss a
        # uniform plan that the real estimate prices better (conversions among three or more nodes).
        plans: list[dict[str, int]] = [space.uniform(b) for b in space.levels]
        for bound in bounds:
            solution = ilp.solve(self.objective, float(bound))
            if solution is not None and solution not in plans:
                plans.append(solution)
        plans.sort(key=lambda p: (space.damage(p), -space.latency(p)))
        # Keep only plans faster than every plan before them: a slower, more damaging one buys nothing.
        kept = [plans[0]]
        for plan in plans[1:]:
            if space.latency(plan) < space.latency(kept[-1]) - 1e-9:
                kept.append(plan)
        return kept

    def search(self, space: SearchSpace) -> SearchResult:
        candidates = self.frontier(space)
        k = last_passing(space, candidates, "ILP frontier", guided=self.guided)
        return space.finish(self.algorithm, candidates[k])
