"""Mixed-precision search: what the search passes (``passes/search/*.py``) share.

A search picks a bit width per quantizable node from ``LEVELS`` (16, 8, 4; width b means
``choice_for(b)``: b-bit weights, max(b, 8)-bit activations, as the sensitivity signals measure)
minimising the plan's estimated latency on a target table while the metric stays within the
budget. Its inputs, gathered in a ``SearchSpace``:

- the calibrated float model, each node annotated by a sensitivity signal (``passes/sensitivity/*``);
- an ``Evaluator``: the metric on the evaluation data, each full-model evaluation counted (the float
  reference is one of them);
- the budget (``qinject.evaluation.Budget``) and the latency table.

Candidate plans come in sequences whose damage grows (a prefix of a sensitivity order lowered, or
ILP solutions for a shrinking sensitivity budget); ``last_passing`` finds the last one that meets
the budget with a bisection guided by the predicted damage (regula falsi between the bracket's
measured scores, a plain midpoint whenever a guess fails to halve the bracket). The plan a search
returns has always been evaluated and met the budget; if none does, the float plan is returned with
a message saying so.

Execution modes (``qinject.plan.MODES``): a width stands for the fastest mode the target prices for
that node at that width (8 bits: static or dynamic; 4 bits: static W4A8 or weight-only), chosen once
per node and width with every other node at the same width. Float is always a candidate: the chosen
plan is swept node by node, and a node whose float form the target prices faster goes float (one
more evaluation verifies the result), so a search never returns a plan its own estimate prices above
the float model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from qinject.passes.rounding.adaround import AdaRound
from qinject.passes.rounding.bias_correction import BiasCorrection
from qinject.passes.sensitivity import SIGNALS
from qinject.passes.search._widths import fastest_modes
from qinject.passes.sensitivity.base import EVALUATIONS, AnalysisData, choice_for, signal_of, width_label
from qinject.passes.target.fit_target import switch_where_faster

from qinject.core import ir as qir
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import MODES, STATIC, NodeQuant, Plan
from qinject.core.rules import describe_unmatched
from qinject.core.search_result import RESULT, SearchResult, Trial, format_result, search_result
from qinject.cost.estimate import estimate, priced_model
from qinject.cost.latency_table import LatencyTable, load_target
from qinject.runtime.evaluation import Budget, Executable, Metric, UserMetric, default_metric
from qinject.runtime.executor import Executor

LEVELS = (16, 8, 4)
Bits = dict[str, int]


class Evaluator:
    """The metric of model variants on the evaluation data; every full-model evaluation is counted.

    Built-in metrics score the first output, run by the ``Executor``'s worker pool; a user metric
    receives each variant as an ``Executable`` and runs it itself.
    """

    def __init__(self, model: ir.Model, data: AnalysisData, metric: Metric | None = None,
                 workers: int | None = None, method: str = "minmax", percentile: float = 99.99,
                 low_bit_weights: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 executor: str | None = None, progress: str | None = None) -> None:
        self.model, self.data = model, data
        self.executor = Executor(model, data.inputs, workers=workers, method=method, percentile=percentile,
                                 executor=executor, progress=progress)
        # node -> {initializer: array} its 4-bit choice uses instead (AdaRound, bias correction)
        self.low_bit_weights = dict(low_bit_weights or {})
        self.user_count = 0
        self._metric = metric
        self._float_score: float | None = None

    @property
    def count(self) -> int:
        return self.executor.count + self.user_count

    @property
    def metric(self) -> Metric:
        if self._metric is None:
            self._metric = default_metric(self.executor.reference(), self.data.labels)
        return self._metric

    def float_score(self) -> float:
        if self._float_score is None:
            self._float_score = self._score(self.model)
        return self._float_score

    def score(self, plan: Plan) -> float:
        return self._score(self.executor.quantized(plan, self.replacements(plan)))

    def replacements(self, plan: Plan) -> dict[str, np.ndarray]:
        """The initializers ``plan`` replaces: those of its nodes with at most 4-bit weights."""
        out: dict[str, np.ndarray] = {}
        for node, arrays in self.low_bit_weights.items():
            choice = plan.choice(node)
            if choice is not None and choice.weights <= 4 and choice.mode == STATIC:  # their grid
                out.update(arrays)
        return out

    def _score(self, variant: ir.Model) -> float:
        metric = self.metric
        if isinstance(metric, UserMetric):
            self.user_count += 1
            return metric(Executable(variant))
        reference = self.executor.reference()
        (outputs,) = [reference] if variant is self.model else self.executor.run([variant])
        return metric.score(outputs, reference)

    def close(self) -> None:
        self.executor.close()


class SearchSpace:
    """The nodes, their widths, the latency of any assignment on the target, the sensitivity of
    each node at each width, and budgeted evaluation (cached: a plan is never evaluated twice)."""

    def __init__(self, model: ir.Model, evaluator: Evaluator, budget: Budget, table: LatencyTable,
                 batch: int = 1, signal: str = "quant-error", levels: Sequence[int] = LEVELS,
                 latency_model: ir.Model | None = None, fixed: Mapping[str, NodeQuant | None] | None = None,
                 modes: Sequence[str] = MODES) -> None:
        self.model, self.evaluator, self.budget, self.table, self.batch = model, evaluator, budget, table, batch
        self.levels = tuple(sorted(levels, reverse=True))
        # Pinned nodes (rules): their choice (None: float) is given; the search chooses the rest.
        self.fixed = dict(fixed or {})
        unknown = sorted(set(modes) - set(MODES))
        if unknown or STATIC not in modes:
            raise QinjectError(f"search modes must include 'static' and be among {list(MODES)}, got {list(modes)}")
        self.modes = tuple(modes)
        self._choices: dict[int, dict[str, NodeQuant]] = {}  # width -> node -> its fastest mode's choice
        self.all_nodes = [n.name for n in qir.searchable_nodes(model)]
        self.nodes = [n for n in self.all_nodes if n not in self.fixed]
        if not self.nodes:
            raise QinjectError("the model has no quantizable node to search over (every one is pinned)"
                               if self.all_nodes else "the model has no quantizable node to search over")
        # Plans are priced on this graph: the model itself, or the same network at its deployment batch.
        self.priced = priced_model(latency_model if latency_model is not None else model, batch)
        if latency_model is not None and [n.name for n in qir.searchable_nodes(self.priced)] != self.all_nodes:
            raise QinjectError("the latency model's quantizable nodes differ from the model's")
        key = SIGNALS[signal].signal if signal in SIGNALS else signal
        values = signal_of(model, key)
        missing = [n for n in self.nodes if n not in values]
        if missing:
            raise QinjectError(f"no {signal!r} sensitivity on node(s) {missing[:3]}: run that sensitivity pass "
                               "before the search")
        unmeasured = [b for b in self.levels[1:] if any(b not in values[n].score for n in self.nodes)]
        if unmeasured:
            raise QinjectError(f"the {signal!r} sensitivity was not measured at width(s) {unmeasured}, which the "
                               "search lowers nodes to: run that sensitivity pass with those bits")
        self.signal = signal
        # the start level, unmeasured where the target prices it no faster than float (SearchWidths),
        # counts as no damage: every search takes its start plan to meet the budget
        self.scores = {n: {b: float(max(values[n].score.get(b, 0.0), 0.0)) for b in self.levels}
                       for n in self.nodes}
        self.trials: list[Trial] = []
        self._evaluated: dict[tuple, Trial] = {}
        self._latency: dict[tuple, float] = {}
        self.start = time.perf_counter()
        self.float_score = evaluator.float_score()
        self.floor = budget.floor(self.float_score, evaluator.metric)

    # -- assignments --------------------------------------------------------------------------------
    def uniform(self, bits: int) -> Bits:
        return dict.fromkeys(self.nodes, bits)

    def key(self, bits: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(bits[n] for n in self.nodes)

    def plan(self, bits: Mapping[str, int | None]) -> Plan:
        return Plan(None, {**self.fixed, **{n: None if b is None else self.choice(n, b) for n, b in bits.items()}})

    def choice(self, node: str, bits: int) -> NodeQuant:
        """What width ``bits`` means for ``node``: the fastest of its modes at that width."""
        if bits not in self._choices:
            self._choices[bits] = fastest_modes(self.priced, self.nodes, self.fixed, bits, self.modes, self.table,
                                                self.batch)
        return self._choices[bits].get(node) or choice_for(bits)

    def latency(self, bits: Mapping[str, int]) -> float:
        key = self.key(bits)
        if key not in self._latency:
            self._latency[key] = estimate(self.priced, self.plan(bits), self.table, self.batch,
                                          baselines=False).total_us
        return self._latency[key]

    def damage(self, bits: Mapping[str, int]) -> float:
        """The predicted damage of an assignment: the sum of its nodes' scores (additive)."""
        return sum(self.scores[n][b] for n, b in bits.items())

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, bits: Mapping[str, int], label: str) -> Trial:
        key = self.key(bits)
        if key not in self._evaluated:
            score = self.evaluator.score(self.plan(bits))
            trial = Trial(label, key, score, bool(score >= self.floor - 1e-12), self.latency(bits))
            self._evaluated[key] = trial
            self.trials.append(trial)
        return self._evaluated[key]

    def evaluated(self, bits: Mapping[str, int]) -> Trial | None:
        return self._evaluated.get(self.key(bits))

    def float_latency(self) -> float:
        return self.latency(dict.fromkeys(self.nodes))

    def without_slow_nodes(self, bits: Mapping[str, int | None]) -> dict[str, int | None]:
        """``bits`` with every node the target prices faster in float set float (two sweeps in graph
        order, each flip kept where it lowers the whole plan's estimate, conversions included)."""
        current = dict(bits)
        for _ in range(2):
            changed = False
            for node in self.nodes:
                if current[node] is None:
                    continue
                flipped = {**current, node: None}
                if self.latency(flipped) < self.latency(current):
                    current, changed = flipped, True
            if not changed:
                break
        return current

    def finish(self, algorithm: str, bits: Mapping[str, int], frontier: Sequence[Trial] = ()) -> SearchResult:
        """Verify ``bits`` by a real evaluation (unless already measured); if it breaks the budget,
        fall back to the fastest evaluated plan that met it, else to the float plan. Nodes the target
        prices faster in float then go float (verified by one more evaluation); a plan still priced
        above the float model is replaced by the float plan."""
        trial = self.evaluate(bits, "final")
        message = ""
        if not trial.passed:
            passing = [t for t in self.trials if t.passed]
            if passing:
                trial = min(passing, key=lambda t: t.latency_us)
                message = "the chosen plan broke the budget when verified; the fastest plan that met it is used"
            else:
                trial = None
        table_float = self.float_latency()
        if trial is not None:
            trial, note = self._float_where_faster(trial, table_float)
            message = "; ".join(m for m in (message, note) if m)
        sixteen = self.latency(self.uniform(16))
        metric = self.evaluator.metric
        if trial is None:
            best = min(self.trials, key=lambda t: -t.score)
            message = message or (f"no quantized plan meets the budget ({self.budget}: {metric.name} >= "
                                  f"{metric.format(self.floor)}); the best tried scored {metric.format(best.score)}; "
                                  "returning the float plan")
            chosen: dict[str, int | None] = dict.fromkeys(self.all_nodes)
            plan, score, latency = Plan(None), self.float_score, table_float
        else:
            free = dict(zip(self.nodes, trial.bits))
            chosen = {n: free[n] if n in free else _width(self.fixed[n]) for n in self.all_nodes}
            plan, score, latency = self.plan(free), trial.score, trial.latency_us
        return SearchResult(algorithm, plan, chosen, metric.name, str(self.budget), self.table.target,
                            self.float_score, self.floor, score, latency, table_float, sixteen,
                            self.evaluator.count, time.perf_counter() - self.start, list(self.trials), message,
                            list(frontier), self.evaluator.replacements(plan), list(self.nodes), metric.format)

    def _float_where_faster(self, trial: Trial, float_us: float) -> tuple[Trial | None, str]:
        """``trial`` with the nodes priced faster in float set float, and what was done (None: no
        quantized plan is priced below the float model)."""
        bits = dict(zip(self.nodes, trial.bits))
        pruned = self.without_slow_nodes(bits)
        if pruned != bits:
            floated = sum(1 for n in self.nodes if bits[n] is not None and pruned[n] is None)
            checked = self.evaluate(pruned, "float where faster")
            if checked.passed:
                trial = checked
                note = f"{floated} node(s) kept float: the target prices them faster in float"
            else:
                note = ""
        else:
            note = ""
        if trial.latency_us > float_us:
            return None, (f"no plan that meets the budget is estimated faster than the float model on "
                          f"{self.table.target} ({trial.latency_us:.1f} us vs {float_us:.1f} us); returning the float plan")
        return trial, note

    # -- orders -------------------------------------------------------------------------------------
    def lowering_order(self, current: Mapping[str, int], high: int, low: int) -> list[str]:
        """The nodes at ``high``, by sensitivity added per microsecond saved at ``low`` (least first);
        nodes whose lowering saves nothing come last, by sensitivity (lowering them can still pay
        once their neighbours are low, since conversions disappear). A node's saving is the mean of
        lowering it alone from ``current`` and of keeping it alone at ``high`` once every other node
        of the level is lowered: conversions make a node's saving depend on its neighbours' widths."""
        candidates = [n for n in self.nodes if current[n] == high]
        if not candidates:
            return []
        base = self.latency(current)
        all_low = {**current, **dict.fromkeys(candidates, low)}
        floor_latency = self.latency(all_low)
        ratio, rest = {}, {}
        for n in candidates:
            alone = base - self.latency({**current, n: low})
            kept = self.latency({**all_low, n: high}) - floor_latency
            saving = (alone + kept) / 2
            damage = max(self.scores[n][low] - self.scores[n][high], 0.0)
            if saving > 0:
                ratio[n] = damage / saving
            else:
                rest[n] = damage
        index = self.nodes.index
        return sorted(ratio, key=lambda n: (ratio[n], index(n))) + sorted(rest, key=lambda n: (rest[n], index(n)))


