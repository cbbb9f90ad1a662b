"""Every model of the onnx package's light/, simple/, pytorch-operator/ and pytorch-converted/
reference tests through the quantize pipeline at W8A8 (W16A16 under -m long): each either matches the shipped
reference outputs or is refused with a reason; none crashes.

Bounds: W16A16 output SQNR >= 40 dB (16-bit rounding is ~96 dB below each tensor; accumulation
order and the uint16 activation range over one test input leave less), W8A8 >= 15 dB (each model is
calibrated on its single shipped input; one-layer models measure 25-45 dB).

The nine light/ files (ResNet-50, DenseNet-121, VGG-19, ...) run as shipped, on the inputs onnx's
runner generates for them, and must all quantize. Their weights are constant fills, so their
reference outputs are nearly uniform and match almost exactly (DenseNet-121: 126 dB at W16A16, 66 dB
at W8A8; the others bit-exact): this checks that the full-size structures survive quantization;
tests/zoo/test_light_zoo.py measures fidelity on the same structures with real weights.
"""

from __future__ import annotations

import collections
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import pytest

from qinject.plan import Plan
from tests.zoo.reference_corpus import cases, run_case

pytestmark = pytest.mark.slow  # 149 models twice, the full-size light nets among them: ~75 s


# 16 bits outside the default suite (-m long): the 8-bit run exercises the same rewrite on every model
@pytest.mark.parametrize("bits, bound", [pytest.param(16, 40.0, marks=pytest.mark.long), (8, 15.0)])
def test_reference_corpus(bits, bound):
    # Two processes (the machine's cores): the full-size light/ nets dominate and are Python-bound.
    # Spawned, not forked: the parent holds onnxruntime and jax threads.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = list(pool.map(partial(run_case, plan=Plan.uniform(bits, bits), bound_db=bound), cases()))
    counts = collections.Counter(o.status for o in outcomes)
    summary = f"W{bits}A{bits}: {dict(counts)} of {len(outcomes)} models"
    print(summary)
    for o in outcomes:
        if o.status == "refused":
            assert o.detail, o.name  # a refusal always names its reason
    problems = [f"{o.status} {o.name}: {o.detail}" for o in outcomes if o.status in ("crash", "mismatch")]
    assert not problems, summary + "\n" + "\n".join(problems)
    assert counts["ok"] >= 41 and len(outcomes) >= 149, summary
    light = [o for o in outcomes if o.name.startswith("light/")]
    assert len(light) == 9 and all(o.status == "ok" for o in light), light
    reasons = collections.Counter(o.detail.split(" (")[0].split(":")[0] for o in outcomes if o.status == "refused")
    # 106 no quantizable op, 1 opset 6 the converter cannot lift, 1 Gemm of two graph inputs
    # (test_operator_addmm: its "weight" is an input, so nothing is quantized, and that is an error)
    print(f"refusals by reason: {dict(reasons)}")
    assert reasons["the model has no quantizable op"] >= 100
    assert reasons["nothing to quantize"] == 1
