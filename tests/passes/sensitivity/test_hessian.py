"""The Hessian-trace signal: Hutchinson's estimate against exact traces (an analytic quadratic, and
``jax.hessian`` on small nets under each loss), HAWQ's Ω against an outlier, determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import Calibrate, FoldConstants, FoldConvAffine, UpgradeOpset
from qinject.passes.sensitivity.base import EVALUATIONS, AnalysisData, ranking, signal_of
from qinject.passes.sensitivity.hessian import Hessian

from qinject.backends import onnx_backend
from qinject.backends.jax_backend import to_jax_with_weights
from qinject.core import op_facts
from qinject.core.pass_manager import PassManager
from qinject.frontends.jax_frontend import trace_jax
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import conv_net, matmul_net


def _prepared(source, calib: dict):
    model = source if not isinstance(source, onnx.ModelProto) else load_onnx(source)
    PassManager([FoldConstants(), FoldConvAffine(), UpgradeOpset(21), Calibrate(calib, progress=False)]).run(model)
    return model


def _weight(model, node: str) -> np.ndarray:
    (found,) = [n for n in model.graph if n.name == node]
    return op_facts.weight_of(found).const_value.numpy()


def test_quadratic_trace_is_exact_and_converges(rng) -> None:
    # y = x @ W with one output column: not a classifier, so the loss is the NMSE to the float
    # outputs, mean_n (x_n·(W - W0))² / s with s = mean((X W0)²): exactly quadratic in W, with
    # Hessian 2/(N s) XᵀX and trace 2/(N s) ||X||².
    n, k = 2000, 4
    x = rng.standard_normal((n, k)).astype(np.float32)
    w0 = rng.standard_normal((k, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(w0, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = _prepared(proto, {"x": x[:64]})
    # Batches of 512: the last one (464 samples) is padded, and the padding must not count.
    Hessian({"x": x}, samples=n, batch_size=512, progress=False)(model)
    value = signal_of(model, "hessian")["lin"]
    s = np.mean((x.astype(np.float64) @ w0) ** 2)
    exact = 2.0 / (n * s) * np.sum(x.astype(np.float64) ** 2)
    assert value.details["loss"] == "nmse" and value.details["parameters"] == k
    assert value.details["trace"] == pytest.approx(exact, rel=0.03)
    assert value.details["trace_per_param"] == pytest.approx(value.details["trace"] / k)
    assert value.details["converged"] and value.details["iterations"] < 100
    # Ω = trace / n · ||Q_b(W) - W||², W quantized symmetric over its one output channel.
    scale = np.abs(w0).max() / 7
    error = np.sum((np.clip(np.rint(w0 / scale), -7, 7) * scale - w0.astype(np.float64)) ** 2)
    assert value.details["weight_sq_error"][4] == pytest.approx(error, rel=1e-5)
    assert value.score[4] == pytest.approx(value.details["trace_per_param"] * error, rel=1e-5)
    assert value.score[16] < value.score[8] < value.score[4]
    assert model.meta[EVALUATIONS]["hessian"][0] == value.details["iterations"]


def test_an_outlier_weight_makes_its_node_the_most_sensitive_at_4_bits(rng) -> None:
    # Input channel 0 is always zero, so conv1's weights reading it do not change the function:
    # an outlier there leaves the model and its Hessian as they are and only coarsens the 4-bit
    # grid of its output channel (the quantization error term of Ω).
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    x[:, 0] = 0
    values = []
    for outlier in (False, True):
        proto = conv_net()
        if outlier:
            w1 = proto.graph.initializer[0]
            array = numpy_helper.to_array(w1).copy()
            array[0, 0].flat[np.argmax(np.abs(array[0, 0]))] *= 50
            w1.CopyFrom(numpy_helper.from_array(array, "w1"))
        model = _prepared(proto, {"x": x[:16]})
        Hessian({"x": x}, max_iter=30, progress=False)(model)
        values.append(signal_of(model, "hessian"))
        assert (ranking(model, "hessian", 4)[0] == "conv1") == outlier
    before, after = (v["conv1"] for v in values)
    assert after.details["trace"] == pytest.approx(before.details["trace"], rel=1e-4)
    assert after.details["weight_sq_error"][4] > 5 * before.details["weight_sq_error"][4]
    assert after.score[4] > 5 * before.score[4]


def _mlp(params: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["fc1.weight"].T + params["fc1.bias"])
    a = h.reshape(-1, 2, 3)  # per-sample "attention": two dots of activations, no weight
    h = h + 0.1 * (a @ a.transpose(0, 2, 1) @ a).reshape(-1, 6)
    return h @ params["fc2.weight"].T + params["fc2.bias"]


def _exact_traces(loss, weights: dict, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        w = jnp.asarray(weights[name])
        h = jax.jit(jax.hessian(lambda a, name=name: loss({**weights, name: a})))(w)
        out[name] = float(jnp.trace(h.reshape(w.size, w.size)))
    return out


def _check_against_exact(model, exact_by_node: dict[str, float], loss_kind: str) -> None:
    values = signal_of(model, "hessian")
    for name in set(values) - set(exact_by_node):  # every other quantizable node has no weight: Ω = 0
        assert values[name].details == {"weight": None} and set(values[name].score.values()) == {0.0}
    for name, exact in exact_by_node.items():
        d = values[name].details
        assert d["loss"] == loss_kind
        # Hutchinson: within four standard errors of the exact trace (and a few percent).
        assert abs(d["trace"] - exact) <= max(4 * d["trace_stderr"], 0.02 * abs(exact)), (name, d, exact)


def test_jax_sourced_graph_with_labels_matches_the_exact_trace(rng) -> None:
    params = {"fc1.weight": (rng.standard_normal((6, 8)) * 0.5).astype(np.float32),
              "fc1.bias": np.zeros(6, np.float32),
              "fc2.weight": (rng.standard_normal((3, 6)) * 0.5).astype(np.float32),
              "fc2.bias": np.zeros(3, np.float32)}
    x = rng.standard_normal((40, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 40)
    model = _prepared(trace_jax(_mlp, params, x[:16]), {"x": x[:16]})  # traced at batch 16: 40 = 16+16+8
    Hessian(AnalysisData({"x": x}, labels), progress=False)(model)
    assert len(signal_of(model, "hessian")) == 4  # fc1, fc2 and the two activation dots

    def cross_entropy(p: dict) -> jax.Array:
        logq = jax.nn.log_softmax(_mlp(p, x), axis=1)
        return -jnp.mean(logq[np.arange(len(x)), labels])

    # The traced graph reads the transposed weights (constants folded at trace time): same trace.
    exact = _exact_traces(cross_entropy, params, ["fc1.weight", "fc2.weight"])
    _check_against_exact(model, {"fc1": exact["fc1.weight"], "fc2": exact["fc2.weight"]}, "cross-entropy")


def test_onnx_graph_with_probabilities_out_matches_the_exact_kl_trace(rng) -> None:
    proto = matmul_net()  # the first weight comes from a Constant node, which the preparation folds
    proto.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="softmax", axis=1))
    proto.graph.output[0].name = "p"
    x = rng.standard_normal((50, 16)).astype(np.float32)
    model = _prepared(proto, {"x": x[:16]})
    Hessian({"x": x}, batch_size=32, progress=False)(model)
    fn, weights = to_jax_with_weights(model)
    p_ref = np.asarray(fn(weights, x), np.float64)
    assert np.allclose(p_ref.sum(axis=1), 1)  # already probabilities: used as they are, no softmax

    def kl(w: dict) -> jax.Array:
        return jnp.mean(jnp.sum(p_ref * (np.log(p_ref) - jnp.log(fn(w, x))), axis=1))

    names = {n.name: op_facts.weight_of(n).name for n in model.graph if n.name in ("mm1", "mm2")}
    exact = _exact_traces(kl, weights, list(names.values()))
    _check_against_exact(model, {node: exact[w] for node, w in names.items()}, "kl")


def test_deterministic_for_a_seed_and_the_model_is_untouched(rng) -> None:
    x = rng.standard_normal((48, 16)).astype(np.float32)
    runs = []
    for seed in (0, 0, 1):
        model = _prepared(matmul_net(), {"x": x[:16]})
        before = onnx_backend.to_proto(model).SerializeToString()
        result = Hessian({"x": x}, seed=seed, max_iter=20, progress=False)(model)
        assert not result.modified and onnx_backend.to_proto(model).SerializeToString() == before
        runs.append({name: (v.score, v.details) for name, v in signal_of(model, "hessian").items()})
        hvps, seconds = model.meta[EVALUATIONS]["hessian"]
        assert hvps == sum(d["iterations"] for _, d in runs[-1].values()) and seconds > 0
    assert set(runs[0]) == {"mm1", "mm2"}
    assert runs[0] == runs[1]
    assert runs[0]["mm1"][1]["trace"] != runs[2]["mm1"][1]["trace"]
