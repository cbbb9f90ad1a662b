"""AdaRound and bias correction under each weight grid: per tensor (8 and 4 bits), per channel,
asymmetric, and together; each has an effect that survives the Q/DQ rewrite, or refuses in one line.
Nodes whose mode is not static keep their weights and biases."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from qinject.passes import AdaRound, BiasCorrection, InsertQDQ
from qinject.passes.rounding.adaround import APPLIED, FLOAT_WEIGHT, NOTES, weight_grid

import qinject
from qinject.backends.jax_backend import Program
from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.errors import QinjectError
from qinject.plan import NodeQuant, Plan
from qinject.runtime.evaluation import Executable
from qinject.runtime.layer_data import layer_inputs, node_function
from tests.builders import CNN, conv_net

W8_TENSOR = Plan(NodeQuant(weights=8, per_channel=False))
W4_TENSOR = Plan(NodeQuant(weights=4, per_channel=False))
W4_CHANNEL = Plan(NodeQuant(weights=4))
W4_TENSOR_ASYMMETRIC = Plan(NodeQuant(weights=4, per_channel=False, weight_symmetric=False))
# the mean shift left after bias correction, relative (float32 layer outputs: not exactly zero)
SHIFT_LEFT = 0.02
GRIDS = {"W8 per-tensor": W8_TENSOR, "W4 per-tensor": W4_TENSOR, "W4 per-channel": W4_CHANNEL,
         "W4 per-tensor asymmetric": W4_TENSOR_ASYMMETRIC}


@pytest.fixture(scope="module")
def net() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``conv_net`` with output channels 30x apart in scale, so that a per-tensor grid is coarse on
    the narrow ones, and 64 calibration samples."""
    model = conv_net(seed=3)
    for init in model.graph.initializer:
        if init.name in ("w1", "w2", "w3"):
            w = numpy_helper.to_array(init)
            spread = np.geomspace(0.03, 1.0, len(w)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w * spread.reshape(-1, *[1] * (w.ndim - 1)), init.name))
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    return model, {"x": x}


def _calibrated(net) -> ir.Model:
    model, calib = net
    return qinject.analyze(model, calib, [], progress=False)


def _effective(node, plan: Plan) -> np.ndarray:
    """The weight the Q/DQ rewrite will give ``node``: its current weight on the plan's grid."""
    w = op_facts.weight_of(node).const_value.numpy()
    g = weight_grid(node, w, plan.choice(node.name))
    return numerics.fake_quantize(w, g.scale, g.zero_point, g.qtype, g.axis)


def _layer_errors(model, inputs: dict[str, np.ndarray], float_weights: dict[str, np.ndarray],
                  float_biases: dict[str, np.ndarray], plan: Plan) -> dict[str, tuple[float, float]]:
    """Per node, (output MSE, mean |per-channel mean shift|) of its quantized weight and current bias
    against its float weight and bias, on ``inputs`` (by node name)."""
    program, out = Program(model), {}
    for node in qir.quantizable_nodes(model):
        f, x = node_function(program, node), inputs[node.name]
        bias = node.inputs[2].const_value.numpy()
        y = np.asarray(f(x, _effective(node, plan)))
        reference = np.asarray(f(x, float_weights[node.name])) + _as_output(node, float_biases[node.name] - bias)
        channel_axes = (0, 2, 3) if node.op_type == "Conv" else (0,)
        out[node.name] = (float(np.mean((y - reference) ** 2)),
                          float(np.abs(np.mean(y - reference, axis=channel_axes)).mean()))
    return out


def _as_output(node, b: np.ndarray) -> np.ndarray:
    return b.reshape(1, -1, 1, 1) if node.op_type == "Conv" else b.reshape(1, -1)


