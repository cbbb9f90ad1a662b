"""Magika's real ONNX model, quantized W8A8 on real files through magika's own preprocessing.

The float model is the reference: on held-out real files (none used for calibration), the
quantized model must pick the same content type for at least 97% of them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("magika")

import qinject  # noqa: E402
from qinject.backends import onnx_backend  # noqa: E402
from qinject.plan import Plan  # noqa: E402
from qinject.runtime.measure import predict, top1_agreement  # noqa: E402
from tests.zoo.magika_data import magika_features, magika_model_path, real_files  # noqa: E402

MIN_AGREEMENT = 0.97
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
# The Conv reads a LayerNorm output with tails ~50x its std: minmax spends the 8-bit codes on the
# tails. MSE clipping (bit-width aware, no tuning knob) resolves the bulk: 97.5-98.2% agreement on
# the seeds measured, against 96.9-97.1% for minmax. The Conv's own output (+-290 at std 6) is left
# float by the rewrite (predicted 27 dB SQNR), since no quantized node reads it.
METHOD = "mse"


@pytest.mark.long  # magika's W8A8 fidelity is also a golden figure of the default suite's corpus run
def test_magika_w8a8_agrees_with_float_on_real_files(tmp_path):
    model_path = magika_model_path()
    calib_files, held_out_files = real_files(seed=0)
    assert len(calib_files) >= 200 and len(held_out_files) >= 600
    (input_name,) = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
    out = tmp_path / "magika_w8a8.onnx"

    calib = {input_name: magika_features(calib_files)}
    qinject.quantize_onnx(model_path, out, plan=Plan.uniform(8, 8), calib=calib, method=METHOD, progress=False)

    onnx.checker.check_model(str(out), full_check=True)
    _assert_weights_dequantized(onnx.load(str(out)))
    held_out = {input_name: magika_features(held_out_files)}
    float_probs = predict(onnx_backend.session(model_path), held_out)
    quant_probs = predict(onnx_backend.session(out), held_out)
    agreement = top1_agreement(float_probs, quant_probs)
    # Most disagreements are files the float model itself is unsure of (magika reports those as
    # generic text/unknown); shown to tell real damage from coin flips, not used by the assert.
    confident = float_probs.max(axis=-1) >= 0.5
    confident_agreement = top1_agreement(float_probs[confident], quant_probs[confident])
    print(f"\nmagika W8A8 ({METHOD}) top-1 agreement {agreement:.4f} on {len(held_out_files)} "
          f"held-out files ({len(calib_files)} calibration); {_distinct(float_probs)} distinct float labels, "
          f"{_distinct(quant_probs)} quantized; agreement {confident_agreement:.4f} on the "
          f"{int(confident.sum())} files the float model gives >= 0.5")
    assert agreement >= MIN_AGREEMENT


def _distinct(probs: np.ndarray) -> int:
    return len(np.unique(np.argmax(probs, axis=-1)))


def _assert_weights_dequantized(proto: onnx.ModelProto) -> None:
    producers = {o: n for n in proto.graph.node for o in n.output}
    weighted = [n for n in proto.graph.node if n.op_type in WEIGHTED_OPS]
    assert weighted, "the quantized magika model has no Conv/MatMul/Gemm left"
    for node in weighted:
        producer = producers.get(node.input[1])
        # A float weight initializer here would mean the node silently stayed float.
        assert producer is not None and producer.op_type == "DequantizeLinear", (
            f"{node.op_type} {node.name!r}: weight input {node.input[1]!r} is not fed by DequantizeLinear")
