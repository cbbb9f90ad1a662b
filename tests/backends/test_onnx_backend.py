from __future__ import annotations

import numpy as np
import onnx
import pytest

import qinject
from models.realworld import corpus
from qinject.backends import onnx_backend
from qinject.core.errors import QinjectError
from qinject.frontends.onnx_frontend import load_onnx
from qinject.runtime.measure import fused_kernels
from tests.builders import conv_net, run


def test_save_with_external_data_is_checked_and_loadable(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    onnx_backend.save(load_onnx(conv_net()), out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    x = {"x": np.ones((1, 3, 8, 8), np.float32)}
    assert np.array_equal(run(str(out), x)[0], run(conv_net(), x)[0])


def test_refuses_missing_folder_and_input_path(tmp_path) -> None:
    model = load_onnx(conv_net())
    with pytest.raises(QinjectError, match="does not exist"):
        onnx_backend.save(model, tmp_path / "no" / "m.onnx")
    src = tmp_path / "in.onnx"
    onnx.save(conv_net(), str(src))
    with pytest.raises(QinjectError, match="is the input model"):
        onnx_backend.save(model, src, input_path=src)
    assert list(tmp_path.iterdir()) == [src]


def test_the_written_model_names_no_more_shapes_than_its_source(tmp_path) -> None:
    # the frontend infers every shape; writing them all would let onnxruntime fuse what it cannot
    # fuse in the float model (see the next test)
    bare = conv_net()
    assert not bare.graph.value_info
    model = load_onnx(bare)
    assert all(v.shape is not None for n in model.graph for v in n.outputs)
    onnx_backend.save(model, tmp_path / "bare.onnx")
    assert not onnx.load(str(tmp_path / "bare.onnx")).graph.value_info
    annotated = onnx.shape_inference.infer_shapes(conv_net())
    names = {info.name for info in annotated.graph.value_info}
    assert names
    onnx_backend.save(load_onnx(annotated), tmp_path / "annotated.onnx")
    assert {info.name for info in onnx.load(str(tmp_path / "annotated.onnx")).graph.value_info} == names


def test_onnxruntime_fuses_a_quantized_bert_export_as_it_fuses_the_float_one(tmp_path) -> None:
    # The TorchScript BERT export names no shapes, so onnxruntime cannot prove the residual Adds'
    # shapes and fuses no SkipLayerNormalization (7x slower than Add + LayerNormalization on its
    # CPU at 128 x 768). Written with every inferred shape, the quantized file got one per Add.
    case = corpus.case("transformers_bert_torchscript")
    source = tmp_path / "model.onnx"
    onnx.save(case.model(), str(source))
    qinject.quantize_onnx(source, tmp_path / "q.onnx", calib=case.calibration(4), progress=False)
    float_kernels, quantized = fused_kernels(source), fused_kernels(tmp_path / "q.onnx")
    assert quantized["MatMulIntegerToFloat"] > 0  # it was quantized
    assert quantized["SkipLayerNormalization"] == float_kernels["SkipLayerNormalization"] == 0
    assert quantized["LayerNormalization"] == float_kernels["LayerNormalization"] > 0
