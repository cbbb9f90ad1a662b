"""``qinject demo``: the main job on the bundled model, with a short report.

The full mixed-precision flow on the digits CNN of ``models/digits_cnn``: calibrate on its
calibration split, rank the nodes by sensitivity (quant-error), search per-node bit widths (bisection)
minimising the estimated latency on this machine's table (``local-cpu``) within a 1% relative
accuracy budget on the held-out split, rewrite, and emit. Then it measures, on the held-out split,
accuracy of float vs quantized, onnxruntime CPU latency at batch 64, file sizes, and which integer
kernels onnxruntime actually fused. Last, the same search for an accelerator (``nvidia-a100``'s
spec-sheet table, batch 256, AdaRound on the 4-bit weights) shows where that target puts 4 bits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from qinject.app.api import SearchOptions, quantize_onnx
from qinject.backends import onnx_backend
from qinject.core.errors import QinjectError
from qinject.core.search_result import format_result
from qinject.runtime import measure

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "digits_cnn"


def run_demo(out: Path, echo: Callable[[str], None] = print, model_dir: Path = MODEL_DIR) -> dict:
    """Run the demo and return its measurements (also printed through ``echo``)."""
    model, calib, evaluation = model_dir / "model.onnx", model_dir / "calib.npz", model_dir / "eval.npz"
    for f in (model, calib, evaluation):
        if not f.is_file():
            raise QinjectError(f"bundled model file {str(f)!r} is missing (run from a clone of the repository)")
    out.mkdir(parents=True, exist_ok=True)
    output = out / "digits_cnn.mixed.onnx"
    echo(f"searching bit widths for {model} on local-cpu within a 1% accuracy drop "
         f"(calibration: {calib.name}, evaluation: {evaluation.name})")
    result = quantize_onnx(model, output, calib=calib, target="local-cpu", latency_batch=64,
                           search=SearchOptions(max_drop="1%", eval_data=evaluation, search="bisection"))
    result.plan.save(out / "digits_cnn.mixed.plan.json")
    echo(format_result(result.search))

    with np.load(evaluation) as data:
        inputs, labels = {"input": data["input"]}, data["labels"]
    float_sess, quant_sess = onnx_backend.session(model), onnx_backend.session(output)
    float_logits, quant_logits = measure.predict(float_sess, inputs), measure.predict(quant_sess, inputs)
    batch = {"input": inputs["input"][:64]}
    report = {
        "search": result.search,
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
    widths = ", ".join(f"{v} x {k}" for k, v in sorted(result.search.width_counts().items()))
    echo(f"  nodes quantized      {report['nodes_quantized']} ({widths}; weights per channel)")
    echo(f"  top-1 accuracy       float {report['float_accuracy']:.2%}  ->  quantized {report['quant_accuracy']:.2%}"
         f"  ({(report['quant_accuracy'] - report['float_accuracy']) * 100:+.2f} pt)")
    echo(f"  prediction agreement {report['agreement']:.2%}   logits SQNR {report['sqnr_db']:.1f} dB")
    echo(f"  latency (batch 64)   float {report['float_ms']:.3f} ms  ->  quantized {report['quant_ms']:.3f} ms"
         f"  ({report['float_ms'] / report['quant_ms']:.2f}x)")
    echo(f"  file size            {report['float_bytes'] / 1e3:.0f} kB  ->  {report['quant_bytes'] / 1e3:.0f} kB"
         f"  ({report['float_bytes'] / report['quant_bytes']:.1f}x smaller)")
    kernels = ", ".join(f"{k} x{v}" for k, v in sorted(report["kernels"].items())) or "none"
    echo(f"  onnxruntime integer kernels: {kernels}")
    echo(f"  search               {result.search.evaluations} full-model evaluations, estimated "
         f"{result.search.saving_vs_16_bit:.1%} faster than W16A16 on local-cpu")
    echo(f"  wrote {output}, its plan and search report")

    accelerator = out / "digits_cnn.nvidia-a100.onnx"
    echo("")
    echo("the same search for an accelerator (nvidia-a100 spec-sheet table, batch 256, AdaRound on any node "
         "at 4 bits; the A100 runs W4A8 on its int8 units, so 4 bits are searched only where they save 1%):")
    fast = quantize_onnx(model, accelerator, calib=calib, target="nvidia-a100", latency_batch=256, progress=False,
                         search=SearchOptions(max_drop="1%", eval_data=evaluation, adaround=True))
    fast.plan.save(out / "digits_cnn.nvidia-a100.plan.json")
    echo(format_result(fast.search))
    report["accelerator_search"] = fast.search
    return report

