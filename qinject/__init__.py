"""qinject: a compiler-pass quantization injector.

Lower a model to one graph IR, annotate it with analysis passes, choose bit widths, insert
QuantizeLinear/DequantizeLinear, and emit an executable. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from qinject.app.api import (
    FinetuneOptions,
    QuantizeResult,
    SearchOptions,
    analyze,
    estimate_latency,
    export_onnx,
    finetune,
    load_onnx,
    quantize_jax,
    quantize_onnx,
    save_onnx,
    to_jax,
    trace_jax,
)
from qinject.core.errors import QinjectError
from qinject.core.plan import NodeQuant, Plan

__all__ = [
    "FinetuneOptions",
    "NodeQuant",
    "Plan",
    "QinjectError",
    "QuantizeResult",
    "SearchOptions",
    "analyze",
    "estimate_latency",
    "export_onnx",
    "finetune",
    "load_onnx",
    "quantize_jax",
    "quantize_onnx",
    "save_onnx",
    "to_jax",
    "trace_jax",
]
__version__ = "0.1.0"
