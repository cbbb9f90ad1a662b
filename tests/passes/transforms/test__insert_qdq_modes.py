"""The dynamic and weight-only forms of the Q/DQ rewrite (passes/_insert_qdq_modes.py): the kernels
onnxruntime fuses them into (its optimised graph, ORT_ENABLE_ALL), outputs near the float model, the
file shrinking, mixed plans, forms that stay float with a note, and control-flow bodies.

SQNR floors are set about 4 dB under what was measured (dynamic 37 dB, W8 weight-only 39 dB, W4
block 32 16 dB, static W8A8 37 dB): a wrong scale (per block, per column, alpha/beta) costs far more."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import Calibrate, InsertQDQ, UpgradeOpset

from qinject import quantize_onnx
from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core.numerics import sqnr_db
from qinject.core.pass_manager import PassManager
from qinject.frontends.onnx_frontend import load_onnx
from qinject.plan import NodeQuant, Plan
from qinject.runtime import measure
from qinject.runtime.executor import Executor
from tests.builders import conv_net, run

K, H, N = 64, 48, 10  # H = 48 is not a multiple of the default block (32): a partial last block
DYNAMIC = NodeQuant(mode="dynamic")
W4 = NodeQuant(mode="weight-only", weights=4)
W8 = NodeQuant(mode="weight-only", weights=8)


def _mlp(gemm: dict | None = None, bias: bool = True) -> onnx.ModelProto:
    """x[N,64] -> fc1: Gemm(w1, b1; transB=1, alpha=0.5, beta=2 unless ``gemm``) -> Relu -> mm2: MatMul(w2)
    -> Relu -> mm3: MatMul(w3) -> y[N,10]."""
    rng = np.random.default_rng(1)
    attrs = gemm if gemm is not None else {"transB": 1, "alpha": 0.5, "beta": 2.0}
    w1 = (rng.standard_normal((K, H)) * 0.2).astype(np.float32)
    inits = {"w1": w1.T if attrs.get("transB") else w1, "b1": (rng.standard_normal(H) * 0.1).astype(np.float32),
             "w2": (rng.standard_normal((H, H)) * 0.2).astype(np.float32),
             "w3": (rng.standard_normal((H, N)) * 0.2).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"] if bias else ["x", "w1"], ["h1"], name="fc1", **attrs),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", N])],
                              [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture
def x(rng):
    return {"x": rng.standard_normal((256, K)).astype(np.float32)}


def _quantize(tmp_path: Path, model: onnx.ModelProto, plan: Plan, calib: dict):
    out = tmp_path / "q.onnx"
    result = quantize_onnx(model, out, plan=plan, calib=calib, progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    return result, out


def _sqnr(model: onnx.ModelProto, out: Path, feeds: dict) -> float:
    return sqnr_db(run(model, feeds)[0], run(out, feeds)[0])


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_fuses_every_matmul_and_gemm(tmp_path, x, per_channel) -> None:
    result, out = _quantize(tmp_path, _mlp(), Plan(NodeQuant(mode="dynamic", per_channel=per_channel)), x)
    assert result.quantized == ["fc1", "mm2", "mm3"] and not result.notes
    kernels = measure.fused_kernels(out)
    assert kernels["DynamicQuantizeMatMul"] + kernels["MatMulIntegerToFloat"] == 3, kernels
    assert not {"MatMul", "Gemm", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"} & set(kernels)
    assert _sqnr(_mlp(), out, x) > 32


@pytest.mark.parametrize("gemm, bias", [({"transB": 1}, True), ({}, True), ({"transB": 1}, False),
                                        ({"alpha": 0.5, "beta": 2.0}, True), ({"alpha": -1.5}, False)])
def test_dynamic_gemm_forms(tmp_path, x, gemm, bias) -> None:
    model = _mlp(gemm, bias)
    _, out = _quantize(tmp_path, model, Plan(None, {"fc1": DYNAMIC}), x)
    kernels = measure.fused_kernels(out)
    assert kernels["DynamicQuantizeMatMul"] + kernels["MatMulIntegerToFloat"] == 1, kernels
    assert "Add" not in kernels  # the bias is the fused kernel's
    assert _sqnr(model, out, x) > 35


@pytest.mark.parametrize("choice, floor", [(W4, 12), (W8, 34), (NodeQuant(mode="weight-only", weights=4, block_size=16), 14),
                                           (NodeQuant(mode="weight-only", weights=4, block_size=256), 11),
                                           (NodeQuant(mode="weight-only", weights=4, weight_signed=False,
                                                      weight_symmetric=False), 12)])
def test_weight_only_fuses_matmul_nbits(tmp_path, x, choice, floor) -> None:
    result, out = _quantize(tmp_path, _mlp(), Plan(choice), x)
    assert result.quantized == ["fc1", "mm2", "mm3"] and not result.notes
    q = onnx.load(str(out))
    assert q.opset_import[0].version >= 21
    blocked = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert [next(a.i for a in n.attribute if a.name == "block_size") for n in blocked] == [choice.block_size] * 3
    kernels = measure.fused_kernels(out)
    assert kernels["MatMulNBits"] == 3, kernels
    # The Relus are written as Max(y, 0): onnxruntime 1.32 leaves a MatMul followed by Relu unfused.
    assert not {"MatMul", "Gemm", "FusedGemm", "DequantizeLinear", "Relu"} & set(kernels)
    assert _sqnr(_mlp(), out, x) > floor


@pytest.mark.parametrize("gemm, bias", [({}, True), ({"transB": 1}, False), ({"alpha": 0.5, "beta": 2.0}, True)])
def test_weight_only_gemm_forms(tmp_path, x, gemm, bias) -> None:
    model = _mlp(gemm, bias)
    _, out = _quantize(tmp_path, model, Plan(None, {"fc1": W8}), x)
    assert measure.fused_kernels(out)["MatMulNBits"] == 1
    assert _sqnr(model, out, x) > 34


def test_weight_only_conv_dequantizes_blocks_along_input_channels(tmp_path, rng) -> None:
    data = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result, out = _quantize(tmp_path, conv_net(), Plan(NodeQuant(mode="weight-only", weights=8, block_size=16)), data)
    assert result.quantized == ["conv1", "conv2", "fc"]
    q = onnx.load(str(out))
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for conv in (n for n in q.graph.node if n.op_type == "Conv"):
        attrs = {a.name: a.i for a in dq[conv.input[1]].attribute}
        assert attrs == {"axis": 1, "block_size": 16}
    kernels = measure.fused_kernels(out)
    assert kernels["MatMulNBits"] == 1 and "QLinearConv" not in kernels  # dequantize + float Conv
    assert _sqnr(conv_net(), out, data) > 30


def test_static_still_fuses_integer_kernels(tmp_path, rng) -> None:
    data = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    _, out = _quantize(tmp_path, conv_net(), Plan(), data)
    kernels = measure.fused_kernels(out)
    assert kernels["QLinearConv"] == 2, kernels
    assert kernels["QGemm"] + kernels["QLinearMatMul"] + kernels["MatMulIntegerToFloat"] == 1
    assert _sqnr(conv_net(), out, data) > 25


def test_mixed_plan_runs_each_node_in_its_mode(tmp_path, x) -> None:
    plan = Plan(NodeQuant(), {"fc1": DYNAMIC, "mm2": W4})  # mm3 static W8A8
    result, out = _quantize(tmp_path, _mlp(), plan, x)
    assert result.quantized == ["fc1", "mm2", "mm3"] and not result.notes
    kernels = measure.fused_kernels(out)
    assert kernels["DynamicQuantizeMatMul"] == 1 and kernels["MatMulNBits"] == 1, kernels
    assert kernels["MatMulIntegerToFloat"] + kernels["QLinearMatMul"] == 1, kernels
    assert _sqnr(_mlp(), out, x) > 12  # the 4-bit node dominates the noise


@pytest.mark.parametrize("choice, ratio, dtype", [(W4, 0.25, TensorProto.INT4), (W8, 0.4, TensorProto.INT8),
                                                  (DYNAMIC, 0.4, TensorProto.INT8)])
def test_file_shrinks_weights_stored_as_integers(tmp_path, x, choice, ratio, dtype) -> None:
    # 4x / 2x smaller weights, less what a small graph's own bytes and the scales take
    src = tmp_path / "float.onnx"
    onnx.save(_mlp(), src)
    _, out = _quantize(tmp_path, _mlp(), Plan(choice), x)
    assert out.stat().st_size < ratio * src.stat().st_size
    inits = onnx.load(str(out)).graph.initializer
    assert not {"w1", "w2", "w3"} & {i.name for i in inits}
    assert sum(i.data_type == dtype for i in inits) == 3


def test_no_calibration_statistics_needed(x) -> None:
    plan = Plan(NodeQuant(), {"fc1": DYNAMIC, "mm2": W4, "mm3": W8})
    model = UpgradeOpset(21)(load_onnx(_mlp())).model  # no calibrate pass: no statistics at all
    InsertQDQ(plan)(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2


def _gemm_trans_a() -> onnx.ModelProto:
    """x[64, 4] -> Gemm(transA=1, w[64, 48]) -> y[4, 48]."""
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((K, H)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)], "trans_a",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, H])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_forms_without_the_mode_stay_float_with_a_note(tmp_path, rng) -> None:
    model = load_onnx(_gemm_trans_a())
    InsertQDQ(Plan(DYNAMIC))(model)  # a dynamic node needs no statistics; this one stays float
    assert "transA=1" in model.graph.node(0).meta[qir.QUANT_NOTES][-1]
    assert [n.op_type for n in model.graph] == ["Gemm"]
    data = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result, _ = _quantize(tmp_path, conv_net(), Plan(DYNAMIC), data)
    assert result.quantized == ["fc"]
    assert "mode 'dynamic' is not available for this Conv" in result.notes["conv1"][-1]


def _two_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.standard_normal((K, H)) * 0.2).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((H, N)) * 0.2).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_weight_only_read_by_a_static_node_is_noted_unfused(tmp_path, x) -> None:
    result, out = _quantize(tmp_path, _two_matmuls(), Plan(NodeQuant(), {"mm1": W4}), x)
    assert result.quantized == ["mm1", "mm2"]
    assert "no MatMulNBits" in result.notes["mm1"][-1]
    assert _sqnr(_two_matmuls(), out, x) > 12


def test_search_evaluations_run_mixed_plans(x) -> None:
    # What a search does for each candidate: InsertQDQ on a copy of the calibrated model, run by onnxruntime.
    model = PassManager([UpgradeOpset(21), Calibrate(x, progress=False)]).run(load_onnx(_mlp())).model
    with Executor(model, x, workers=1) as executor:
        reference = executor.reference()
        variants = [executor.quantized(Plan(NodeQuant(), {"fc1": DYNAMIC, "mm2": W4})),
                    executor.quantized(Plan(W8, {"mm3": DYNAMIC}))]
        for got in executor.run(variants):
            assert sqnr_db(reference, got) > 12
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)  # the calibrated model is untouched


def _if_model() -> onnx.ModelProto:
    """h = x @ w (main graph); If (sum(h) > 0): then y = h @ w2 (outer-scope w2) else y = Relu(h)."""
    rng = np.random.default_rng(3)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w2"], ["t"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["e"], name="else_relu")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = {"w": rng.standard_normal((K, H)).astype(np.float32), "w2": rng.standard_normal((H, H)).astype(np.float32),
             "zero": np.array(0, np.float32)}
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, H])],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _body_kernels(path: Path, tmp_path: Path) -> list[str]:
    """Op types of the then-branch in onnxruntime's optimised graph."""
    optimized = tmp_path / "optimized.onnx"
    onnx_backend.session(path, onnx_backend.session_options(optimized_path=str(optimized)))
    (owner,) = [n for n in onnx.load(str(optimized)).graph.node if n.op_type == "If"]
    return [n.op_type for n in next(a.g for a in owner.attribute if a.name == "then_branch").node]


@pytest.mark.parametrize("choice, kernel", [(DYNAMIC, "DynamicQuantizeMatMul"), (W4, "MatMulNBits")])
def test_body_nodes_take_their_mode(tmp_path, choice, kernel) -> None:
    feeds = [{"x": xi} for xi in np.random.default_rng(4).standard_normal((16, 4, K)).astype(np.float32)]
    # Only inputs whose h sums negative: the then-branch never runs, and its mode needs no statistics.
    calib = [f for f in feeds if float((f["x"] @ _weights(_if_model())["w"]).sum()) <= 0][:4]
    result, out = _quantize(tmp_path, _if_model(), Plan(NodeQuant(), {"then_mm": choice}), calib)
    assert result.quantized == ["mm", "then_mm"]
    assert result.notes["if"] == ["1 quantizable node(s) inside its subgraph(s) quantized (then_mm)"]
    assert _body_kernels(out, tmp_path) == [kernel]
    for feed in feeds[:4]:
        assert _sqnr(_if_model(), out, feed) > 10


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
