"""4-bit activation pairs written as Clip -> 8-bit Q/DQ (qinject/backends/onnx_narrow.py): the same
numbers as the 4-bit pair, in a form onnxruntime's default session loads."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qinject
from qinject.backends import onnx_backend
from qinject.backends.onnx_narrow import widen_four_bit_activations
from qinject.core import numerics
from qinject.plan import NodeQuant, Plan
from tests.builders import conv_net

# ties, values just inside and outside the 4-bit grid's ends, far outside, zero
VALUES = np.array([-1000.0, -2.25, -2.0, -1.0, -0.3, -0.25, 0.0, 0.125, 0.375, 1.25, 3.49, 3.5, 3.75, 4.0, 9.0, 1e6],
                  np.float32)


def _pair(qtype: int, zero_point: int, scale: float = 0.25, axis_scale: bool = False) -> onnx.ModelProto:
    shape = [len(VALUES)]
    s = np.full(shape, scale, np.float32) if axis_scale else np.float32(scale)
    z = np.full(shape, zero_point) if axis_scale else np.array(zero_point)
    inits = [numpy_helper.from_array(np.asarray(s, np.float32), "s"),
             onnx.helper.make_tensor("z", qtype, list(np.shape(z)), np.ravel(z).tolist())]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": VALUES})[0]


@pytest.mark.parametrize("qtype, zero_point, bits, signed", [(TensorProto.UINT4, 3, 4, False),
                                                             (TensorProto.INT4, 0, 4, True),
                                                             (TensorProto.INT4, -5, 4, True)])
def test_the_widened_pair_computes_exactly_the_four_bit_pair(qtype, zero_point, bits, signed):
    model = _pair(qtype, zero_point)
    want = numerics.dequantize(numerics.quantize(VALUES, np.float32(0.25), np.array(zero_point),
                                                 numerics.QType(bits, signed)), np.float32(0.25), np.array(zero_point))
    np.testing.assert_array_equal(_run(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), want)
    assert widen_four_bit_activations(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Clip", "QuantizeLinear", "DequantizeLinear"]
    assert {t.data_type for t in model.graph.initializer} <= {TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8}
    np.testing.assert_array_equal(_run(model), want)


def test_pairs_it_cannot_express_are_left_as_they_are():
    per_axis = _pair(TensorProto.UINT4, 2, axis_scale=True)
    assert widen_four_bit_activations(per_axis) == 0
    read_raw = _pair(TensorProto.UINT4, 2)
    read_raw.graph.output.append(helper.make_tensor_value_info("q", TensorProto.UINT4, [len(VALUES)]))
    assert widen_four_bit_activations(read_raw) == 0
    assert widen_four_bit_activations(_pair(TensorProto.UINT8, 2)) == 0  # 8 bits: nothing to do


def _optimised(path, tmp_path) -> onnx.ModelProto:
    options = ort.SessionOptions()  # the defaults: ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimised.onnx"))


@pytest.mark.parametrize("weights", [4, 8])
def test_four_bit_activations_are_written_and_onnxruntime_runs_them_as_the_jax_simulation(tmp_path, weights):
    # conv_net has Relu -> MaxPool -> Q: the pattern onnxruntime rewrote into a uint4 MaxPool
    calib = {"x": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    result = qinject.quantize_onnx(conv_net(), tmp_path / "q.onnx", calib=calib, progress=False,
                                   plan=Plan(NodeQuant(weights=weights, activations=4)))
    assert result.output.exists()
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])  # default options
    got = session.run(None, {"x": x})[0]
    want = np.asarray(result.to_jax("simulated")(x))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # float rounding, far below one 4-bit step
    written = onnx.load(str(result.output))
    kinds = collections.Counter(n.op_type for n in written.graph.node)
    assert kinds["Clip"] == kinds["QuantizeLinear"] > 0
    optimised = _optimised(result.output, tmp_path)
    ops = collections.Counter(n.op_type for n in optimised.graph.node)
    assert ops["MaxPool"] == 1  # float, on the float tensor: no QuantizeLinear was moved in front of it
    # every QuantizeLinear still reads its Clip (ClipQuantFusion removes only a clip wider than the 8-bit
    # range), so the codes stay on the 4-bit grid
    producer = {out: n for n in optimised.graph.node for out in n.output}
    quantizers = [n for n in optimised.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == kinds["QuantizeLinear"] and all(producer[q.input[0]].op_type == "Clip" for q in quantizers)
    if weights == 8:  # int8 weights: onnxruntime fuses the Gemm into its integer kernel, fed the 4-bit codes
        assert ops["QGemm"] == 1 and ops["Gemm"] == 0
    else:  # int4 weights have no integer kernel: dequantize + float, as for W4A8
        assert ops["QGemm"] == 0