def _floats(model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    nodes = qir.quantizable_nodes(model)
    return ({n.name: op_facts.weight_of(n).const_value.numpy().copy() for n in nodes},
            {n.name: n.inputs[2].const_value.numpy().copy() for n in nodes})


def _inputs(model, calib: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each node's input in the model as it stands: what the next pass will measure on."""
    return layer_inputs(model, calib, qir.quantizable_nodes(model))


@pytest.mark.parametrize("name", ["W8 per-tensor", "W4 per-tensor asymmetric", "W4 per-channel"])
def test_adaround_then_bias_correction_on_every_grid(net, name):
    """AdaRound flips codes and lowers each layer's error; bias correction after it removes the
    shift its rounding left (not round-to-nearest's); the rewrite writes exactly those values."""
    plan = GRIDS[name]
    model = _calibrated(net)
    weights, biases = _floats(model)
    float_inputs = _inputs(model, net[1])
    nearest = _layer_errors(model, float_inputs, weights, biases, plan)
    AdaRound(net[1], plan, iterations=40, progress=False)(model)
    rounded = _layer_errors(model, float_inputs, weights, biases, plan)
    learned = {n.name: _effective(n, plan) for n in qir.quantizable_nodes(model)}
    flipped = 0
    for node in qir.quantizable_nodes(model):
        bits, before, after = node.meta[APPLIED]
        assert bits == plan.default.weights and after <= before
        np.testing.assert_array_equal(node.meta[FLOAT_WEIGHT], weights[node.name])
        assert rounded[node.name][0] <= nearest[node.name][0] * (1 + 1e-6), (node.name, nearest, rounded)
        g = weight_grid(node, weights[node.name], plan.choice(node.name))
        rtn = numerics.fake_quantize(weights[node.name], g.scale, g.zero_point, g.qtype, g.axis)
        flipped += int(np.sum(learned[node.name] != rtn))
    assert flipped > 0
    assert sum(e for e, _ in rounded.values()) < sum(e for e, _ in nearest.values()), (nearest, rounded)

    # bias correction measures on the inputs of the model as it stands: upstream weights rounded
    rounded_inputs = _inputs(model, net[1])
    rounded = _layer_errors(model, rounded_inputs, weights, biases, plan)
    BiasCorrection(net[1], plan)(model)
    both = _layer_errors(model, rounded_inputs, weights, biases, plan)
    for node in qir.quantizable_nodes(model):
        np.testing.assert_array_equal(_effective(node, plan), learned[node.name])  # the weights stay AdaRound's
        assert not np.array_equal(node.inputs[2].const_value.numpy(), biases[node.name])
        assert both[node.name][1] < SHIFT_LEFT * rounded[node.name][1] + 1e-6, (node.name, rounded, both)
        assert both[node.name][0] <= rounded[node.name][0]

    corrected = {n.name: n.inputs[2].const_value.numpy() for n in qir.quantizable_nodes(model)}
    InsertQDQ(plan)(model)
    for node in qir.quantizable_nodes(model):
        # the rewrite recomputed the grid from the rounded weight: it dequantizes to AdaRound's values
        np.testing.assert_allclose(_written(node, op_facts.weight_index(node)), learned[node.name], rtol=1e-6,
                                   atol=1e-9)
        np.testing.assert_allclose(_written(node, 2), corrected[node.name], rtol=1e-5, atol=1e-6)


def _written(node, index: int) -> np.ndarray:
    """The value the Q/DQ model gives the node's input ``index`` (an integer initializer behind a
    DequantizeLinear)."""
    dq = node.inputs[index].producer()
    codes, scale, zero_point = (v.const_value.numpy() for v in dq.inputs)
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else None
    return numerics.dequantize(codes, scale, zero_point, axis if scale.size > 1 else None)


@pytest.mark.parametrize("name", list(GRIDS))
def test_bias_correction_removes_the_mean_shift_on_every_grid(net, name):
    plan = GRIDS[name]
    model = _calibrated(net)
    weights, biases = _floats(model)
    inputs = _inputs(model, net[1])
    before = _layer_errors(model, inputs, weights, biases, plan)
    BiasCorrection(net[1], plan)(model)
    after = _layer_errors(model, inputs, weights, biases, plan)
    for node in qir.quantizable_nodes(model):
        assert not np.array_equal(node.inputs[2].const_value.numpy(), biases[node.name])
        shift_before, shift_after = before[node.name][1], after[node.name][1]
        assert shift_after < SHIFT_LEFT * shift_before + 1e-6, (node.name, shift_before, shift_after)
        assert after[node.name][0] <= before[node.name][0]


# local-cpu: the plan reaches the passes fitted to the target (as from the command line)
@pytest.mark.parametrize(("flag", "target"), [("adaround", None), ("bias_correction", "local-cpu")])
def test_a_flag_that_would_change_nothing_refuses(flag, target):
    with pytest.raises(QinjectError, match=r"changes nothing: no node of the plan qualifies \(node 'conv1': 8-bit "
                                           r"per-channel weights, above the 4-bit limit for per-channel weights\); "
                                           r"use static weights of at most 4 bits per channel or 8 per tensor"):
        qinject.quantize_onnx(CNN / "model.onnx", plan=Plan.uniform(8, 8), calib=CNN / "calib.npz",
                              target=target, progress=False, **{flag: True})


def test_bias_correction_under_per_tensor_8_bit_weights_from_the_api():
    kwargs = {"plan": Plan.uniform(8, 8, per_channel=False), "calib": CNN / "calib.npz", "progress": False}
    plain = qinject.quantize_onnx(CNN / "model.onnx", **kwargs)
    corrected = qinject.quantize_onnx(CNN / "model.onnx", bias_correction=True, **kwargs)
    feeds = {"input": np.load(CNN / "eval.npz")["input"]}
    reference = Executable(qinject.load_onnx(CNN / "model.onnx")).predict(feeds)
    shift = {label: float(np.abs(np.mean(Executable(result.model).predict(feeds) - reference, axis=0)).mean())
             for label, result in (("plain", plain), ("corrected", corrected))}
    # Measured on digits_cnn's held-out split: mean logit shift 0.045 -> 0.014.
    assert shift["corrected"] < 0.5 * shift["plain"], shift


def test_nodes_of_other_modes_keep_their_weights_and_biases(net):
    base = NodeQuant(weights=4, per_channel=False)
    modes = {"conv2": dataclasses.replace(base, mode="weight-only"),
             "fc": dataclasses.replace(base, mode="dynamic", weights=8)}
    model = _calibrated(net)
    weights, biases = _floats(model)
    AdaRound(net[1], Plan(base, modes), iterations=10, progress=False)(model)
    BiasCorrection(net[1], Plan(base, modes))(model)
    for node in qir.quantizable_nodes(model):
        kept = node.name in modes
        assert np.array_equal(op_facts.weight_of(node).const_value.numpy(), weights[node.name]) == kept
        assert np.array_equal(node.inputs[2].const_value.numpy(), biases[node.name]) == kept
        if kept:
            mode = modes[node.name].mode
            assert f"AdaRound (--adaround) skipped: mode {mode!r} has another weight grid" in node.meta[NOTES][0]
            assert FLOAT_WEIGHT not in node.meta and APPLIED not in node.meta


def test_a_plan_of_weight_only_nodes_refuses(net):
    plan = Plan(NodeQuant(weights=4, mode="weight-only"))
    with pytest.raises(QinjectError, match=r"AdaRound \(--adaround\) changes nothing: .* mode 'weight-only' .*"
                                           r"blocks of 32 weights have their own scales"):
        AdaRound(net[1], plan, progress=False)(_calibrated(net))
