"""Reliability checks of issue #8 done so far: byte-identical outputs for the same inputs (plain and
searched), and collapsing layers reported."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import qinject
from qinject.app.api import SearchOptions
from qinject.plan import Plan
from tests.builders import CNN, conv_net


def test_same_input_data_plan_and_seed_give_byte_identical_files(tmp_path):
    for i in range(2):
        qinject.quantize_onnx(CNN / "model.onnx", tmp_path / f"plain{i}.onnx", calib=CNN / "calib.npz",
                              method="entropy", plan=Plan.uniform(4, 8), progress=False)
        qinject.quantize_onnx(CNN / "model.onnx", tmp_path / f"search{i}.onnx", calib=CNN / "calib.npz",
                              target="nvidia-a100", latency_batch=256, progress=False,
                              search=SearchOptions(max_drop="1%", eval_data=CNN / "eval.npz", search="ilp",
                                                   workers=1 + i, seed=0))  # worker count must not matter
    assert (tmp_path / "plain0.onnx").read_bytes() == (tmp_path / "plain1.onnx").read_bytes()
    assert (tmp_path / "search0.onnx").read_bytes() == (tmp_path / "search1.onnx").read_bytes()


def test_a_collapsing_layer_is_reported():
    model = conv_net()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0] *= 1000.0  # one outlier channel sets the per-tensor scale
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    per_tensor = qinject.quantize_onnx(onnx.ModelProto.FromString(model.SerializeToString()),
                                       plan=Plan.uniform(4, 8, per_channel=False), calib={"x": x}, progress=False)
    (note,) = per_tensor.notes["conv1"]
    assert note.startswith("7 of 8 output channels of weight 'w1' quantize to all zeros at 4 bits per tensor")
    per_channel = qinject.quantize_onnx(model, plan=Plan.uniform(4, 8), calib={"x": x}, progress=False)
    assert "conv1" not in per_channel.notes


def test_symbolic_batch_and_sequence_survive_and_calibrate_on_varying_shapes(tmp_path):
    from onnx import TensorProto, helper

    from qinject.backends import onnx_backend

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                               helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((b, t, 16)).astype(np.float32)} for b, t in [(1, 5), (3, 7), (2, 11)]]
    result = qinject.quantize_onnx(model, tmp_path / "q.onnx", calib=feeds, progress=False)
    assert result.quantized == ["mm"]
    q = onnx.load(str(tmp_path / "q.onnx"))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*q.graph.input, *q.graph.output)]
    assert dims == [["batch", "seq", 16], ["batch", "seq", 8]]
    session = onnx_backend.session(tmp_path / "q.onnx")
    for b, t in [(4, 3), (1, 20)]:
        x = rng.standard_normal((b, t, 16)).astype(np.float32)
        y = session.run(None, {"x": x})[0]
        assert y.shape == (b, t, 8) and np.abs(y - np.maximum(x @ w, 0)).max() < 0.25  # W8A8 on N(0,1) inputs


def test_external_data_in_external_data_out(tmp_path):
    model = conv_net()
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.weights", size_threshold=0)
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    qinject.quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", calib={"x": x}, progress=False)
    assert (tmp_path / "q.onnx.data").stat().st_size > 0
    proto = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    from qinject.backends import onnx_backend

    out = onnx_backend.session(tmp_path / "q.onnx").run(None, {"x": x[:2]})[0]
    assert out.shape[0] == 2 and np.all(np.isfinite(out))
