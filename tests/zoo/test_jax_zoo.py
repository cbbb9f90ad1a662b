"""The model zoo through both frontends and both backends (issue #3's acceptance checks).

Bounds, and why:
- W16A16 simulated vs float: output SQNR >= 50 dB (57-61 dB measured) and the same top-1 on at
  least 99.9% of the eval split (the transformer has one near-tie in 1600 that flips). 16-bit
  rounding noise is ~2^-16 of each tensor's range; 50 dB leaves room for ranges set by outliers.
- integer vs simulated (W8A8): every output element within one quantization step of the output,
  its float range over the batch / 255. Integer accumulation is exact while simulated mode sums in
  float32, so an intermediate code can round the other way; one step bounds where that shows.
- W8A8 accuracy within 1 percentage point of float (the issue's bound).
- the quantized JAX function vs its QDQ ONNX export in onnxruntime: >= 99% same predictions.
- the network entered both ways (JAX function; its ONNX export through the ONNX frontend): the
  same quantizable node names, and at W8A8 outputs within 30 dB SQNR of each other and >= 99%
  same predictions (each side calibrates on the same data through its own runtime).
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest

import qinject
from models import zoo
from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core.numerics import sqnr_db
from qinject.plan import Plan

BATCH = 64


@pytest.fixture(scope="module", params=zoo.NAMES)
def case(request):
    model = zoo.load(request.param)
    x = model.example_input(BATCH)
    w8 = qinject.quantize_jax(model.forward, model.params, x, calib=model.calib_inputs, progress=False)
    return model, x, w8


def _predictions(model, predict) -> np.ndarray:
    """Logits over the whole eval split, in fixed batches."""
    n = len(model.eval_inputs)
    out = []
    for start in range(0, n, BATCH):
        idx = np.minimum(np.arange(start, start + BATCH), n - 1)
        out.append(np.asarray(predict(model.eval_inputs[idx]))[: min(BATCH, n - start)])
    return np.concatenate(out)


def test_simulated_16_bit_matches_float(case):
    model, x, _ = case
    w16 = qinject.quantize_jax(model.forward, model.params, x, calib=model.calib_inputs,
                               plan=Plan.uniform(16, 16), progress=False)
    reference = _predictions(model, jax.jit(partial(model.forward, model.params)))
    simulated = _predictions(model, jax.jit(w16.to_jax("simulated")))
    assert sqnr_db(reference, simulated) >= 50
    assert np.mean(reference.argmax(-1) == simulated.argmax(-1)) >= 0.999


def test_integer_mode_within_one_output_step_of_simulated(case):
    model, x, w8 = case
    simulated = np.asarray(jax.jit(w8.to_jax("simulated"))(x))
    integer = np.asarray(jax.jit(w8.to_jax("integer"))(x))
    step = (simulated.max() - simulated.min()) / 255
    assert np.abs(integer - simulated).max() <= step


def test_w8a8_accuracy_within_one_point(case):
    model, _, w8 = case
    float_acc = model.accuracy_of_params(BATCH)
    for mode in ("simulated", "integer"):
        assert model.evaluate(jax.jit(w8.to_jax(mode)), BATCH) >= float_acc - 0.01, mode


def test_exported_qdq_onnx_runs_in_onnxruntime_and_agrees(case, tmp_path):
    model, _, w8 = case
    path = w8.save(tmp_path / f"{model.name}.qdq.onnx")
    sess = onnx_backend.session(path)
    name = sess.get_inputs()[0].name
    ort_logits = _predictions(model, lambda xb: sess.run(None, {name: xb})[0])
    jax_logits = _predictions(model, jax.jit(w8.to_jax("simulated")))
    assert np.mean(ort_logits.argmax(-1) == jax_logits.argmax(-1)) >= 0.99
    kinds = {n.op_type for n in onnx_backend.to_proto(qinject.load_onnx(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds and not any(k.islower() for k in kinds)


def test_both_frontends_agree(case, tmp_path):
    model, x, w8 = case
    float_onnx = qinject.export_onnx(qinject.trace_jax(model.forward, model.params, x),
                                     tmp_path / f"{model.name}.onnx")
    via_onnx = qinject.quantize_onnx(float_onnx, tmp_path / f"{model.name}.q.onnx", calib=model.calib_inputs,
                                     progress=False)
    assert {n.name for n in qir.quantizable_nodes(qinject.trace_jax(model.forward, model.params, x))} == {
        n.name for n in qir.quantizable_nodes(qinject.load_onnx(float_onnx))}
    assert sorted(via_onnx.quantized) == sorted(w8.quantized)
    sess = onnx_backend.session(via_onnx.output)
    name = sess.get_inputs()[0].name
    onnx_logits = _predictions(model, lambda xb: sess.run(None, {name: xb})[0])
    jax_logits = _predictions(model, jax.jit(w8.to_jax("simulated")))
    assert sqnr_db(jax_logits, onnx_logits) >= 30
    assert np.mean(onnx_logits.argmax(-1) == jax_logits.argmax(-1)) >= 0.99

