"""Mixed-precision search: budgets, bisection vs an exhaustive prefix scan, the ILP vs enumeration,
budgets nothing meets, and the final plan meeting the budget on the evaluation data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from qinject.passes.search.base import Evaluator, SearchSpace, last_passing
from qinject.passes.search.ilp import IlpProblem, LatencyModel, adjacent_pairs
from qinject.passes.search.pareto import pareto_front
from qinject.passes.sensitivity.base import AnalysisData

import qinject
from qinject.app.api import SearchOptions
from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.search_result import Trial
from qinject.latency_table import Entry, LatencyTable
from qinject.runtime.evaluation import Accuracy, Budget, BudgetError, Fidelity
from tests.builders import CNN, roofline_table

# A memory-bound target: time is bytes moved, so halving a node's weight bits always saves and the
# orders hold every node (W4A8 runs int8 arithmetic; the shipped tables leave small layers bound by
# their per-op overhead, where 4-bit weights save nothing).
MEMORY_BOUND = roofline_table("memory-bound", {"fp32": 1e18, "fp16": 1e18, "int8": 1e18, "int4": 1e18}, 1e9)


@pytest.fixture(scope="module")
def analysed():
    return qinject.analyze(CNN / "model.onnx", CNN / "calib.npz", ["quant-error"], workers=1, progress=False)


def _space(model, metric=None, budget="1%", table=MEMORY_BOUND) -> SearchSpace:
    data = AnalysisData.load(CNN / "eval.npz", model, limit=300)
    evaluator = Evaluator(model, data, metric, workers=1)
    return SearchSpace(model, evaluator, Budget.parse(budget), table, batch=64)


def test_budgets_parse_and_floor():
    fraction = Accuracy(np.zeros(1, np.int64))
    assert Budget.parse("1%").floor(0.9, fraction) == pytest.approx(0.891)
    assert Budget.parse("0.5pt").floor(0.9, fraction) == pytest.approx(0.895)
    assert Budget.parse(0.02).floor(0.9, fraction) == pytest.approx(0.88)
    assert Budget.parse("2e-2").floor(0.9, fraction) == pytest.approx(0.88)
    for bad in ("one percent", "-1%", "1%%", "", "1 pts"):
        with pytest.raises(BudgetError, match="accuracy budget"):
            Budget.parse(bad)


def test_bisection_finds_the_exhaustive_prefix_boundary(analysed):
    space = _space(analysed, Fidelity())
    start = space.uniform(8)
    order = space.lowering_order(start, 8, 4)
    assert sorted(order) == sorted(space.nodes)  # every node saves on this target
    prefixes = [{**start, **dict.fromkeys(order[:k], 4)} for k in range(len(order) + 1)]
    scores = [space.evaluator.score(space.plan(p)) for p in prefixes]
    # Put the budget between two prefixes, so the boundary is an inner prefix; the exhaustive scan's
    # answer is the last prefix before the first that breaks the budget.
    gaps = [k for k in range(1, len(scores) - 1) if scores[k] - scores[k + 1] > 1e-4]
    assert gaps, scores
    k_true = gaps[len(gaps) // 2]
    floor = (scores[k_true] + scores[k_true + 1]) / 2
    expected = next(k - 1 for k in range(1, len(scores)) if scores[k] < floor)
    for guided in (True, False):
        space = _space(analysed, Fidelity(), budget=space.float_score - floor)
        before = space.evaluator.count
        found = last_passing(space, prefixes, "test", guided=guided)
        assert found == expected, (guided, scores, floor)
        assert space.evaluator.count - before <= 2 * int(np.ceil(np.log2(len(prefixes)))) + 1


def test_ilp_is_optimal_by_enumeration(analysed):
    space = _space(analysed)
    pairs = adjacent_pairs(space.model)
    assert ("conv1", "conv2") in pairs and ("fc1", "fc2") in pairs
    model = LatencyModel.fit(space, pairs)
    ilp = IlpProblem(model, space.scores)
    assignments = [dict(zip(space.nodes, bits)) for bits in itertools.product(space.levels, repeat=len(space.nodes))]
    # The second-order model is exact on this chain: each conversion sits between two nodes.
    for bits in assignments[::17]:
        assert model(bits) == pytest.approx(space.latency(bits), rel=1e-9)
    damages = sorted({space.damage(b) for b in assignments})
    for bound in (damages[0], damages[len(damages) // 4], damages[len(damages) // 2], damages[-1]):
        best = min(model(b) for b in assignments if space.damage(b) <= bound + 1e-12)
        found = ilp.solve("latency", bound)
        assert space.damage(found) <= bound + 1e-9
        assert model(found) == pytest.approx(best, rel=1e-9)
    for limit in np.linspace(min(model(b) for b in assignments), model(space.uniform(16)), 4):
        best = min(space.damage(b) for b in assignments if model(b) <= limit + 1e-9)
        found = ilp.solve("sensitivity", float(limit))
        assert model(found) <= limit + 1e-6
        assert space.damage(found) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_a_budget_nothing_meets_returns_the_float_plan(tmp_path):
    def only_float(executable) -> float:  # any quantized variant scores 0
        return 0.0 if any(n.op_type == "QuantizeLinear" for n in executable.model.graph) else 1.0

    result = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "q.onnx", calib=CNN / "calib.npz", progress=False,
                                   search=SearchOptions(max_drop="0.5pt", metric=only_float, workers=1))
    assert result.search.message.startswith("no quantized plan meets the budget")
    assert result.plan.default is None and not result.plan.nodes and result.quantized == []
    assert all(bits is None for bits in result.search.bits.values())


@pytest.mark.parametrize("algorithm", ["bisection", "greedy", "ilp", "pareto"])
def test_the_written_plan_meets_the_budget(algorithm, tmp_path):
    out = tmp_path / "q.onnx"
    result = qinject.quantize_onnx(
        CNN / "model.onnx", out, calib=CNN / "calib.npz", target="nvidia-a100", latency_batch=256, progress=False,
        search=SearchOptions(max_drop="0.5pt", eval_data=CNN / "eval.npz", search=algorithm, workers=1,
                             pareto_plot=tmp_path / "front.png" if algorithm == "pareto" else None))
    found = result.search
    with np.load(CNN / "eval.npz") as data:
        logits = onnx_backend.session(out).run(None, {"input": data["input"]})[0]
        accuracy = float(np.mean(logits.argmax(1) == data["labels"]))
    assert accuracy == pytest.approx(found.score, abs=1e-12)  # the file is the plan that was measured
    assert accuracy >= found.floor and found.floor == pytest.approx(found.float_score - 0.005)
    assert found.latency_us <= found.sixteen_bit_us
    assert 2 <= found.evaluations <= (20 if algorithm in ("greedy", "pareto") else 8)
    assert found.trials[-1].passed or any(t.passed and t.bits == tuple(found.bits.values()) for t in found.trials)
    if algorithm == "pareto":
        assert (tmp_path / "front.png").stat().st_size > 10_000
        scores = [t.score for t in found.frontier]
        assert scores == sorted(scores)  # fastest first, each slower point strictly better


def test_pareto_front_drops_dominated_points():
    trials = [Trial("a", (4,), 0.90, True, 10.0), Trial("b", (8,), 0.95, True, 20.0),
              Trial("c", (8,), 0.93, True, 25.0), Trial("d", (16,), 0.99, True, 30.0)]
    assert [t.label for t in pareto_front(trials)] == ["a", "b", "d"]


@pytest.mark.parametrize("algorithm", ["bisection", "greedy", "ilp", "pareto"])
def test_no_search_returns_a_plan_its_estimate_prices_above_float(algorithm):
    """At batch 1 on an A100, every quantized plan of the digits CNN costs more in conversions than it
    saves (the ILP used to pick one 11% slower than float): each search returns a plan priced at or
    below float, here the float plan, and says why."""
    result = qinject.quantize_onnx(
        CNN / "model.onnx", calib=CNN / "calib.npz", target="nvidia-a100", latency_batch=1, progress=False,
        search=SearchOptions(max_drop="1%", eval_data=CNN / "eval.npz", search=algorithm, workers=1))
    found = result.search
    assert found.latency_us <= found.float_us
    assert "estimated faster than the float model" in found.message or found.latency_us < found.float_us


def test_a_search_keeps_float_the_nodes_the_target_prices_faster_in_float(analysed):
    """On a target whose table prices one layer's 8-bit form far above its float form, the float
    sweep keeps that layer float and the other layers quantized."""
    priced = qir.with_batch(analysed, 64)
    first = qir.quantizable_nodes(priced)[0]
    table = LatencyTable("slow-first-layer", "measured", MEMORY_BOUND.roofline)
    table.add(Entry(*op_facts.latency_key(first), 8, 8, 1e6))
    space = _space(analysed, table=table)
    everything = space.uniform(8)
    pruned = space.without_slow_nodes(everything)
    assert pruned[first.name] is None and all(pruned[n] == 8 for n in space.nodes if n != first.name)
    assert _space(analysed).without_slow_nodes(everything) == everything  # memory-bound: every node pays