def _width(choice: NodeQuant | None) -> int | None:
    return None if choice is None else choice.weights


def last_passing(space: SearchSpace, candidates: Sequence[Mapping[str, int]], label: str,
                 guided: bool = True) -> int:
    """The index of the last candidate meeting the budget, in a sequence whose damage grows.

    ``candidates[0]`` is taken to pass (it is the plan already chosen);
    the last candidate is tried first (the whole sequence may pass), then the bracket is narrowed.
    ``guided`` places each probe where the predicted damage (``space.damage``) crosses the budget,
    interpolating between the bracket's measured scores; a probe that does not halve the bracket is
    followed by a plain midpoint, so the worst case stays about twice log2(len) evaluations.
    """
    n = len(candidates) - 1
    if n <= 0:
        return 0
    last = space.evaluate(candidates[n], f"{label} {n}/{n}")
    if last.passed:
        return n
    lo, hi = 0, n
    s_lo = t.score if (t := space.evaluated(candidates[0])) else space.float_score
    s_hi = last.score
    predicted = [space.damage(c) for c in candidates]
    midpoint_next = not guided
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if not midpoint_next and s_lo > s_hi:
            fraction = (s_lo - space.floor) / (s_lo - s_hi)
            target = predicted[lo] + fraction * (predicted[hi] - predicted[lo])
            inside = [k for k in range(lo + 1, hi) if predicted[k] <= target + 1e-15]
            mid = inside[-1] if inside else lo + 1
        width = hi - lo
        trial = space.evaluate(candidates[mid], f"{label} {mid}/{n}")
        if trial.passed:
            lo, s_lo = mid, trial.score
        else:
            hi, s_hi = mid, trial.score
        midpoint_next = not guided or (hi - lo) > width // 2
    return lo


