"""Small calibrated models and data shared by the sensitivity-signal tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from qinject.passes import Calibrate, FoldConstants, FoldConvAffine, UpgradeOpset
from qinject.passes.sensitivity.base import AnalysisData

from qinject.core.pass_manager import PassManager
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import conv_net


def calibrated(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]):
    """The model as the analysis pipeline prepares it: folded, opset 21, calibrated."""
    return PassManager([FoldConstants(), FoldConvAffine(), UpgradeOpset(21),
                        Calibrate(inputs, progress=False)]).run(load_onnx(proto)).model


def conv_case(outlier: str | None = None, labels: bool = False, n: int = 32):
    """conv_net (conv1, conv2, fc), optionally with one weight element of ``outlier`` x50."""
    proto = conv_net()
    if outlier is not None:
        init = next(t for t in proto.graph.initializer if t.name == outlier)
        w = numpy_helper.to_array(init).copy()
        w.flat[0] *= 50.0
        init.CopyFrom(numpy_helper.from_array(w, outlier))
    x = np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)
    model = calibrated(proto, {"x": x})
    y = np.random.default_rng(2).integers(0, 10, n) if labels else None
    return model, AnalysisData({"x": x}, y)
