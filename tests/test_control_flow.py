"""Control flow: models with If, Loop and Scan subgraphs whose bodies hold quantizable MatMuls that
read outer-scope weights and values. Main graph and body nodes are quantized (calibration observes
body tensors through taps: qinject._subgraph_taps), Q/DQ sit inside the bodies, the output is
checker-valid, and onnxruntime runs it on integer kernels inside the bodies with outputs near float
(W8A8: output SQNR >= 25 dB; 27-40 dB measured, the Loop lowest: its state is requantized on each of
its 3 iterations). What cannot be calibrated (a branch that never ran; a Loop body tensor whose shape
changes per iteration) stays float, with a note saying why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qinject
from qinject.backends import onnx_backend
from qinject.core.calib_data import QinjectWarning
from qinject.core.numerics import sqnr_db
from qinject.plan import NodeQuant, Plan

rng = np.random.default_rng(0)
W = rng.standard_normal((8, 8)).astype(np.float32)
W2 = rng.standard_normal((8, 8)).astype(np.float32)

def _value(name, elem=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def _outer(name, nodes, inits=None, w2_scale=1.0, y_shape=(4, 8)):
    """x [4, 8] -> mm: h = x @ W -> ``nodes`` -> y, with initializers w, w2 (W2 scaled) and ``inits``."""
    arrays = {"w": W, "w2": W2 * np.float32(w2_scale), **(inits or {})}
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), *nodes], name,
                          [_value("x", shape=[4, 8])], [_value("y", shape=list(y_shape))],
                          [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _loop_body(state, shape, nodes):
    """A Loop body carrying ``state`` to ``{state}_out`` and passing its condition through."""
    return helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cid"), *nodes], "body",
                             [_value("i", TensorProto.INT64, []), _value("cond_in", TensorProto.BOOL, []),
                              _value(state, shape=shape)],
                             [_value("cond_out", TensorProto.BOOL, []), _value(f"{state}_out", shape=shape)])


def _trips(n):
    return {"trip": np.array(n, np.int64), "true": np.array(True)}


ZERO = {"zero": np.array(0, np.float32)}


def if_model(inner_input=False):
    # main: h = x @ W (quantizable) ; cond = ReduceSum(h) > 0 ; If: then y = h @ W2 (outer-scope W2, h) else y = Relu(h)
    # inner_input: then y = Sigmoid(h) @ W2, whose MatMul reads a tensor defined inside the branch
    mm_input = "t_sig" if inner_input else "h"
    then_nodes = [helper.make_node("Sigmoid", ["h"], ["t_sig"], name="then_sigmoid")] if inner_input else []
    then_g = helper.make_graph(then_nodes + [helper.make_node("MatMul", [mm_input, "w2"], ["t_out"], name="then_mm")],
                               "then", [], [_value("t_out")])
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["e_out"], name="else_relu")], "else", [],
                               [_value("e_out")])
    return _outer("if_model", [helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
                               helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                               helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                  ZERO)


def loop_model():
    # Loop 3 times: state = Relu(state @ W2)
    body = _loop_body("st", [4, 8], [helper.make_node("MatMul", ["st", "w2"], ["mm_out"], name="body_mm"),
                                     helper.make_node("Relu", ["mm_out"], ["st_out"], name="body_relu")])
    return _outer("loop_model", [helper.make_node("Loop", ["trip", "true", "h"], ["y"], name="loop", body=body)],
                  _trips(3), w2_scale=0.3)


def scan_model():
    # Scan over rows of h: out_row = row @ W2 (outer scope)
    body = helper.make_graph([helper.make_node("MatMul", ["row", "w2"], ["row_out"], name="scan_mm"),
                              helper.make_node("Add", ["acc", "row_out"], ["acc_out"], name="scan_add")], "scan_body",
                             [_value("acc", shape=[8]), _value("row", shape=[8])],
                             [_value("acc_out", shape=[8]), _value("row_out", shape=[8])])
    scan = helper.make_node("Scan", ["acc0", "h"], ["acc", "y"], name="scan", body=body, num_scan_inputs=1,
                            scan_output_axes=[0])  # explicit axes: a tap must extend them
    return _outer("scan_model", [scan], {"acc0": np.zeros(8, np.float32)})


def nested_model():
    # Loop 2 times: If (sum(state) > 0) then state = Relu(state @ W2) else state = -state
    then_g = helper.make_graph([helper.make_node("MatMul", ["st", "w2"], ["nt_mm"], name="nested_mm"),
                                helper.make_node("Relu", ["nt_mm"], ["nt_out"], name="nested_relu")],
                               "nested_then", [], [_value("nt_out")])
    else_g = helper.make_graph([helper.make_node("Neg", ["st"], ["ne_out"], name="nested_neg")], "nested_else", [],
                               [_value("ne_out")])
    body = _loop_body("st", [4, 8], [
        helper.make_node("ReduceSum", ["st"], ["s"], name="bsum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="bgt"),
        helper.make_node("If", ["c"], ["st_out"], name="inner_if", then_branch=then_g, else_branch=else_g)])
    return _outer("nested_model", [helper.make_node("Loop", ["trip", "true", "h"], ["y"], name="loop", body=body)],
                  {**_trips(2), **ZERO}, w2_scale=0.3)


def growing_loop_model():
    # Loop 3 times: acc = Concat(acc, acc @ W2 rows) grows by 4 rows per iteration, so the body's
    # MatMul input has a different shape at each iteration and cannot be stacked as a scan output.
    body = _loop_body("acc", None, [helper.make_node("MatMul", ["acc", "w2"], ["grown"], name="grow_mm"),
                                    helper.make_node("Slice", ["grown", "starts", "ends"], ["head"], name="head"),
                                    helper.make_node("Concat", ["acc", "head"], ["acc_out"], name="cat", axis=0)])
    return _outer("growing_loop",
                  [helper.make_node("Loop", ["trip", "true", "h"], ["acc_final"], name="loop", body=body),
                   helper.make_node("ReduceMean", ["acc_final"], ["y"], name="mean", axes=[0], keepdims=1)],
                  {**_trips(3), "starts": np.array([0], np.int64), "ends": np.array([4], np.int64)},
                  w2_scale=0.3, y_shape=(1, 8))


def _feeds(n=32):
    return [{"x": xi} for xi in np.random.default_rng(1).standard_normal((n, 4, 8)).astype(np.float32)]


def _body_ops(path):
    """op types inside every body of the saved model, by body name"""
    out = {}
    def visit(graph):
        for node in graph.node:
            for attr in node.attribute:
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    out[body.name] = [n.op_type for n in body.node]
                    visit(body)
    visit(onnx.load(str(path)).graph)
    return out


@pytest.mark.parametrize("make, inner, body", [(if_model, "then_mm", "then"), (lambda: if_model(True), "then_mm", "then"),
                                               (loop_model, "body_mm", "body"),
                                               (scan_model, "scan_mm", "scan_body"),
                                               (nested_model, "nested_mm", "nested_then")])
def test_control_flow_models_quantize_and_run(make, inner, body, tmp_path):
    model = make()
    onnx.checker.check_model(model, full_check=True)
    feeds = _feeds()
    float_session = onnx_backend.session(model)
    result = qinject.quantize_onnx(model, tmp_path / "q.onnx", calib=feeds, progress=False)
    assert result.quantized == ["mm", inner]
    (notes,) = [n for k, n in result.notes.items() if k in ("if", "loop", "scan")]
    assert notes == [f"1 quantizable node(s) inside its subgraph(s) quantized ({inner})"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    ops = _body_ops(tmp_path / "q.onnx")[body]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2  # activation pair, weight
    session = onnx_backend.session(tmp_path / "q.onnx")
    for feed in feeds[:6]:
        assert sqnr_db(float_session.run(None, feed)[0], session.run(None, feed)[0]) >= 25


def test_body_nodes_run_on_integer_kernels(tmp_path):
    qinject.quantize_onnx(loop_model(), tmp_path / "q.onnx", calib=_feeds(8), progress=False)
    optimized = tmp_path / "optimized.onnx"
    onnx_backend.session(tmp_path / "q.onnx", onnx_backend.session_options(optimized_path=str(optimized)))
    assert "MatMulIntegerToFloat" in _body_ops(optimized)["body"]


def test_plan_can_leave_a_body_node_float(tmp_path):
    plan = Plan(default=NodeQuant(), nodes={"then_mm": None})
    result = qinject.quantize_onnx(if_model(), tmp_path / "q.onnx", plan=plan, calib=_feeds(8), progress=False)
    assert result.quantized == ["mm"]
    assert result.notes["if"] == ["1 quantizable node(s) inside its subgraph(s) left float by the plan (then_mm)"]
    assert "QuantizeLinear" not in _body_ops(tmp_path / "q.onnx")["then"]


def test_branch_that_never_ran_stays_float_with_a_note(tmp_path):
    # Calibration inputs whose h sums negative: the then-branch never runs, so the MatMul input it
    # computes (Sigmoid(h)) has no range.
    feeds = [f for f in _feeds(64) if float(np.sum(f["x"] @ W)) <= 0][:8]
    result = qinject.quantize_onnx(if_model(True), tmp_path / "q.onnx", calib=feeds, progress=False)
    assert result.quantized == ["mm"]
    assert result.notes["if"] == ["1 quantizable node(s) inside its subgraph(s) left float (then_mm): "
                                  "no calibration statistics for their inputs"]
    assert result.notes["then_mm"][0].startswith("left float: no calibration statistics for t_sig")


def test_body_tensor_of_changing_shape_falls_back_to_float(tmp_path):
    model = growing_loop_model()
    float_session = onnx_backend.session(model)
    feeds = _feeds(8)
    with pytest.warns(QinjectWarning, match="cannot observe tensors inside control-flow bodies"):
        result = qinject.quantize_onnx(model, tmp_path / "q.onnx", calib=feeds, progress=False)
    assert result.quantized == ["mm"]
    assert result.notes["loop"] == ["1 quantizable node(s) inside its subgraph(s) left float (grow_mm): "
                                    "no calibration statistics for their inputs"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    session = onnx_backend.session(tmp_path / "q.onnx")
    assert sqnr_db(float_session.run(None, feeds[0])[0], session.run(None, feeds[0])[0]) >= 25


def test_inspect_lists_body_nodes_with_their_holder(tmp_path):
    from click.testing import CliRunner

    from qinject.cli import cli

    onnx.save(nested_model(), str(tmp_path / "m.onnx"))
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "nested_mm (in loop)" in r.output
    assert "2 quantizable node(s), 1 of them inside control-flow bodies" in r.output
