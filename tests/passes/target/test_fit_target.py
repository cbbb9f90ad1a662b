"""fit-target: a plain quantize keeps float the integer-kernel nodes its target prices faster in
float, and with auto mode runs each node in the mode the target prices fastest."""

from __future__ import annotations

import numpy as np
import pytest
from qinject.passes import FitTarget, FoldConstants

import qinject
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import QinjectError
from qinject.frontends.onnx_frontend import load_onnx
from qinject.latency_table import Entry, LatencyTable, Roofline
from qinject.plan import NodeQuant, Plan
from tests.builders import CNN, attention_block, matmul_net, residual_net

ROOF = Roofline({"fp32": 1e11, "int8": 4e11}, 1e10, op_overhead_us=1.0)


def _cnn_table(slow: str | None) -> LatencyTable:
    """A CPU table on which node ``slow`` runs 8-bit far slower than float (a grouped convolution's
    case on onnxruntime), the other nodes as the roofline says."""
    table = LatencyTable("test-cpu", "measured", ROOF)
    if slow is not None:
        model = qir.with_batch(qinject.load_onnx(CNN / "model.onnx"), 1)
        node = next(n for n in qir.quantizable_nodes(model) if n.name == slow)
        table.add(Entry(*op_facts.latency_key(node), 8, 8, 5000.0))
        table.add(Entry(*op_facts.latency_key(node), 32, 32, 5.0))
    return table


def test_a_node_priced_faster_in_float_stays_float_with_a_note(tmp_path):
    names = [n.name for n in qir.quantizable_nodes(qinject.load_onnx(CNN / "model.onnx"))]
    slow = names[1]
    table = _cnn_table(slow)
    result = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "q.onnx", calib=CNN / "calib.npz", target=table,
                                   progress=False)
    assert slow not in result.quantized and result.quantized  # neighbours may follow (conversions)
    for name in set(names) - set(result.quantized):
        assert any("prices it" in note and "faster in float" in note for note in result.notes[name])
    assert result.plan.choice(slow) is None
    assert result.cost.total_us <= result.cost.float_us
    forced = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "f.onnx", calib=CNN / "calib.npz", target=table,
                                   progress=False, force=True)
    assert set(forced.quantized) == set(names)
    named = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "n.onnx", calib=CNN / "calib.npz", target=table,
                                  progress=False, plan=Plan(NodeQuant(), {slow: NodeQuant()}))
    assert slow in named.quantized  # a node the plan names is applied as named


def test_widths_without_an_integer_kernel_are_kept_as_asked():
    """4-bit static weights run as dequantize + float on a CPU: asked for their size, they are kept."""
    table = _cnn_table(None)
    model = load_onnx(CNN / "model.onnx")
    FoldConstants()(model)
    model.meta[qir.INPUT_SHAPES] = {"input": (1, 1, 8, 8)}
    FitTarget(Plan.uniform(4, 8), table)(model)
    chosen = model.meta[qir.CHOSEN_PLAN]
    assert all(chosen.choice(n.name) is not None for n in qir.quantizable_nodes(model))


def test_auto_mode_picks_the_mode_the_table_prices_fastest():
    model = load_onnx(matmul_net())
    FoldConstants()(model)
    model.meta[qir.INPUT_SHAPES] = {"x": (64, 16)}
    priced = qir.with_batch(model, 64)
    mm1 = next(n for n in priced.graph if n.name == "mm1")
    table = LatencyTable("test-cpu", "measured", ROOF)
    key = op_facts.latency_key(mm1)
    table.add(Entry(*key, 8, 8, 50.0))
    table.add(Entry(*key, 8, 8, 1.0, "dynamic"))
    table.add(Entry(*key, 32, 32, 60.0))
    FitTarget(Plan(), table, batch=64, auto_mode=True)(model)
    chosen = model.meta[qir.CHOSEN_PLAN]
    assert chosen.choice("mm1").mode == "dynamic"
    assert any("runs W8A8 dynamic" in note for note in mm1_notes(model))
    table.entries.pop((*key, 8, 8, "dynamic"))
    again = load_onnx(matmul_net())
    FoldConstants()(again)
    again.meta[qir.INPUT_SHAPES] = {"x": (64, 16)}
    FitTarget(Plan(), table, batch=64, auto_mode=False)(again)
    assert again.meta[qir.CHOSEN_PLAN].choice("mm1").mode == "static"


def mm1_notes(model) -> list[str]:
    return next(n for n in model.graph if n.name == "mm1").meta.get(qir.QUANT_NOTES, [])


