"""Timing models on this machine: every model form is accepted, 4-bit weights included. No timing
is asserted (the machine is shared): only that each model ran and got a positive time."""

from __future__ import annotations

import numpy as np

import qinject
from qinject.core import ir as qir
from qinject.plan import Plan
from qinject.runtime import measure
from qinject.runtime.measure import interleaved_latency
from tests.builders import CNN


def test_interleaved_latency_takes_ir_models_with_four_bit_weights(tmp_path):
    # int4 tensors are numpy void arrays, which onnxruntime cannot take as external initializers
    result = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "q.onnx", calib=CNN / "calib.npz",
                                   plan=Plan.uniform(4, 8), progress=False)
    feed = result.model.meta[qir.SAMPLE_FEED]
    times = interleaved_latency([CNN / "model.onnx", result.model, tmp_path / "q.onnx"], feed, budget_s=0.2)
    assert len(times) == 3 and all(np.isfinite(t) and t > 0 for t in times)


class _Recorder:
    """A stand-in session: records the order of runs in a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def get_inputs(self):
        return []

    def run(self, outputs, feed):
        self.log.append(self.name)


def test_interleaved_latency_starts_each_round_one_model_later_and_never_spins(monkeypatch):
    # On a shared machine a spinning session's idle workers slow whichever session runs next, so a
    # fixed order favoured one model; rotated, each model runs right after each other model.
    log: list[str] = []
    options = []

    def session(model, opts=None):
        options.append(opts)
        return _Recorder(model, log)

    monkeypatch.setattr(measure.onnx_backend, "session", session)
    times = interleaved_latency(["a", "b", "c"], {}, budget_s=0.0)  # 5 rounds, the minimum
    assert len(times) == 3
    rounds = log[6:]  # after two warm-up runs of each
    assert rounds[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(o.get_session_config_entry("session.intra_op.allow_spinning") == "0" for o in options)
