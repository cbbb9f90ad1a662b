"""Control flow: models with If, Loop and Scan subgraphs whose bodies hold quantizable MatMuls that
read outer-scope weights and values. The main graph is quantized, the subgraph nodes are left float
with a note on the control-flow node, the output is checker-valid, and onnxruntime runs it with
outputs near float (W8A8: output SQNR >= 30 dB, 35-46 dB measured)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qinject
from qinject.backends import onnx_backend
from qinject.numerics import sqnr_db

rng = np.random.default_rng(0)
W = rng.standard_normal((8, 8)).astype(np.float32)
W2 = rng.standard_normal((8, 8)).astype(np.float32)

def body_graph(name, inputs, outputs, nodes, inits=()):
    return helper.make_graph(nodes, name, inputs, outputs, list(inits))

def if_model():
    # main: h = x @ W (quantizable) ; cond = ReduceSum(h) > 0 ; If: then y = h @ W2 (outer-scope W2, h) else y = Relu(h)
    then_g = body_graph("then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
                        [helper.make_node("MatMul", ["h", "w2"], ["t_out"], name="then_mm")])
    else_g = body_graph("else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
                        [helper.make_node("Relu", ["h"], ["e_out"], name="else_relu")])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [numpy_helper.from_array(W, "w"), numpy_helper.from_array(W2, "w2"),
                           numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

def loop_model():
    # Loop 3 times: state = Relu(state @ W2)
    body = body_graph("body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("st", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("st_out", TensorProto.FLOAT, [4, 8])],
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cid"),
         helper.make_node("MatMul", ["st", "w2"], ["mm_out"], name="body_mm"),
         helper.make_node("Relu", ["mm_out"], ["st_out"], name="body_relu")])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Loop", ["trip", "true", "h"], ["y"], name="loop", body=body)]
    g = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [numpy_helper.from_array(W, "w"), numpy_helper.from_array(W2 * 0.3, "w2"),
                           numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(True), "true")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

def scan_model():
    # Scan over rows of h: out_row = row @ W2 (outer scope)
    body = body_graph("scan_body",
        [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [8]), helper.make_tensor_value_info("row", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [8]), helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [8])],
        [helper.make_node("MatMul", ["row", "w2"], ["row_out"], name="scan_mm"),
         helper.make_node("Add", ["acc", "row_out"], ["acc_out"], name="scan_add")])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Scan", ["acc0", "h"], ["acc", "y"], name="scan", body=body, num_scan_inputs=1)]
    g = helper.make_graph(nodes, "scan_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [numpy_helper.from_array(W, "w"), numpy_helper.from_array(W2, "w2"),
                           numpy_helper.from_array(np.zeros(8, np.float32), "acc0")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])



@pytest.mark.parametrize("make, inner", [(if_model, "then_mm"), (loop_model, "body_mm"), (scan_model, "scan_mm")])
def test_control_flow_models_quantize_and_run(make, inner, tmp_path):
    model = make()
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).standard_normal((32, 4, 8)).astype(np.float32)
    feeds = [{"x": xi} for xi in x]
    float_session = onnx_backend.session(model)
    result = qinject.quantize_onnx(model, tmp_path / "q.onnx", calib=feeds, progress=False)
    assert result.quantized == ["mm"]
    (notes,) = [n for k, n in result.notes.items() if k in ("if", "loop", "scan")]
    assert notes == [f"1 quantizable node(s) inside its subgraph(s) left float ({inner}): qinject quantizes the main graph"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    session = onnx_backend.session(tmp_path / "q.onnx")
    for feed in feeds[:6]:
        assert sqnr_db(float_session.run(None, feed)[0], session.run(None, feed)[0]) >= 30
