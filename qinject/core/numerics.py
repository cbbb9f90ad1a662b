"""Pure quantization numerics: integer types, scale/zero-point math, quantize and dequantize.

Nothing here imports the IR. Rounding and saturation follow ONNX QuantizeLinear exactly
(round half to even, then saturate), so what this module computes is what onnxruntime computes.
The same functions serve the ONNX path (numpy, ``xp=np``) and the JAX backend (``xp=jax.numpy``,
where ``rint`` may be a straight-through rounding so gradients flow through simulated quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# The smallest scale ever written: a zero or denormal scale makes DequantizeLinear produce NaN/Inf
# downstream, and onnxruntime rejects a zero scale outright.
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**20


@dataclass(frozen=True)
class QType:
    """An integer storage type for quantized values."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ValueError(f"unsupported bit width {self.bits} (expected 4, 8 or 16)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY_DTYPES[(self.bits, self.signed)])

    @property
    def onnx_name(self) -> str:
        """The ONNX element type name (INT8, UINT4, ...)."""
        return f"{'' if self.signed else 'U'}INT{self.bits}"

    @property
    def min_opset(self) -> int:
        """The first default-domain opset whose QuantizeLinear/DequantizeLinear accept this type."""
        return 10 if self.bits == 8 else 21

    def __str__(self) -> str:
        return self.onnx_name.lower()


_NUMPY_DTYPES = {
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
    (16, True): np.int16,
    (16, False): np.uint16,
}


def scale_zero_point(
    lo: np.ndarray | float, hi: np.ndarray | float, qtype: QType, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping the real range [lo, hi] onto ``qtype``.

    The range is widened to contain 0 so that real zero (padding, ReLU output) is exact. Symmetric
    signed types use the restricted range [-qmax, qmax], as is standard for weights, so that the
    product of two symmetric values never needs the lone -2^(b-1) code.

    Returns:
        ``(scale, zero_point)``: float32 scale (never zero, NaN or Inf) and zero point in ``qtype``.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("quantization range is not finite (NaN or Inf in the data)")
    if symmetric:
        absmax = np.maximum(-lo, hi)
        scale = absmax / qtype.qmax
        zero_point = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (qtype.qmax - qtype.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.round(qtype.qmin - lo / safe), qtype.qmin, qtype.qmax)
    scale = np.where(scale >= MIN_SCALE, scale, np.where(scale > 0, MIN_SCALE, 1.0))
    return scale.astype(np.float32), zero_point.astype(qtype.numpy_dtype)


def quantize_codes(x, scale, zero_point, qtype: QType, axis: int | None = None, *, xp=np, rint=None):
    """QuantizeLinear's codes, held in float32: ``saturate(rint(x / scale) + zero_point)``.

    ``rint`` defaults to ``xp.rint`` (round half to even); the JAX backend's simulated mode passes a
    straight-through rounding so the codes stay differentiable.
    """
    scale = _broadcastable(scale, x.ndim, axis, xp).astype(np.float32)
    zero_point = _broadcastable(zero_point, x.ndim, axis, xp).astype(np.float32)
    q = (rint or xp.rint)(xp.asarray(x, dtype=np.float32) / scale) + zero_point
    return xp.clip(q, qtype.qmin, qtype.qmax)


def quantize(x, scale, zero_point, qtype: QType, axis: int | None = None, *, xp=np):
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)`` in ``qtype``."""
    if xp is not np:
        return quantize_codes(x, scale, zero_point, qtype, axis, xp=xp).astype(qtype.numpy_dtype)
    # The same formula in place after the one division: weights of the large nets are hundreds of MB.
    scale, zero_point = _broadcastable(scale, x.ndim, axis), _broadcastable(zero_point, x.ndim, axis)
    q = np.divide(np.asarray(x, dtype=np.float32), scale, dtype=np.float32)
    np.rint(q, out=q)
    q += zero_point.astype(np.float32)
    np.clip(q, qtype.qmin, qtype.qmax, out=q)
    return q.astype(qtype.numpy_dtype)


def dequantize(q, scale, zero_point, axis: int | None = None, *, xp=np):
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32 (q may be codes held in float)."""
    scale, zero_point = _broadcastable(scale, q.ndim, axis, xp), _broadcastable(zero_point, q.ndim, axis, xp)
    return ((q.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)).astype(np.float32)


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qtype: QType,
                  axis: int | None = None) -> np.ndarray:
    """Quantize then dequantize: the value the integer model sees, in float."""
    return dequantize(quantize(x, scale, zero_point, qtype, axis), scale, zero_point, axis)


def weight_range(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (axis None) or per-channel min and max of a weight."""
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    other = tuple(i for i in range(w.ndim) if i != axis)
    return w.min(axis=other), w.max(axis=other)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when the two are equal)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.mean((reference - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.mean(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def _broadcastable(p, ndim: int, axis: int | None, xp=np):
    p = xp.asarray(p)
    if p.ndim == 0 or axis is None:
        return p
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)
