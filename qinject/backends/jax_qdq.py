"""Quantization parameters as the JAX backend reads them from the graph, and the numerics of the
plan's run-time modes (``qinject.plan``): ONNX DynamicQuantizeLinear and block-wise scales.

Shared by the interpreter (``jax_backend``) and its integer kernels (``jax_integer``), which both
import it; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from jax import lax

from qinject.backends.jax_ops import attr
from qinject.core import numerics
from qinject.core.errors import UnsupportedModelError

DYNAMIC_QTYPE = numerics.QType(8, False)  # DynamicQuantizeLinear always writes uint8


@dataclass(frozen=True)
class QParams:
    """The static parameters of a QuantizeLinear/DequantizeLinear node.

    Attributes:
        scale, zero_point: per tensor (0-d), per axis (1-d along ``axis``) or per block (the rank of
            the quantized tensor, ``ceil(n / block_size)`` long along ``axis``).
        axis: the axis the parameters vary along (None: per tensor).
        qtype: the integer type (None for int32 bias codes, which are never quantized here).
        block_size: the block length along ``axis`` (0: not block-wise).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    qtype: numerics.QType | None
    block_size: int = 0


def qparams(node: ir.Node, constants: dict[str, np.ndarray]) -> QParams:
    """Scale, zero point, axis and integer type of a QuantizeLinear/DequantizeLinear node.

    Raises:
        UnsupportedModelError: if the scale or zero point is not a constant.
    """
    def const(i: int) -> np.ndarray | None:
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        array = constants.get(node.inputs[i].name)
        if array is None:
            raise UnsupportedModelError(f"node {node.name!r}: input {i} ({node.inputs[i].name!r}) must be a "
                                        "constant for the JAX backend")
        return np.asarray(array)

    scale, zero_point = const(1), const(2)
    if zero_point is None:
        zero_point = np.zeros((), codes_dtype(node))
    block_size = attr(node, "block_size", 0)
    axis = param_axis(node, scale.ndim, scale.size)
    qtype = qtype_of(zero_point.dtype)
    if node.op_type == "QuantizeLinear" and qtype is None:
        raise UnsupportedModelError(f"node {node.name!r}: quantizing to {zero_point.dtype} is not supported")
    return QParams(scale.astype(np.float32), zero_point, axis, qtype, block_size if axis is not None else 0)


def codes_dtype(node: ir.Node) -> np.dtype:
    """The integer type of a Q/DQ node's codes when its zero point is omitted: a DequantizeLinear's
    input type (int8 weights are often written without one), else QuantizeLinear's default uint8."""
    codes = node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
    dtype = np.dtype(codes.dtype.numpy()) if codes is not None and codes.dtype is not None else None
    return dtype if dtype is not None and qtype_of(dtype) is not None else np.dtype(np.uint8)


def param_axis(node: ir.Node, ndim: int, size: int) -> int | None:
    """The axis a Q/DQ node's scale varies along: per axis (a vector), per block (a block_size), or
    None (per tensor)."""
    if attr(node, "block_size", 0) > 0 and ndim > 0:
        return attr(node, "axis", 1)
    return attr(node, "axis", 1) if ndim == 1 and size > 1 else None


def qtype_of(dtype: np.dtype) -> numerics.QType | None:
    for (bits, signed), np_dtype in numerics._NUMPY_DTYPES.items():
        if np.dtype(np_dtype) == dtype:
            return numerics.QType(bits, signed)
    return None


def expand_blocks(param: Any, axis: int, block_size: int, length: int, *, xp: Any = np) -> Any:
    """A block-wise scale or zero point repeated to one value per element along ``axis``.

    The last block may be partial (``length`` not a multiple of ``block_size``), as in ONNX's
    block-wise DequantizeLinear: its value covers only the remaining elements.
    """
    full = xp.repeat(xp.asarray(param), block_size, axis=axis)
    index = [slice(None)] * full.ndim
    index[axis] = slice(0, length)
    return full[tuple(index)]


def dynamic_quantize(x: Any, *, xp: Any = np, rint: Any = None) -> tuple[Any, Any, Any]:
    """ONNX DynamicQuantizeLinear: ``(codes, scale, zero_point)`` of ``x``'s own range, uint8.

    ``scale = (max(0, max x) - min(0, min x)) / 255``, ``zero_point = saturate(round(-min / scale))``
    and ``codes = saturate(round(x / scale) + zero_point)``, rounding half to even, all in float32
    as onnxruntime computes them. An all-zero ``x`` gets scale 1 (onnxruntime's choice; 0 would
    divide by zero). Codes and zero point are returned held in float32; ``rint`` defaults to
    ``xp.rint`` (the simulated backend passes a straight-through rounding).
    """
    rint = rint or xp.rint
    x = xp.asarray(x, dtype=np.float32)
    lo = xp.minimum(xp.min(x), np.float32(0))
    hi = xp.maximum(xp.max(x), np.float32(0))
    levels = np.float32(DYNAMIC_QTYPE.qmax - DYNAMIC_QTYPE.qmin)
    if xp is not np:
        # Opaque to XLA, which otherwise multiplies by the rounded reciprocal of the constant
        # (XLA:CPU, measured: 1 ulp off onnxruntime's scale for ~2 ranges in 3).
        levels = lax.optimization_barrier(xp.asarray(levels))
    scale = (hi - lo) / levels
    scale = xp.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    zero_point = xp.clip(rint(-lo / scale), DYNAMIC_QTYPE.qmin, DYNAMIC_QTYPE.qmax)
    codes = xp.clip(rint(x / scale) + zero_point, DYNAMIC_QTYPE.qmin, DYNAMIC_QTYPE.qmax)
    return codes, scale, zero_point
