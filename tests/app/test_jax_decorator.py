"""``qinject.jax.quantize``: equals the explicit trace → rewrite → backend path, jits, vmaps, and
leaves the float function alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import qinject
import qinject.jax as qjax
from models import zoo
from qinject.core.rules import Rule, Rules
from qinject.plan import NodeQuant, Plan


@pytest.fixture(scope="module")
def net():
    return zoo.load("digits_mlp")


def test_decorator_equals_the_explicit_path_and_jits_and_vmaps(net):
    plan = Plan(NodeQuant(weights=8, activations=8), {"fc3": NodeQuant(weights=4, activations=8)})
    float_before = np.asarray(net.forward(net.params, net.eval_inputs[:64]))

    @qjax.quantize(plan, params=net.params, calib=net.calib_inputs)
    def forward(params, x):
        return net.forward(params, x)

    x = net.eval_inputs[:64]
    np.testing.assert_array_equal(np.asarray(jax.jit(forward)(x[:16])), np.asarray(forward(x[:16])))  # jit first
    explicit = qinject.quantize_jax(net.forward, net.params, x, plan=plan, calib=net.calib_inputs, progress=False)
    expected = np.asarray(explicit.to_jax("simulated")(x))
    np.testing.assert_array_equal(np.asarray(forward(x)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(forward)(x)), expected)
    # vmap: each example traced at its own shape, with the same calibrated scales
    np.testing.assert_allclose(np.asarray(jax.vmap(forward)(x)), expected, rtol=0, atol=1e-5)
    # a different batch reuses the calibration; the graph for it is traced once and cached
    np.testing.assert_array_equal(np.asarray(forward(x[:8])), expected[:8])
    assert len(forward._compiled) == 4
    assert sum(n.op_type == "QuantizeLinear" for n in forward.model_for(x).graph) > 0
    # the float function is untouched
    assert forward.float_fn(net.params, x).shape == (64, 10)
    np.testing.assert_array_equal(np.asarray(net.forward(net.params, x)), float_before)
    assert not np.array_equal(expected, float_before)


def test_decorator_takes_rules_and_integer_mode(net):
    rules = Rules((Rule(name="fc3", skip=True),))
    forward = qjax.quantize(rules, params=net.params, calib=net.calib_inputs, mode="integer")(net.forward)
    x = net.eval_inputs[:64]
    model = forward.model_for(x)
    weighted = {n.name for n in model.graph if n.op_type == "dot_general"
                and any(i.producer() is not None and i.producer().op_type == "DequantizeLinear" for i in n.inputs)}
    assert weighted == {"fc1", "fc2"}
    accuracy = np.mean(np.asarray(jax.jit(forward)(x)).argmax(1) == net.eval_labels[:64])
    assert accuracy >= 0.95


def test_a_function_ending_in_a_quantized_dot(rng):
    """The last dot's output is the function's output: never quantized, nor calibrated."""
    w = rng.standard_normal((8, 3)).astype(np.float32)
    calib = rng.standard_normal((32, 8)).astype(np.float32)
    forward = qjax.quantize(Plan(), params={"fc": w}, calib=calib)(lambda p, x: x @ p["fc"])
    x = calib[:4]  # inside the calibrated range: no clipping
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(x)), x @ w, atol=0.1)
