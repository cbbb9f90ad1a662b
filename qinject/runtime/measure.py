"""Measurements on real executions: latency, accuracy, fidelity, and which integer kernels ran."""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qinject.backends import onnx_backend
from qinject.core.calib_data import rows, take
from qinject.core.numerics import sqnr_db

Model = Union[str, Path, onnx.ModelProto, ir.Model]

# Rounds of ``interleaved_latency``: the budget decides between these. The cap is high because a
# sub-millisecond model needs thousands of runs for a median steady to a few percent on a shared
# machine: capped at 50 rounds, a 0.3 ms BERT export was timed for 30 ms of a 2 s budget, measured
# 0.95x of float in quantize and 1.09x-1.16x in the benchmark minutes later.
MIN_ROUNDS, MAX_ROUNDS = 5, 5000

# onnxruntime's CPU integer kernels that a fused Q/DQ group becomes.
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd",
                             "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool"})


def fused_kernels(model_path: str | Path) -> Counter:
    """Op types of onnxruntime's optimised graph for a model file (what actually runs on the CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        onnx_backend.session(model_path, onnx_backend.session_options(optimized_path=str(optimized)))
        proto = onnx.load(str(optimized), load_external_data=False)
    return Counter(n.op_type for n in proto.graph.node)


def latency_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int = 5,
               repeats: int = 30) -> float:
    """Median wall time of one run, in milliseconds."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def predict(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """First output of the model over all samples, batched."""
    outs = [sess.run(None, take(inputs, slice(i, i + batch)))[0] for i in range(0, rows(inputs), batch)]
    return np.concatenate(outs)


def compare_latency(float_path: str | Path, quantized_path: str | Path, feeds: dict[str, np.ndarray],
                    budget_s: float = 3.0) -> tuple[float, float]:
    """Median latency (ms) of the float and the quantized model on ``feeds``, runs interleaved so that
    drift on a shared machine hits both alike; about ``budget_s`` seconds in all."""
    float_ms, quantized_ms = interleaved_latency([float_path, quantized_path], feeds, budget_s)
    return float_ms, quantized_ms


def interleaved_latency(models: Sequence[Model], feeds: dict[str, np.ndarray], budget_s: float = 3.0
                        ) -> list[float]:
    """Median latency (ms) of each model (a file, a proto or an IR model) on ``feeds``, one run of
    each in turn, repeated, so that drift on a shared machine hits all alike; about ``budget_s``
    seconds in all (at least ``MIN_ROUNDS`` rounds, at most ``MAX_ROUNDS``).

    The sessions do not spin, and each round starts one model later: with spinning on a machine
    shared with other work, a session's idle worker threads compete with the next session's run, so
    the place in the round decided the result (one SqueezeNet rewrite measured 0.34x of float run
    right after it, 0.53x two places later; without spinning, 0.44x in both places)."""
    sessions = [onnx_backend.session(m, quiet_session_options()) for m in models]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds_each = [{k: v for k, v in feeds.items() if k in n} for n in names]
    first = []
    for sess, feed in zip(sessions, feeds_each):  # warm-up, and the time one run takes
        sess.run(None, feed)
        start = time.perf_counter()
        sess.run(None, feed)
        first.append(time.perf_counter() - start)
    repeats = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / max(sum(first), 1e-6))))
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(repeats):
        for k in range(len(sessions)):
            i = (r + k) % len(sessions)
            start = time.perf_counter()
            sessions[i].run(None, feeds_each[i])
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t) * 1e3) for t in times]


def quiet_session_options() -> ort.SessionOptions:
    """Options for timing beside other sessions: the default threads, idle workers that sleep."""
    return onnx_backend.session_options(spinning=False)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


__all__ = ["INTEGER_KERNELS", "compare_latency", "fused_kernels", "interleaved_latency", "latency_ms", "predict",
           "quiet_session_options", "sqnr_db", "top1_accuracy", "top1_agreement"]
