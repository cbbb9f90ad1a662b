"""The Python entry points: load, quantize and save ONNX models."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from qinject import ir as qir
from qinject.backends import onnx_backend
from qinject.frontends.onnx_frontend import load_onnx
from qinject.pass_manager import PassManager
from qinject.plan import Plan

__all__ = ["QuantizeResult", "load_onnx", "quantize_onnx", "save_onnx", "standard_pipeline"]


@dataclass
class QuantizeResult:
    """What ``quantize_onnx`` produced.

    Attributes:
        model: the quantized IR model.
        plan: the plan applied.
        output: the file written, if any.
        quantized: names of the nodes that were quantized.
        notes: per node, why part of it stayed float (e.g. a bias that would overflow int32).
        timings: seconds spent in each pass.
    """

    model: ir.Model
    plan: Plan
    output: Path | None = None
    quantized: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)


def standard_pipeline(plan: Plan, calib: object = None, method: str = "minmax", batch_size: int = 16,
                      percentile: float = 99.99, progress: bool = True) -> list:
    """The passes of ``qinject quantize``, in order."""
    from qinject.passes import Calibrate, FoldConvAffine, FoldConstantWeights, InsertQDQ, UpgradeOpset

    return [
        FoldConstantWeights(),
        FoldConvAffine(),
        UpgradeOpset(plan.min_opset()),
        Calibrate(calib, method=method, batch_size=batch_size, progress=progress),
        InsertQDQ(plan, method=method, percentile=percentile),
    ]


def quantize_onnx(model: str | os.PathLike | onnx.ModelProto | ir.Model, output: str | os.PathLike | None = None,
                  *, plan: Plan | None = None, calib: object = None, method: str = "minmax",
                  batch_size: int = 16, percentile: float = 99.99, progress: bool = True) -> QuantizeResult:
    """Quantize an ONNX model: fold constants, calibrate, insert Q/DQ, and optionally save.

    Args:
        model: a path, a ModelProto, or an IR model (modified in place).
        output: where to write the quantized model (atomically; never over the input).
        plan: per-node choices; default W8A8 per-channel for every quantizable node.
        calib: calibration data (see ``qinject.calib_data``); None calibrates on random inputs.
        method: activation range method: minmax, percentile, mse or entropy.

    Example:
        >>> result = quantize_onnx("models/digits_cnn/model.onnx", "/tmp/q.onnx",
        ...                        calib="models/digits_cnn/calib.npz")  # doctest: +SKIP
    """
    plan = plan or Plan()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        onnx_backend.check_output_path(output, input_path)  # before any work, not after calibration
    ir_model = model if isinstance(model, ir.Model) else load_onnx(model)
    manager = PassManager(standard_pipeline(plan, calib, method, batch_size, percentile, progress))
    ir_model = manager.run(ir_model).model
    result = QuantizeResult(ir_model, plan, timings=manager.timings)
    for node in ir_model.graph:
        if qir.QUANT_APPLIED in node.meta:
            result.quantized.append(node.name)
        if node.meta.get(qir.QUANT_NOTES):
            result.notes[node.name] = list(node.meta[qir.QUANT_NOTES])
    if output is not None:
        result.output = save_onnx(ir_model, output, input_path=input_path)
    return result


def save_onnx(model: ir.Model, path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Write the model atomically after a full onnx.checker check."""
    return onnx_backend.save(model, path, input_path=input_path)

