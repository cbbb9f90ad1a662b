"""FoldConstants folds constant weight chains, and leaves int64 shape arithmetic exactly as
exported (TorchScript attention: Shape -> Gather(0-d index) -> Unsqueeze -> Concat -> Reshape)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import FoldConstants

from qinject.core.pass_manager import PassManager
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import matmul_net, run


def _attention_scores() -> onnx.ModelProto:
    """scores = q @ Reshape(k, [batch, -1]^T...): the MatMul's input 1 is an activation reached through
    shape arithmetic whose Gather index is a 0-d Constant (rank matters: Unsqueeze then Concat)."""
    nodes = [
        helper.make_node("Shape", ["k"], ["k_shape"], name="shape"),
        helper.make_node("Constant", [], ["zero"], name="zero", value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["k_shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Constant", [], ["axes"], name="axes", value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch_1d"], name="unsqueeze"),
        helper.make_node("Constant", [], ["rest"], name="rest",
                         value=numpy_helper.from_array(np.array([4, -1], np.int64))),
        helper.make_node("Concat", ["batch_1d", "rest"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["k", "new_shape"], ["k_r"], name="reshape"),
        helper.make_node("MatMul", ["q", "k_r"], ["scores"], name="scores"),
    ]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", 3, 4]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", 8, 2])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shape_arithmetic_under_an_activation_matmul_is_left_alone():
    model = load_onnx(_attention_scores())
    result = PassManager([FoldConstants()]).run(model)
    assert not result.modified
    assert [n.op_type for n in result.model.graph].count("Constant") == 3
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, 3, 4)).astype(np.float32),
             "k": rng.standard_normal((2, 8, 2)).astype(np.float32)}
    from qinject.backends import onnx_backend

    (want,), (got,) = run(_attention_scores(), feeds), run(onnx_backend.to_proto(result.model), feeds)
    np.testing.assert_array_equal(want, got)


def test_constant_weight_chains_still_fold():
    model = PassManager([FoldConstants()]).run(load_onnx(matmul_net())).model
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "MatMul"]
    assert {"w1", "w2"} <= set(model.graph.initializers)
