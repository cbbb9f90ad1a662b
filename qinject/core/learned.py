"""Learned quantization parameters: what fine-tuning (``passes/rounding/finetune.py``) hands the rewrite.

Fine-tuning learns a scale and zero point per activation point and per weight; ``InsertQDQ`` writes
them instead of the ones it would compute from calibration statistics or the weight's range, so a
fine-tuned model is written in exactly the QDQ form of a plain one. They are kept in ``meta`` of the
value they quantize (an activation tensor, or a weight initializer), keyed by how it is quantized,
since one tensor may be read at two widths: a learned 4-bit scale must not be applied at 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qinject.core.numerics import QType

LEARNED = "qinject.finetune.learned"  # value meta: {(qtype, symmetric, axis): Learned}


@dataclass(frozen=True)
class Learned:
    """A learned scale and zero point (per tensor: 0-d; per channel: 1-d along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray


def learned(value: ir.Value, qtype: QType, symmetric: bool, axis: int | None = None) -> Learned | None:
    """The scale and zero point learned for ``value`` quantized this way (None: none learned)."""
    return value.meta.get(LEARNED, {}).get((qtype, symmetric, axis))


def set_learned(value: ir.Value, qtype: QType, symmetric: bool, axis: int | None, scale: np.ndarray,
                zero_point: np.ndarray) -> None:
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point).astype(qtype.numpy_dtype)
    value.meta.setdefault(LEARNED, {})[(qtype, symmetric, axis)] = Learned(scale, zero_point)


__all__ = ["LEARNED", "Learned", "learned", "set_learned"]
