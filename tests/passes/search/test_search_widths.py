"""Which widths a search measures: only those that pay on its target (``passes/search/widths.py``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from qinject.passes.search.base import Evaluator, SearchSpace
from qinject.passes.search._widths import SearchWidths
from qinject.passes.sensitivity.base import AnalysisData

import qinject
from qinject.app.api import SearchOptions, load_onnx
from qinject.core.errors import QinjectError
from qinject.core.search_result import format_result
from qinject.core.pass_manager import PassManager
from qinject.passes.transforms import prepare
from qinject.runtime.evaluation import Budget
from tests.builders import CNN, attention_block, roofline_table

MODES = ("static", "dynamic", "weight-only")

# A target with no 16-bit or 4-bit arithmetic, as onnxruntime's CPU: those widths run as dequantize +
# float and cost the conversions on top, so only 8 bits can beat float.
ONLY_INT8 = roofline_table("only-int8", {"fp32": 1e11, "fp16": 9e10, "int8": 1e12, "int4": 1e11}, 1e15)


@pytest.fixture(scope="module")
def prepared():
    model = load_onnx(CNN / "model.onnx")
    PassManager(list(prepare())).run(model)
    return model


# A memory-bound target: at batch 1 the weights are most of the bytes moved, so each width pays.
EVERY_WIDTH = roofline_table("every-width", {"fp32": 1e15, "fp16": 2e15, "int8": 4e15, "int4": 8e15}, 1e9)


def test_every_width_is_measured_where_every_width_pays(prepared):
    widths = SearchWidths(EVERY_WIDTH, 1, MODES)
    assert widths.levels(prepared) == (16, 8, 4)
    assert widths.measured(prepared) == (16, 8, 4)  # fp16 beats float


def test_a_width_that_saves_under_one_percent_is_not_searched(prepared):
    """The A100 runs W4A8 on its int8 units: 4-bit weights only halve the weight bytes, which saves
    0.03 of 36.9 us on the digits CNN at batch 64, not worth a sensitivity evaluation per node."""
    widths = SearchWidths("nvidia-a100", 64, MODES)
    assert widths.levels(prepared) == (16, 8)
    assert widths.measured(prepared) == (16, 8)  # fp16 beats float on the A100


def test_widths_the_target_runs_no_faster_are_neither_measured_nor_searched(prepared):
    widths = SearchWidths(ONLY_INT8, 64, ("static",))
    assert widths.levels(prepared) == (16, 8)  # 4-bit weights save nothing over 8 here
    assert widths.measured(prepared) == (8,)  # and 16 bits nothing over float


def test_a_cpu_search_measures_sensitivity_once_per_node(tmp_path):
    """On the int8-only target the sensitivity costs one evaluation per node (8 bits alone, not
    16/8/4), the report says which widths were measured and searched, and the plan uses no other."""
    result = qinject.quantize_onnx(
        CNN / "model.onnx", tmp_path / "q.onnx", calib=CNN / "calib.npz", target=ONLY_INT8, latency_batch=64,
        search=SearchOptions(max_drop="2%", eval_data=CNN / "eval.npz", workers=1, limit=200, modes=("static",)),
        progress=False, measure=False)
    found = result.search
    nodes = len(found.bits)
    assert found.levels == ["W16A16", "W8A8"]
    assert found.sensitivity["widths"] == ["W8A8"] and found.sensitivity["evaluations"] == nodes + 1  # + reference
    assert set(found.width_counts()) <= {"W8A8", "float"} and "W8A8" in found.width_counts()
    assert found.score >= found.floor and found.score_format is not None
    assert "widths searched: W16A16 -> W8A8" in format_result(found)


def test_a_search_refuses_a_lower_width_the_signal_did_not_measure():
    model = qinject.analyze(CNN / "model.onnx", CNN / "calib.npz", ["quant-error"], bits=(16, 8), workers=1,
                            progress=False, limit=50)
    evaluator = Evaluator(model, AnalysisData.load(CNN / "eval.npz", model, limit=50), workers=1)
    try:
        with pytest.raises(QinjectError, match=r"not measured at width\(s\) \[4\]"):
            SearchSpace(model, evaluator, Budget.parse("1%"), ONLY_INT8, batch=64, levels=(16, 8, 4))
        SearchSpace(model, evaluator, Budget.parse("1%"), ONLY_INT8, batch=64, levels=(16, 8))
    finally:
        evaluator.close()


@pytest.mark.parametrize("signal, evaluations", [("quant-error", 4 + 1), ("interlayer", 4 + 1)])
def test_nodes_no_width_pays_for_are_kept_float_unmeasured_and_unsearched(tmp_path, signal, evaluations):
    """On the CPU table, attention's int8 MatMuls of two activations never beat float: the search
    keeps them float, the sensitivity pass spends no evaluation on them, and the report says so.
    The interlayer signal brings the Hessian it orders by (a search with it failed for want of it)
    and measures its prefix curve over the four projections alone."""
    path = tmp_path / "attention.onnx"
    onnx.save(attention_block(), path)
    rng = np.random.default_rng(1)
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((8, 128, 256)).astype(np.float32))
    model = load_onnx(path)
    PassManager(list(prepare())).run(model)
    widths = SearchWidths("local-cpu", 1, MODES)
    assert widths.floated(model) == ("scores", "context")
    result = qinject.quantize_onnx(
        path, tmp_path / "q.onnx", calib=tmp_path / "calib.npz", target="local-cpu",
        search=SearchOptions(max_drop="5%", eval_data=tmp_path / "eval.npz", workers=1, signal=signal),
        progress=False, measure=False)
    found = result.search
    assert found.bits["scores"] is None and found.bits["context"] is None
    assert found.sensitivity["evaluations"] == evaluations  # the four projections, and the reference
    assert "2 node(s) kept float without a search: no width pays for them on local-cpu" in found.message
