"""The sensitivity framework: evaluation data, reports, the analyze entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qinject.passes.sensitivity import report, signal_pass
from qinject.passes.sensitivity.base import AnalysisData

import qinject
from qinject.core.errors import QinjectError
from tests.builders import conv_net
from tests.passes.sensitivity.fixtures import conv_case


def test_analysis_data_checks(tmp_path):
    model, data = conv_case()
    np.savez(tmp_path / "e.npz", x=data.inputs["x"], labels=np.zeros(len(data.inputs["x"]), np.int64))
    loaded = AnalysisData.load(tmp_path / "e.npz", model, limit=5)
    assert loaded.inputs["x"].shape[0] == 5 and loaded.labels.shape == (5,)
    assert AnalysisData.load(data.inputs["x"], model).labels is None  # a bare array: one input
    np.savez(tmp_path / "bad.npz", y=data.inputs["x"])
    with pytest.raises(QinjectError, match=r"lacks model input\(s\) \['x'\]"):
        AnalysisData.load(tmp_path / "bad.npz", model)
    np.savez(tmp_path / "uneven.npz", x=data.inputs["x"], labels=np.zeros(3, np.int64))
    with pytest.raises(QinjectError, match="different sample counts"):
        AnalysisData.load(tmp_path / "uneven.npz", model)
    with pytest.raises(QinjectError, match="does not exist"):
        AnalysisData.load(tmp_path / "missing.npz", model)
    with pytest.raises(QinjectError, match="unknown sensitivity metric 'magic'"):
        signal_pass("magic", data)


def test_analyze_and_report_are_json(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    model = qinject.analyze(conv_net(), {"x": x}, ["quant-error"], workers=1, progress=False)
    text = json.dumps(report(model))
    data = json.loads(text)
    assert data["format"] == "qinject-sensitivity" and data["signals"]["quant_error"]["evaluations"] == 10
    assert set(data["signals"]["quant_error"]["nodes"]) == {"conv1", "conv2", "fc"}
    assert set(data["signals"]["quant_error"]["nodes"]["conv1"]["score"]) == {"16", "8", "4"}
