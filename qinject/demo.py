"""``qinject demo``: the main job on the bundled model, with a short report.

Quantizes the digits CNN of ``models/digits_cnn`` at W8A8 (per-channel weights, calibrated on its
calibration split), then measures, on the held-out split, accuracy of float vs quantized, onnxruntime
CPU latency at batch 64, file sizes, and which integer kernels onnxruntime actually fused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from qinject import measure
from qinject.api import quantize_onnx
from qinject.backends import onnx_backend
from qinject.errors import QinjectError
from qinject.plan import Plan

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "digits_cnn"


def run_demo(out: Path, echo: Callable[[str], None] = print, model_dir: Path = MODEL_DIR) -> dict:
    """Run the demo and return its measurements (also printed through ``echo``)."""
    model, calib, evaluation = model_dir / "model.onnx", model_dir / "calib.npz", model_dir / "eval.npz"
    for f in (model, calib, evaluation):
        if not f.is_file():
            raise QinjectError(f"bundled model file {str(f)!r} is missing (run from a clone of the repository)")
    out.mkdir(parents=True, exist_ok=True)
    output = out / "digits_cnn.w8a8.onnx"
    plan = Plan.uniform(8, 8)
    echo(f"quantizing {model} at W8A8 (per-channel), calibrating on {calib.name}")
    result = quantize_onnx(model, output, plan=plan, calib=calib)
    plan.save(out / "digits_cnn.w8a8.plan.json")

    with np.load(evaluation) as data:
        inputs, labels = {"input": data["input"]}, data["labels"]
    float_sess, quant_sess = onnx_backend.session(model), onnx_backend.session(output)
    float_logits, quant_logits = measure.predict(float_sess, inputs), measure.predict(quant_sess, inputs)
    batch = {"input": inputs["input"][:64]}
    report = {
        "nodes_quantized": len(result.quantized),
        "float_accuracy": measure.top1_accuracy(float_logits, labels),
        "quant_accuracy": measure.top1_accuracy(quant_logits, labels),
        "agreement": measure.top1_agreement(float_logits, quant_logits),
        "sqnr_db": measure.sqnr_db(float_logits, quant_logits),
        "float_ms": measure.latency_ms(float_sess, batch),
        "quant_ms": measure.latency_ms(quant_sess, batch),
        "float_bytes": model.stat().st_size,
        "quant_bytes": output.stat().st_size,
        "kernels": {k: v for k, v in measure.fused_kernels(output).items() if k in measure.INTEGER_KERNELS},
    }
    n = len(labels)
    echo("")
    echo(f"qinject demo: digits CNN, {n} held-out images")
    echo(f"  nodes quantized      {report['nodes_quantized']} (W8A8, weights per channel)")
    echo(f"  top-1 accuracy       float {report['float_accuracy']:.2%}  ->  int8 {report['quant_accuracy']:.2%}"
         f"  ({(report['quant_accuracy'] - report['float_accuracy']) * 100:+.2f} pt)")
    echo(f"  prediction agreement {report['agreement']:.2%}   logits SQNR {report['sqnr_db']:.1f} dB")
    echo(f"  latency (batch 64)   float {report['float_ms']:.3f} ms  ->  int8 {report['quant_ms']:.3f} ms"
         f"  ({report['float_ms'] / report['quant_ms']:.2f}x)")
    echo(f"  file size            {report['float_bytes'] / 1e3:.0f} kB  ->  {report['quant_bytes'] / 1e3:.0f} kB"
         f"  ({report['float_bytes'] / report['quant_bytes']:.1f}x smaller)")
    kernels = ", ".join(f"{k} x{v}" for k, v in sorted(report["kernels"].items())) or "none"
    echo(f"  onnxruntime integer kernels: {kernels}")
    echo(f"  wrote {output} and its plan")
    return report
