from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import FoldConstants, UpgradeOpset

from qinject.core import ir as qir
from qinject.core.errors import ModelLoadError, UnsupportedModelError
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import conv_net, matmul_net


def test_loads_file_and_proto(tmp_path) -> None:
    proto = conv_net()
    onnx.save(proto, tmp_path / "m.onnx")
    for source in (proto, tmp_path / "m.onnx", str(tmp_path / "m.onnx")):
        model = load_onnx(source)
        assert [n.name for n in qir.quantizable_nodes(model)] == ["conv1", "conv2", "fc"]
        # Shape inference ran: intermediate values have shapes.
        relu = next(n for n in model.graph if n.name == "relu1")
        assert list(relu.outputs[0].shape)[1:] == [8, 8, 8]


def test_external_data_is_found(tmp_path) -> None:
    onnx.save(conv_net(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = load_onnx(tmp_path / "m.onnx")
    w = model.graph.initializers["w1"].const_value.numpy()
    assert w.shape == (8, 3, 3, 3) and np.isfinite(w).all()


def test_constant_weights_are_folded() -> None:
    model = load_onnx(matmul_net())
    assert [n.name for n in qir.quantizable_nodes(model)] == ["mm1", "mm2"]  # mm1 counts as act x act
    FoldConstants()(model)
    ops = [n.op_type for n in model.graph]
    assert "Constant" not in ops and "Identity" not in ops
    mm1 = next(n for n in model.graph if n.name == "mm1")
    assert mm1.inputs[1].const_value is not None


def test_constant_of_shape_weight_is_folded() -> None:
    shape = numpy_helper.from_array(np.array([4, 3], dtype=np.int64), "w_shape")
    nodes = [helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="cos",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("w_shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    proto.ir_version = 3  # initializers listed as graph inputs, as in the light model zoo
    model = load_onnx(proto)
    assert [v.name for v in model.graph.inputs] == ["x"]
    FoldConstants()(model)
    mm = next(n for n in model.graph if n.name == "mm")
    assert np.array_equal(mm.inputs[1].const_value.numpy(), np.full((4, 3), 0.5, np.float32))


def test_opset_upgrade() -> None:
    model = load_onnx(conv_net(opset=9))
    result = UpgradeOpset(13)(load_onnx(conv_net(opset=9)))
    assert result.modified and result.model.opset_imports[""] == 13
    assert not UpgradeOpset(9)(model).modified


def test_nodes_without_names_get_unique_names() -> None:
    proto = conv_net()
    for node in proto.graph.node:
        node.name = ""
    names = [n.name for n in load_onnx(proto).graph]
    assert all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage" * 10, b"not an onnx file at all"])
def test_bad_files(tmp_path, content) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        load_onnx(path)


def test_truncated_file(tmp_path) -> None:
    data = conv_net().SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX"):
        load_onnx(path)


def test_missing_file_and_bad_opset(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")
    proto = conv_net()
    proto.opset_import[0].version = 99
    with pytest.raises(UnsupportedModelError, match="opset 99"):
        load_onnx(proto)