@pytest.mark.parametrize("text", ["fit-target{auto-mode=true},insert-qdq"])
def test_fit_target_runs_in_a_pipeline(text, tmp_path):
    from qinject.compiler.registry import Context, build

    passes = build("fold-constants,calibrate," + text, Context(calib=CNN / "calib.npz", target="local-cpu",
                                                               progress=False))
    assert [p.name for p in passes][-2:] == ["fit-target", "insert-qdq"]


def test_auto_mode_end_to_end_writes_what_onnxruntime_fuses(tmp_path):
    """A compute-bound CPU whose conversions are dear: both MatMuls switch to dynamic together (one at
    a time, each would pay a conversion to its static neighbour), and onnxruntime runs them as
    DynamicQuantizeMatMul; the notes reach the result."""
    import onnx
    import onnxruntime as ort

    table = LatencyTable("test-cpu", "measured", Roofline({"fp32": 1e9, "int8": 1e12}, 1e12, op_overhead_us=10.0))
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    out = tmp_path / "q.onnx"
    result = qinject.quantize_onnx(matmul_net(), out, calib={"x": x}, target=table, auto_mode=True, progress=False,
                                   latency_batch=64)
    assert {result.plan.choice(n).mode for n in ("mm1", "mm2")} == {"dynamic"}
    assert all(any("runs W8A8 dynamic" in note for note in result.notes[n]) for n in ("mm1", "mm2"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node].count("DynamicQuantizeMatMul") == 2


def test_modes_are_chosen_again_once_neighbours_went_float():
    """BERT's attention on the CPU table: with the context MatMul int8, the output projection reads
    integers and runs static; once the context goes float (two activations never pay), it quantizes
    its own input either way, and dynamic takes its bias Add into the kernel."""
    x = np.random.default_rng(1).standard_normal((4, 128, 768)).astype(np.float32)
    result = qinject.quantize_onnx(attention_block(768), calib={"x": x}, target="local-cpu", auto_mode=True,
                                   progress=False)
    assert result.plan.choice("scores") is None and result.plan.choice("context") is None
    assert {result.plan.choice(n).mode for n in ("q_proj", "k_proj", "v_proj", "o_proj")} == {"dynamic"}
    assert result.notes["o_proj"] == ["runs W8A8 dynamic: local-cpu prices the plan faster than with W8A8 here"]


def test_profile_measures_what_the_table_lacks_before_fitting_and_caches_it(tmp_path, monkeypatch):
    """``quantize --profile``: the node shapes the measured table lacks are timed on this machine before
    the plan is fitted (so the fit prices them from measurements) and saved to the profile cache, where
    the next run finds them; an analytic target is refused."""
    monkeypatch.setenv("QINJECT_TARGETS", str(tmp_path / "cache"))
    table = LatencyTable("test-cpu", "measured", ROOF)
    result = qinject.quantize_onnx(matmul_net(), tmp_path / "q.onnx", calib={"x": np.ones((4, 16), np.float32)},
                                   target=table, profile=True, progress=False, force=True)
    assert {e.mode for e in table} >= {"static", "dynamic", "weight-only"}
    priced = {c.node: c.source for c in result.cost.nodes if c.node in ("mm1", "mm2")}
    assert set(priced.values()) == {"measured"}
    cached = LatencyTable.load(tmp_path / "cache" / "test-cpu.json")
    assert set(cached.entries) == set(table.entries)
    with pytest.raises(QinjectError, match="spec-sheet"):
        qinject.quantize_onnx(matmul_net(), calib={"x": np.ones((4, 16), np.float32)}, target="nvidia-a100",
                              profile=True, progress=False)


def test_a_region_joined_on_the_integers_goes_float_at_once():
    """Every convolution of a residual net priced a little slower at 8 bits, conversions dear: none
    pays to go float alone (it adds a conversion at each end, its neighbours and the residual Adds
    stay integer), the whole region joined through the Adds does."""
    model = load_onnx(residual_net())
    model.meta[qir.INPUT_SHAPES] = {"x": (1, 4, 8, 8)}
    table = LatencyTable("test-cpu", "measured", ROOF)
    for node in qir.quantizable_nodes(qir.with_batch(model, 1)):
        table.add(Entry(*op_facts.latency_key(node), 8, 8, 11.0))
        table.add(Entry(*op_facts.latency_key(node), 32, 32, 10.0))
    for op, width in (("QuantizeLinear", 8), ("DequantizeLinear", 8)):
        for elements in (256, 512):
            table.add(Entry(op, f"x{elements}", 0, width, 20.0))
    FitTarget(Plan(), table, batch=1)(model)
    chosen = model.meta[qir.CHOSEN_PLAN]
    names = [n.name for n in qir.quantizable_nodes(model)]
    assert all(chosen.choice(name) is None for name in names), chosen
    notes = next(n for n in model.graph if n.name == "c3").meta[qir.QUANT_NOTES]
    assert any("node(s) joined to it on the integers" in note for note in notes), notes
