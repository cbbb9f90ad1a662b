"""The noise-injection signal."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from qinject.passes import Calibrate, FoldConstants, FoldConvAffine, UpgradeOpset
from qinject.passes.sensitivity.base import EVALUATIONS, AnalysisData, alone, ranking, signal_of
from qinject.passes.sensitivity.noise import Noise, activation_sigma, weight_sigma

from qinject.backends import onnx_backend
from qinject.core.pass_manager import PassManager
from qinject.frontends.onnx_frontend import load_onnx
from qinject.runtime import eval_worker
from qinject.runtime.executor import Executor
from tests.builders import conv_net, matmul_net


def prepared(proto: onnx.ModelProto, x: np.ndarray):
    """The model as the analysis pipeline prepares it: folded, opset 21, calibrated on ``x``."""
    return PassManager([FoldConstants(), FoldConvAffine(), UpgradeOpset(21),
                        Calibrate({"x": x}, progress=False)]).run(load_onnx(proto)).model


def conv_case(outlier: str | None = None, labels: bool = False, n: int = 32):
    proto = conv_net()
    if outlier is not None:  # the largest element of the weight's first output channel x50
        init = next(t for t in proto.graph.initializer if t.name == outlier)
        w = numpy_helper.to_array(init).copy()
        w[0].flat[np.argmax(np.abs(w[0]))] *= 50.0
        init.CopyFrom(numpy_helper.from_array(w, outlier))
    x = np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, 10, n) if labels else None
    return prepared(proto, x), AnalysisData({"x": x}, y)


def scores(model) -> dict:
    return {n: v.score for n, v in signal_of(model, "noise").items()}


def test_damage_grows_as_bits_shrink_and_the_graph_is_untouched():
    for proto, shape in ((conv_net(), (32, 3, 8, 8)), (matmul_net(), (64, 16))):
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        model = prepared(proto, x)
        before = onnx_backend.to_proto(model).SerializeToString()
        Noise(AnalysisData({"x": x}), workers=1, progress=False)(model)
        assert onnx_backend.to_proto(model).SerializeToString() == before
        values = signal_of(model, "noise")
        assert len(values) == (3 if proto.graph.name == "conv_net" else 2)
        for v in values.values():
            assert v.score[4] > v.score[8] > v.score[16] > 0  # KL to float, no labels
            assert v.details["weight_noise_nmse"][4] > v.details["weight_noise_nmse"][8]
            assert v.details["activation_noise_nmse"][4] == v.details["activation_noise_nmse"][8]  # A8 at both
        assert model.meta[EVALUATIONS]["noise"][0] == 1 + len(values) * 3 * 2  # reference; nodes x widths x draws


def test_a_weight_outlier_makes_its_node_the_most_sensitive_at_4_bits():
    plain, data = conv_case()
    spiked, _ = conv_case(outlier="w2")
    for model in (plain, spiked):
        Noise(data, bits=(4,), workers=1, progress=False)(model)
    before, after = signal_of(plain, "noise"), signal_of(spiked, "noise")
    # One channel of 16 gets a 50x larger step, so 2500x the noise variance there: ~150x in all.
    power = [np.mean(np.broadcast_to(weight_sigma(m.graph.node("conv2"), 4), (16, 8, 3, 3)) ** 2)
             for m in (plain, spiked)]
    assert 100 < power[1] / power[0] < 200
    assert after["conv2"].score[4] > 3 * before["conv2"].score[4]
    assert ranking(spiked, "noise", 4)[0] == "conv2"


def test_same_seed_same_results_other_seed_other_results_labels_give_a_loss_change():
    _, data = conv_case(labels=True)
    runs = []
    for seed in (0, 0, 1):
        m, _ = conv_case(labels=True)
        Noise(data, bits=(8, 4), seed=seed, workers=1, progress=False)(m)
        runs.append(scores(m))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    for score in runs[0].values():
        assert all(math.isfinite(s) for s in score.values())
    # A loss change can be negative; its size still follows the noise level.
    assert sum(abs(s[4]) for s in runs[0].values()) > sum(abs(s[8]) for s in runs[0].values())


def test_noise_levels_are_those_of_the_rewrite():
    model, data = conv_case()
    pass_ = Noise(data, workers=1, progress=False)
    nodes = {n.name: n for n in model.graph}
    with Executor(model, data.inputs, workers=1) as ex:
        for bits in (8, 4):
            quantized = ex.quantized(alone("conv2", bits))
            suffix = "" if bits == 8 else "_int4"
            w_scale = quantized.graph.initializers[f"w2_scale{suffix}"].const_value.numpy()
            sigma = weight_sigma(nodes["conv2"], bits).ravel()
            np.testing.assert_allclose(sigma, w_scale / math.sqrt(12), rtol=1e-6)
            a_scale = quantized.graph.initializers["p1_scale"].const_value.numpy()  # A8 at 4 and 8 bits
            assert activation_sigma(nodes["conv2"], 0, bits) == float(a_scale) / math.sqrt(12)
        # The injected weight noise has that per-channel standard deviation.
        w = nodes["fc"].inputs[1].const_value.numpy()
        variant = pass_._variant(model, 2, nodes["fc"], 4, 0, True, False)
        fc = variant.graph.node("fc")
        noise = fc.inputs[1].const_value.numpy() - w
        np.testing.assert_allclose(noise.std(axis=1), weight_sigma(nodes["fc"], 4).ravel(), rtol=0.2)
        assert "w3" not in variant.graph.initializers  # only the noisy copy travels


def test_activation_noise_reaches_only_that_node_and_is_deterministic():
    # x feeds two MatMuls; noise in front of one must leave the other's input clean.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 4))).astype(np.float32), n) for n in ("wa", "wb")]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mma"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="mmb"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    x = rng.standard_normal((300, 8)).astype(np.float32)  # more than one worker chunk (256)
    model = prepared(proto, x)
    pass_ = Noise(AnalysisData({"x": x}), seed=3)
    mma = next(n for n in model.graph if n.name == "mma")
    variant = pass_._variant(model, 0, mma, 4, 0, False, True)
    ops = {n.name: n for n in variant.graph}
    assert ops["mma"].inputs[0].producer().op_type == "Add"
    assert ops["mmb"].inputs[0].name == "x"
    blob = onnx_backend.to_proto(variant).SerializeToString()
    first, second = (eval_worker.run_model(blob, {"x": x}) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    clean = eval_worker.run_model(onnx_backend.to_proto(model).SerializeToString(), {"x": x})
    wa = numpy_helper.to_array(inits[0])
    # y - y_clean = noise @ wa: its spread is that of the injected noise through wa.
    sigma = activation_sigma(mma, 0, 4)
    expected = sigma * np.sqrt((wa**2).sum(axis=0))
    np.testing.assert_allclose((first - clean).std(axis=0), expected, rtol=0.15)
    # Another draw is another pattern; the same draw at another width is the same pattern, scaled.
    other = eval_worker.run_model(onnx_backend.to_proto(pass_._variant(model, 0, mma, 4, 1, False, True))
                                  .SerializeToString(), {"x": x})
    assert not np.allclose(other, first)
    at16 = eval_worker.run_model(onnx_backend.to_proto(pass_._variant(model, 0, mma, 16, 0, False, True))
                                 .SerializeToString(), {"x": x})
    ratio = activation_sigma(mma, 0, 16) / sigma
    np.testing.assert_allclose(at16 - clean, (first - clean) * ratio, atol=1e-5)


def test_separate_kinds_and_the_default_pool():
    model, data = conv_case()
    Noise(data, bits=(4,), draws=1, separate=True, progress=False)(model)  # default pool: every core
    assert model.meta[EVALUATIONS]["noise"][0] == 1 + 3 * 1 * 3
    serial, _ = conv_case()
    Noise(data, bits=(4,), draws=1, separate=True, workers=1, progress=False)(serial)
    assert scores(model) == scores(serial)
    for v in signal_of(model, "noise").values():
        assert v.details["weight_damage"][4] > 0 and v.details["activation_damage"][4] > 0
        assert "damage_std" not in v.details  # one draw
