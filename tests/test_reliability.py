"""Reliability checks of issue #8 done so far: byte-identical outputs for the same inputs (plain and
searched), and collapsing layers reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import qinject
from qinject.api import SearchOptions
from qinject.plan import Plan
from tests.builders import conv_net

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn"


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
