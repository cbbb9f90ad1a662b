"""Every model of the light model zoo shipped inside onnx quantizes at W8A8 and W16A16.

The zoo ships structures with constant weights (see ``models.light_zoo``); they are given
deterministic He-normal weights so that fidelity means something, kept at their shipped opset 9
(so the opset upgrade is exercised), and measured on logits.

Bounds, and why: at W8A8 per-channel every quantized layer adds rounding noise ~48 dB below its
signal (uint8 activations over the calibrated range, int8 weights per channel); tens of layers in
series and evaluation inputs beyond the 8 calibration images' range bring the logits to 29-34 dB
here, so 25 dB (5.6% RMS noise) is the bound, with top-1 agreement on 2 of 3 inputs at least (near
ties on random inputs may flip). At W16A16 the same noise is ~96 dB per layer; clipping of
evaluation values beyond the calibration range dominates (66-82 dB seen), so the bound is 50 dB.

VGG-19 (20 GFLOPs and 548 MB of weights per image, 40 s here) and ZFNet-512 (19 s) run with
``-m long``, outside the default suite: AlexNet covers the same plain conv + fully-connected
structure there, and the shipped VGG-19 and ZFNet-512 files go through both widths in
tests/zoo/test_reference_corpus.py. DenseNet-121 (8 s) is under ``-m long`` too: Inception v1/v2 cover its
concatenated branches here, and its shipped file goes through the reference corpus at W8A8.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models.light_zoo import NAMES, materialize
from qinject import quantize_onnx
from qinject.core.numerics import sqnr_db
from qinject.plan import Plan
from tests.builders import dq_fed

pytestmark = pytest.mark.slow

BOUNDS = {8: (25.0, 2 / 3), 16: (50.0, 1.0)}


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.standard_normal((8, 3, 224, 224)).astype(np.float32),
            rng.standard_normal((3, 3, 224, 224)).astype(np.float32))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long)
                                  if n in ("vgg19", "zfnet512", "bvlc_alexnet", "densenet121") else n
                                  for n in NAMES])
def test_light_model_quantizes(name, images, tmp_path) -> None:
    import onnxruntime as ort

    calib, evaluation = images
    float_path = tmp_path / "float.onnx"
    model = materialize(name, opset=None)  # the shipped opset 9: the upgrade path is part of the test
    onnx.save(model, str(float_path))
    input_name = model.graph.input[0].name
    float_sess = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([float_sess.run(None, {input_name: x[None]})[0] for x in evaluation])
    for bits, (min_sqnr, min_agree) in BOUNDS.items():
        out = tmp_path / f"w{bits}a{bits}.onnx"
        # force: every node quantized, grouped convolutions too (numerics, not speed, are checked here)
        result = quantize_onnx(float_path, out, plan=Plan.uniform(bits, bits), calib={input_name: calib},
                               progress=False, force=True)
        q = onnx.load(str(out), load_external_data=False)
        onnx.checker.check_model(str(out), full_check=True)
        assert dq_fed(q) == [], f"{name}: nodes not fed by DequantizeLinear"
        assert len(result.quantized) == sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {input_name: x[None]})[0] for x in evaluation])
        agree = float(np.mean(ref.reshape(3, -1).argmax(1) == got.reshape(3, -1).argmax(1)))
        assert sqnr_db(ref, got) >= min_sqnr, f"{name} W{bits}A{bits}: {sqnr_db(ref, got):.1f} dB"
        assert agree >= min_agree
