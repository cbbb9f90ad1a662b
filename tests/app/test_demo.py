"""The main job on the bundled model: real accuracy, real integer kernels, a real speed-up measured."""

from __future__ import annotations

from qinject.app.demo import run_demo


def test_demo_report(tmp_path) -> None:
    lines: list[str] = []
    report = run_demo(tmp_path, echo=lines.append)
    assert report["float_accuracy"] > 0.97
    assert report["quant_accuracy"] >= report["float_accuracy"] - 0.01  # within 1 point of float
    assert report["agreement"] >= 0.98
    assert report["kernels"].get("QLinearConv") == 3  # every Conv runs as onnxruntime's integer kernel
    assert report["quant_bytes"] < report["float_bytes"] / 3
    assert report["float_ms"] > 0 and report["quant_ms"] > 0  # measured, not asserted: the machine is shared
    assert any("top-1 accuracy" in line for line in lines)
    search = report["search"]  # the mixed-precision flow: measured within budget, few evaluations
    assert search.score >= search.floor and search.evaluations <= 6
    assert report["quant_accuracy"] == search.score  # the written file is the plan the search measured
    fast = report["accelerator_search"]
    assert fast.score >= fast.floor and fast.evaluations <= 6 and fast.latency_us <= fast.sixteen_bit_us
    assert (tmp_path / "digits_cnn.mixed.plan.json").exists() and (tmp_path / "digits_cnn.nvidia-a100.onnx").exists()
