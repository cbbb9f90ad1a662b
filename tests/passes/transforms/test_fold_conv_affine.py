from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import FoldConvAffine

from qinject.backends.onnx_backend import to_proto
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import run


def test_conv_bn_folds_exactly(rng) -> None:
    c = 4
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in [
        (rng.standard_normal((c, 2, 3, 3)), "w"), (rng.uniform(0.5, 2, c), "s"), (rng.standard_normal(c), "b"),
        (rng.standard_normal(c), "m"), (rng.uniform(0.5, 2, c), "v")]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 3, 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = load_onnx(proto)
    assert FoldConvAffine()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    x = {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(to_proto(model), x)[0], run(proto, x)[0], rtol=1e-4, atol=1e-5)


def test_conv_mul_add_scale_layer_folds(rng) -> None:
    c = 3
    inits = [numpy_helper.from_array(rng.standard_normal((c, 2, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal((1, c, 1, 1)).astype(np.float32), "t")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Unsqueeze", ["s"], ["s4"], name="unsq", axes=[1, 2]),
             helper.make_node("Mul", ["c", "s4"], ["m"], name="mul"),
             helper.make_node("Add", ["t", "m"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 8
    model = load_onnx(proto)
    assert FoldConvAffine()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    x = {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(to_proto(model), x)[0], run(proto, x)[0], rtol=1e-4, atol=1e-5)
