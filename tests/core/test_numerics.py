from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qinject.core import numerics
from qinject.core.numerics import QType


def test_int8_saturation_matches_onnx_table() -> None:
    # ONNX QuantizeLinear: round half to even, then saturate.
    x = np.array([1.2, 3.5, -127.5, 129, -1300, 2.5, -2.5], dtype=np.float32)
    q = numerics.quantize(x, np.float32(1.0), np.int8(0), QType(8, True))
    assert q.tolist() == [1, 4, -128, 127, -128, 2, -2]
    assert q.dtype == np.int8


def test_uint8_with_zero_point() -> None:
    q = numerics.quantize(np.array([-1.0, 0.0, 0.5, 10.0]), np.float32(0.5), np.uint8(2), QType(8, False))
    assert q.tolist() == [0, 2, 3, 22]


@pytest.mark.parametrize("bits,signed,lo,hi,dtype", [
    (4, True, -8, 7, ml_dtypes.int4), (4, False, 0, 15, ml_dtypes.uint4),
    (8, True, -128, 127, np.int8), (16, False, 0, 65535, np.uint16)])
def test_qtype_ranges(bits, signed, lo, hi, dtype) -> None:
    t = QType(bits, signed)
    assert (t.qmin, t.qmax, t.numpy_dtype) == (lo, hi, np.dtype(dtype))


def test_qtype_rejects_other_widths() -> None:
    with pytest.raises(ValueError):
        QType(3, True)


def test_asymmetric_range_maps_ends_exactly() -> None:
    t = QType(8, False)
    scale, zp = numerics.scale_zero_point(-1.0, 3.0, t, symmetric=False)
    assert scale == pytest.approx(4.0 / 255)
    assert numerics.quantize(np.array([-1.0, 3.0, 0.0]), scale, zp, t).tolist() == [0, 255, int(zp)]
    # Zero is exactly representable.
    assert numerics.dequantize(np.array([zp]), scale, zp)[0] == 0.0


def test_symmetric_uses_restricted_range() -> None:
    t = QType(8, True)
    scale, zp = numerics.scale_zero_point(-2.0, 1.0, t, symmetric=True)
    assert zp == 0 and scale == pytest.approx(2.0 / 127)
    assert numerics.quantize(np.array([-2.0, 2.0]), scale, zp, t).tolist() == [-127, 127]


def test_scale_never_zero_or_nan() -> None:
    for lo, hi in [(0.0, 0.0), (1e-45, 1e-45), (-1e-40, 0.0)]:
        for sym in (True, False):
            scale, _ = numerics.scale_zero_point(lo, hi, QType(8, True), sym)
            assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    with pytest.raises(ValueError, match="not finite"):
        numerics.scale_zero_point(np.nan, 1.0, QType(8, True), True)


def test_per_channel_quantize_dequantize_error_bounded(rng) -> None:
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([1, 10, 0.1, 0]).reshape(4, 1, 1, 1)
    t = QType(8, True)
    lo, hi = numerics.weight_range(w, axis=0)
    scale, zp = numerics.scale_zero_point(lo, hi, t, symmetric=True)
    err = np.abs(numerics.fake_quantize(w, scale, zp, t, axis=0) - w)
    assert np.all(err <= scale.reshape(4, 1, 1, 1) / 2 + 1e-7)


def test_sqnr() -> None:
    x = np.ones(100)
    assert numerics.sqnr_db(x, x) == float("inf")
    assert numerics.sqnr_db(x, x * 1.1) == pytest.approx(20.0)
