"""Timing models on this machine: every model form is accepted, 4-bit weights included. No timing
is asserted (the machine is shared): only that each model ran and got a positive time."""

from __future__ import annotations

import numpy as np

import qinject
from qinject.core import ir as qir
from qinject.plan import Plan
from qinject.runtime.measure import interleaved_latency
from tests.builders import CNN


def test_interleaved_latency_takes_ir_models_with_four_bit_weights(tmp_path):
    # int4 tensors are numpy void arrays, which onnxruntime cannot take as external initializers
    result = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "q.onnx", calib=CNN / "calib.npz",
                                   plan=Plan.uniform(4, 8), progress=False)
    feed = result.model.meta[qir.SAMPLE_FEED]
    times = interleaved_latency([CNN / "model.onnx", result.model, tmp_path / "q.onnx"], feed, budget_s=0.2)
    assert len(times) == 3 and all(np.isfinite(t) and t > 0 for t in times)
