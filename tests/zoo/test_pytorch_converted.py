"""The pytorch-converted reference tests with Conv, ConvTranspose or Linear layers quantize and
match their shipped reference outputs.

Bounds, and why: each model is one layer on standard-normal inputs. At W8A8 per-channel the
rounding noise of the input (uint8 over its calibrated range, ~1.5% of the range per step) and of
the weights (int8 per channel) gives an output SQNR of 30-40 dB; the bound is 25 dB, with
calibration on the test's own input (the only data shipped). At W16A16 the noise is ~96 dB below
the signal per tensor; the bound is 1e-3 relative max error (float32 accumulation order differs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qinject import quantize_onnx
from qinject.core.numerics import sqnr_db
from qinject.plan import Plan
from tests.builders import dq_fed, run

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
CASES = sorted(p.name for p in DATA.iterdir()
               if p.name.startswith(("test_Conv", "test_ConvTranspose", "test_Linear")))


def _load_case(case: str) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    folder = DATA / case
    model = onnx.load(str(folder / "model.onnx"))
    inputs = {}
    for i, vi in enumerate(model.graph.input):
        pb = folder / "test_data_set_0" / f"input_{i}.pb"
        if pb.exists():
            inputs[vi.name] = numpy_helper.to_array(onnx.load_tensor(str(pb)))
    ref = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb")))
    return folder / "model.onnx", inputs, ref


def test_cases_found() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, tmp_path) -> None:
    path, inputs, ref = _load_case(case)
    for bits in (8, 16):
        out = tmp_path / f"q{bits}.onnx"
        # force: the grouped/depthwise cases are here to check their quantized numerics
        result = quantize_onnx(path, out, plan=Plan.uniform(bits, bits), calib=inputs, progress=False, force=True)
        q = onnx.load(str(out))
        assert result.quantized and dq_fed(q) == []
        got = run(q, inputs)[0]
        if bits == 8:
            assert sqnr_db(ref, got) >= 25, f"{case}: {sqnr_db(ref, got):.1f} dB"
        else:
            assert np.abs(ref - got).max() <= 1e-3 * max(np.abs(ref).max(), 1e-6)
