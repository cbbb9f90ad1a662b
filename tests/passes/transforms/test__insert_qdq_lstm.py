"""LSTM's dynamic mode (passes/transforms/_insert_qdq_lstm.py): onnxruntime's DynamicQuantizeLSTM in its
optimised graph, outputs near the float model, the JAX backend's simulation of the kernel against
onnxruntime on the quantized file, the forms that stay float with a note (static, layout=1, GRU), a
plan naming an LSTM dynamic, its cost (estimate, profiler), and the two real LSTM exports of the corpus.

onnxruntime runs on one thread in the comparisons with JAX: it then quantizes each step's hidden state
over the whole batch, as the JAX backend does (``qinject.backends.jax_ops_rnn``). Measured: JAX vs
onnxruntime differ by ~1e-7 (synthetic) and ~1e-8 (exports); quantized vs float cosine >= 0.99995."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import InsertQDQ

from models.realworld import exports_loader
from qinject import quantize_onnx
from qinject.backends import onnx_backend
from qinject.backends.jax_backend import to_jax
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import PlanError, UnsupportedModelError
from qinject.cost.estimate import estimate
from qinject.cost.latency_table import LatencyTable, Roofline, load_target
from qinject.frontends.onnx_frontend import load_onnx
from qinject.plan import NodeQuant, Plan
from qinject.runtime import measure, profiler

S, B, I, H = 7, 2, 12, 16
DYNAMIC = NodeQuant(mode="dynamic")


def _lstm(direction: str = "forward", peepholes: bool = False, states: bool = False, lengths: bool = False,
          layout: int = 0, op: str = "LSTM") -> onnx.ModelProto:
    """x[S, B, I] -> lstm: LSTM(W, R, B[, sequence_lens, initial_h/c, P]) -> y, y_h, y_c (GRU: 3 gates)."""
    dirs, gates = (2 if direction == "bidirectional" else 1), (3 if op == "GRU" else 4)
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((dirs, gates * H, I)) * 0.3, "R": rng.standard_normal((dirs, gates * H, H)) * 0.3,
             "B": rng.standard_normal((dirs, 2 * gates * H)) * 0.1}
    names = ["x", "W", "R", "B", "", "", "", ""]
    x_shape, state = ([B, S, I], [B, dirs, H]) if layout else ([S, B, I], [dirs, B, H])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if lengths:
        names[4] = "lengths"
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, [B]))
    if states:
        inits["h0"], names[5] = rng.standard_normal(state) * 0.5, "h0"
        if op == "LSTM":
            inits["c0"], names[6] = rng.standard_normal(state) * 0.5, "c0"
    if peepholes:
        inits["P"], names[7] = rng.standard_normal((dirs, 3 * H)) * 0.3, "P"
    while not names[-1]:
        names.pop()
    outs = ["y", "y_h", "y_c"][:3 if op == "LSTM" else 2]
    y_shape = [B, S, dirs, H] if layout else [S, dirs, B, H]
    node = helper.make_node(op, names, outs, name="lstm", hidden_size=H, direction=direction,
                            **({"layout": 1} if layout else {}))
    graph = helper.make_graph([node], "lstm", inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, y_shape if n == "y" else state)
                               for n in outs],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _feeds(lengths: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((S, B, I)).astype(np.float32)}
    if lengths:
        feeds["lengths"] = np.array([S, 4], np.int32)
    return feeds


def _ort(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the recurrent step quantizes the whole batch at once (module doc)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _jax(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    out = to_jax(load_onnx(onnx.load(str(model)) if isinstance(model, Path) else model))(*feeds.values())
    return [np.asarray(a) for a in (out if isinstance(out, tuple) else (out,))]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _dynamic_file(tmp_path: Path, model: onnx.ModelProto, plan: Plan = Plan(DYNAMIC)) -> Path:
    """The model rewritten by insert-qdq alone (a dynamic node needs no calibration statistics)."""
    ir_model = load_onnx(model)
    InsertQDQ(plan)(ir_model)
    out = tmp_path / "q.onnx"
    onnx_backend.save(ir_model, out)
    return out


@pytest.mark.parametrize("kw", [{}, {"direction": "reverse"},
                                {"direction": "bidirectional", "peepholes": True, "states": True}],
                         ids=["forward", "reverse", "bidirectional-peepholes-states"])
def test_dynamic_lstm_runs_dynamic_quantize_lstm(tmp_path, kw) -> None:
    model, feeds = _lstm(**kw), _feeds()
    out = tmp_path / "q.onnx"
    result = quantize_onnx(model, out, plan=Plan(DYNAMIC), calib=feeds, progress=False)
    onnx.checker.check_model(str(out))
    assert result.quantized == ["lstm"] and not result.notes.get("lstm")
    kernels = measure.fused_kernels(out)
    assert kernels["DynamicQuantizeLSTM"] == 1 and "LSTM" not in kernels, kernels
    stored = {i.name: i.data_type for i in onnx.load(str(out)).graph.initializer}
    assert "W" not in stored and "R" not in stored  # the float weights are gone, int8 codes stand for them
    assert sum(t == TensorProto.INT8 for t in stored.values()) >= 2
    floats, quantized = _ort(model, feeds), _ort(out, feeds)
    for f, q in zip(floats, quantized):
        assert _cosine(f, q) > 0.999
        assert not np.array_equal(f, q)  # it did run quantized
    for j, q in zip(_jax(out, feeds), quantized):
        np.testing.assert_allclose(j, q, atol=1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_lstm_sequence_lengths_and_scales(tmp_path, per_channel) -> None:
    model, feeds = _lstm("bidirectional", lengths=True), _feeds(lengths=True)
    out = _dynamic_file(tmp_path, model, Plan(NodeQuant(mode="dynamic", per_channel=per_channel)))
    scales = [i for i in onnx.load(str(out)).graph.initializer if i.name.endswith("_dynamic_scale")]
    assert [list(s.dims) for s in scales] == ([[2, 4 * H]] * 2 if per_channel else [[2]] * 2)
    quantized = _ort(out, feeds)
    assert np.all(quantized[0][4:, :, 1] == 0)  # the short sequence's outputs past its length
    for f, q in zip(_ort(model, feeds), quantized):
        assert _cosine(f, q) > 0.999
    for j, q in zip(_jax(out, feeds), quantized):
        np.testing.assert_allclose(j, q, atol=1e-5)


def test_jax_float_lstm_matches_onnxruntime() -> None:
    model, feeds = _lstm("bidirectional", peepholes=True, lengths=True, states=True), _feeds(lengths=True)
    for j, f in zip(_jax(model, feeds), _ort(model, feeds)):
        np.testing.assert_allclose(j, f, atol=1e-5)
    # onnxruntime runs no LSTM with layout=1: against the time-major model on transposed data
    time_major = _feeds()
    y, y_h, y_c = _jax(_lstm("bidirectional", layout=1), {"x": time_major["x"].swapaxes(0, 1)})
    ref = _ort(_lstm("bidirectional"), time_major)
    np.testing.assert_allclose(y, ref[0].transpose(2, 0, 1, 3), atol=1e-5)
    for j, f in zip((y_h, y_c), ref[1:]):
        np.testing.assert_allclose(j, f.swapaxes(0, 1), atol=1e-5)


def test_static_plan_and_layout_1_leave_lstm_float_with_a_note(tmp_path) -> None:
    model = load_onnx(_lstm())
    assert op_facts.modes(model.graph.node(0)) == ("dynamic",)
    InsertQDQ(Plan(NodeQuant()))(model)  # W8A8 static: LSTM has no static form
    node = model.graph.node(0)
    assert node.op_type == "LSTM" and "mode 'static' is not available for this LSTM" in node.meta[qir.QUANT_NOTES][-1]
    batch_first = load_onnx(_lstm(layout=1))
    InsertQDQ(Plan(DYNAMIC))(batch_first)
    node = batch_first.graph.node(0)
    assert node.op_type == "LSTM" and "layout=1" in node.meta[qir.QUANT_NOTES][-1]


def test_gru_has_no_dynamic_form(tmp_path) -> None:
    model = _lstm(op="GRU")
    with pytest.raises(UnsupportedModelError, match="nothing to quantize .GRU: onnxruntime has no integer kernel"):
        quantize_onnx(model, tmp_path / "q.onnx", plan=Plan(DYNAMIC), calib=_feeds(), progress=False)
    ir_model = load_onnx(model)
    InsertQDQ(Plan(DYNAMIC))(ir_model)  # beside other nodes: float, and its note says why
    node = ir_model.graph.node(0)
    assert node.op_type == "GRU" and "no integer kernel for GRU in any mode" in node.meta[qir.QUANT_NOTES][-1]
    with pytest.raises(PlanError, match=r"node 'lstm' \(GRU\) with mode 'dynamic', but it has no quantized form"):
        InsertQDQ(Plan(None, {"lstm": DYNAMIC}))(load_onnx(model))


def test_plan_file_with_a_dynamic_lstm_round_trips(tmp_path) -> None:
    path = tmp_path / "plan.json"
    Plan(None, {"lstm": DYNAMIC}).save(path)
    loaded = Plan.load(path)
    assert loaded.choice("lstm") == DYNAMIC and loaded.to_json() == path.read_text()
    out = _dynamic_file(tmp_path, _lstm(), loaded)
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["DynamicQuantizeLSTM"]


def test_estimate_prices_static_lstm_as_float_and_dynamic_as_int8() -> None:
    model, table = load_onnx(_lstm("bidirectional")), load_target("local-cpu")

    def lstm_cost(plan: Plan):
        return next(n for n in estimate(model, plan, table).nodes if n.node == "lstm")

    float_, static, dynamic = (lstm_cost(p) for p in (Plan(None), Plan(NodeQuant()), Plan(DYNAMIC)))
    assert static.label == "float" and static.latency_us == float_.latency_us
    assert dynamic.label == "8/8 dynamic" and dynamic.latency_us != float_.latency_us


@pytest.mark.parametrize("name", ["torch_lstm_torchscript", "torch_lstm_dynamo"])
def test_real_lstm_exports_run_dynamic(tmp_path, name) -> None:
    model, feeds = exports_loader.load(name), exports_loader.example_feeds(name, batch=2)
    out = tmp_path / "q.onnx"
    result = quantize_onnx(model, out, plan=Plan(DYNAMIC), calib=exports_loader.example_feeds(name, batch=8),
                           progress=False)
    lstms = [n.name for n in model.graph.node if n.op_type == "LSTM"]
    assert len(lstms) == 2 and set(lstms) <= set(result.quantized)  # dynamo's R: folded from Concat/Unsqueeze
    assert measure.fused_kernels(out)["DynamicQuantizeLSTM"] == 2
    (f,), (q,) = _ort(model, feeds)[:1], _ort(out, feeds)[:1]
    assert _cosine(f, q) > 0.999
    np.testing.assert_allclose(_jax(out, feeds)[0], q, atol=1e-5)


def test_profiler_times_lstm_float_and_dynamic_only() -> None:
    table = LatencyTable("test-cpu", "measured", Roofline({"fp32": 1e11}, 1e10, 1.0))
    run = profiler.run_profile(_lstm("bidirectional"), table, warmup=1, repeats=3, progress=False)
    assert not run.failed, run.failed
    modes = sorted((e.weight_bits, e.activation_bits, e.mode) for e in table.entries.values() if e.op == "LSTM")
    assert modes == [(8, 8, "dynamic"), (32, 32, "static")]  # no static widths: LSTM has no static form
    assert all(e.latency_us > 0 for e in table.entries.values())