class SearchPass(Pass):
    """Base of the search passes: an analysis pass that stores its ``SearchResult`` in the model's
    meta (``RESULT``), which ``InsertQDQ`` applies when given no plan.

    Args:
        eval_data: the evaluation inputs (``.npz``/dict/array; ``labels`` make the metric accuracy).
        max_drop: the budget (``Budget.parse``: "1%", "0.5pt", 0.005).
        target: the latency table the plan's latency is estimated on.
        metric: a ``Metric`` or a callable ``fn(Executable) -> float`` (default: from the data).
        signal: the sensitivity signal nodes are ranked by (its pass must have run).
        batch: the batch size of the latency estimate for a symbolic batch dimension.
        limit: at most this many evaluation samples.
        adaround, bias_correction: give every 4-bit node AdaRound-rounded weights / a corrected bias
            (computed once per node, on ``calib``), in the search's evaluations and in the result.
        latency_model: price plans on this graph instead (the same network, e.g. traced at the
            deployment batch; constants folded like the model's).
        rules: ``qinject.rules.Rules`` pinning the nodes they match (the search chooses the rest).
        floated: nodes kept float without searching them, or what decides them per model (a
            search's ``SearchWidths.floated``: no width pays for them on the target); rules win.
        modes: the execution modes a width may run in (``qinject.plan.MODES``; static always).
        executor: where the evaluations run: None or "process" (the local process pool), "ray" (a local
            Ray), "ray://HOST:PORT" (a Ray cluster); the results are the same.
        slow_kernels: nodes the rules pin float only for onnxruntime's slower integer kernel alone
            (depthwise convolutions). Beside integer neighbours they can pay on integers, which only a
            timing settles: where the target prices the chosen plan faster with some of them at 8
            bits, and that plan meets the budget too (one evaluation), it is stored for
            ``fit-measured`` to time against the chosen one (``qinject.core.ir.ALTERNATIVE_PLAN``).
    """

    analysis = True
    algorithm = "search"

    def __init__(self, eval_data: object, max_drop: str | float | Budget = "1%",
                 target: LatencyTable | str = "local-cpu", *, metric: Metric | object = None,
                 signal: str = "quant-error", batch: int = 1,
                 levels: Sequence[int] | Callable[[ir.Model], Sequence[int]] = LEVELS, workers: int | None = None, method: str = "minmax", percentile: float = 99.99,
                 limit: int | None = None, adaround: bool = False, bias_correction: bool = False,
                 calib: object = None, progress: bool = True, latency_model: ir.Model | None = None,
                 rules: object = None, modes: Sequence[str] = MODES, executor: str | None = None,
                 floated: Sequence[str] | Callable[[ir.Model], Sequence[str]] = (),
                 slow_kernels: Sequence[str] = ()) -> None:

        if (adaround or bias_correction) and calib is None:
            raise QinjectError("AdaRound and bias correction need calibration data (calib)")
        self.adaround, self.bias_correction, self.calib, self.progress = adaround, bias_correction, calib, progress
        self.latency_model, self.rules, self.modes = latency_model, rules, tuple(modes)
        self.floated = floated if callable(floated) else tuple(floated)
        self.slow_kernels = frozenset(slow_kernels)
        self.eval_data, self.budget = eval_data, Budget.parse(max_drop)
        self.table = target if isinstance(target, LatencyTable) else load_target(target)
        if metric is not None and not isinstance(metric, Metric):
            if not callable(metric):
                raise QinjectError(f"metric must be callable, got {type(metric).__name__}")
            metric = UserMetric(metric)
        self.metric, self.signal, self.batch = metric, signal, batch
        self.levels = levels if callable(levels) else tuple(levels)
        self.workers, self.method, self.percentile, self.limit = workers, method, percentile, limit
        self.executor = executor  # where evaluations run: None/"process", "ray", "ray://HOST:PORT"

    def call(self, model: ir.Model) -> PassResult:
        data = AnalysisData.load(self.eval_data, model, self.limit)
        levels = self.levels(model) if callable(self.levels) else self.levels
        low_bit = self.low_bit_weights(model) if min(levels) <= 4 else {}
        evaluator = Evaluator(model, data, self.metric, self.workers, self.method, self.percentile,
                              low_bit, executor=self.executor,
                              progress=f"search {self.algorithm}" if self.progress else None)
        try:
            floated = self.floated(model) if callable(self.floated) else self.floated
            fixed: dict[str, NodeQuant | None] = dict.fromkeys(floated)
            if self.rules is not None:
                pins, unmatched = self.rules.pins(model)
                fixed.update(pins)
                if unmatched:
                    warnings.warn(describe_unmatched(unmatched), stacklevel=2)
            space = SearchSpace(model, evaluator, self.budget, self.table, self.batch, self.signal, levels,
                                self.latency_model, fixed, self.modes)
            result = self.search(space)
            alternative = self._with_slow_kernels(space, result.plan)
            if alternative is not None:
                model.meta[qir.ALTERNATIVE_PLAN] = (alternative, {}, {}, self.slow_kernels)
            if floated:
                kept = (f"{len(floated)} node(s) kept float without a search: no width pays for them on "
                        f"{self.table.target}")
                result.message = "; ".join(m for m in (kept, result.message) if m)
            result.levels = [width_label(b) for b in space.levels]
            result.sensitivity = self._sensitivity(model, space)
            model.meta[RESULT] = result
        finally:
            evaluator.close()
        return PassResult(model, False)

    def search(self, space: SearchSpace) -> SearchResult:
        raise NotImplementedError

    def _with_slow_kernels(self, space: SearchSpace, plan: Plan) -> Plan | None:
        """``plan`` with its slow kernels at 8 bits where the target prices that faster (all at once,
        then one by one), if any is and the plan still meets the budget."""
        slow = [n for n in space.all_nodes if n in self.slow_kernels and plan.choice(n) is None]
        if not slow or all(plan.choice(n) is None for n in space.all_nodes):
            return None
        choices = {n: plan.choice(n) for n in space.all_nodes}

        def price(trial: dict[str, NodeQuant | None]) -> float:
            return estimate(space.priced, Plan(None, trial), space.table, space.batch, baselines=False).total_us

        chosen, _ = switch_where_faster(price, choices, dict.fromkeys(slow, (None, choice_for(8))))
        if chosen == choices:
            return None
        alternative = Plan(None, chosen)
        return alternative if space.evaluator.score(alternative) >= space.floor - 1e-12 else None

    @staticmethod
    def _sensitivity(model: ir.Model, space: SearchSpace) -> dict:
        """What the ranking signal cost, and the widths it measured (those every node has)."""
        key = SIGNALS[space.signal].signal if space.signal in SIGNALS else space.signal
        count, seconds = model.meta.get(EVALUATIONS, {}).get(key, (None, None))
        if count is None:
            return {}
        values = signal_of(model, key)
        widths = sorted(set.intersection(*(set(values[n].score) for n in space.nodes)), reverse=True)
        unit = SIGNALS[space.signal].cost_unit if space.signal in SIGNALS else "model evaluations"
        return {"signal": key.replace("_", " "), "evaluations": count, "unit": unit, "seconds": seconds,
                "widths": [width_label(b) for b in widths]}

    def low_bit_weights(self, model: ir.Model) -> dict[str, dict[str, np.ndarray]]:
        """Per node, the initializers AdaRound / bias correction give it at 4 bits (on a clone)."""
        if not (self.adaround or self.bias_correction):
            return {}

        clone, four = model.clone(), Plan(choice_for(4))
        if self.adaround:
            AdaRound(self.calib, four, progress=self.progress)(clone)
        if self.bias_correction:
            BiasCorrection(self.calib, four)(clone)
        out: dict[str, dict[str, np.ndarray]] = {}
        originals = {n.name: n for n in qir.quantizable_nodes(model)}
        for node in qir.quantizable_nodes(clone):
            for new, old in zip(node.inputs, originals[node.name].inputs):
                if new is not None and old is not None and new.const_value is not None and \
                        new.const_value is not old.const_value and old.name in model.graph.initializers:
                    out.setdefault(node.name, {})[old.name] = new.const_value.numpy()
        return out


__all__ = ["LEVELS", "RESULT", "Evaluator", "SearchPass", "SearchResult", "SearchSpace", "Trial",
           "format_result", "last_passing", "search_result"]
