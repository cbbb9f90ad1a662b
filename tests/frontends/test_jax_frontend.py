"""The jaxpr frontend: structure, names, inlining, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import UnsupportedModelError
from qinject.frontends.jax_frontend import trace_jax


def _mlp(params, x):
    h = jax.nn.relu(x @ params["fc1"]["w"] + params["fc1"]["b"])
    return h @ params["fc2.weight"].T


def _mlp_params(rng):
    return {"fc1": {"w": rng.standard_normal((8, 16)).astype(np.float32),
                    "b": rng.standard_normal(16).astype(np.float32)},
            "fc2.weight": rng.standard_normal((4, 16)).astype(np.float32)}


def test_parameters_are_named_initializers_and_inputs_take_argument_names(rng):
    model = trace_jax(_mlp, _mlp_params(rng), np.zeros((2, 8), np.float32))
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert {"fc1.w", "fc1.b"} <= set(model.graph.initializers)
    # W.T of a parameter is evaluated at trace time, so the dot reads a constant it can quantize.
    assert "fc2.weight.T" in model.graph.initializers
    assert [n.op_type for n in model.graph if n.op_type == "transpose"] == []
    assert [v.name for v in model.graph.outputs] == ["output"]
    assert all(n.domain == "jax" for n in model.graph)
    qir.verify(model, full=True)


def test_quantizable_nodes_are_named_after_their_weight(rng):
    model = trace_jax(_mlp, _mlp_params(rng), np.zeros((2, 8), np.float32))
    nodes = {n.name: n for n in qir.quantizable_nodes(model)}
    assert set(nodes) == {"fc1", "fc2"}  # "fc1.w" -> fc1, "fc2.weight" -> fc2
    assert op_facts.channel_axis(nodes["fc1"]) == 1  # W [in, out]: out channels on axis 1
    assert op_facts.macs(nodes["fc1"]) == 2 * 8 * 16


def test_weight_on_the_left_and_activation_products():
    w = np.ones((3, 5), np.float32)

    def f(params, x, y):
        return params["w"] @ x, x.T @ y  # W @ x: the weight is operand 0; x^T y: two activations

    model = trace_jax(f, {"w": w}, np.ones((5, 2), np.float32), np.ones((5, 4), np.float32))
    left, act = [n for n in model.graph if n.op_type == "dot_general"]
    assert op_facts.weight_index(left) == 0 and op_facts.activation_inputs(left) == [1]
    assert op_facts.channel_axis(left) == 0  # W [out, in] on the left: rows are output channels
    assert op_facts.weight_of(act) is None and op_facts.activation_inputs(act) == [0, 1]
    assert op_facts.is_quantizable(act)


def test_convolution_channel_axis_comes_from_the_dimension_numbers(rng):
    w = rng.standard_normal((3, 3, 2, 8)).astype(np.float32)  # HWIO

    def f(params, x):
        return lax.conv_general_dilated(x, params["conv.kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    model = trace_jax(f, {"conv.kernel": w}, np.zeros((1, 6, 6, 2), np.float32))
    (conv,) = qir.quantizable_nodes(model)
    assert conv.name == "conv"
    assert op_facts.channel_axis(conv) == 3
    assert op_facts.macs(conv) == 6 * 6 * 8 * (3 * 3 * 2)


def test_call_primitives_are_inlined():
    @jax.custom_vjp
    def scaled(x):
        return 2.0 * x

    scaled.defvjp(lambda x: (scaled(x), None), lambda _, g: (2.0 * g,))

    @jax.custom_jvp
    def soft(x):
        return jnp.log1p(jnp.exp(x))

    soft.defjvp(lambda p, t: (soft(p[0]), t[0] * jax.nn.sigmoid(p[0])))

    @jax.jit
    def inner(x):
        return jnp.tanh(x)

    def f(x):
        return inner(soft(scaled(x)))

    model = trace_jax(f, np.zeros(3, np.float32), params_argnum=None)
    ops = [n.op_type for n in model.graph]
    assert ops == ["mul", "exp", "log1p", "tanh"]


@pytest.mark.parametrize("which", ["cond", "while", "scan"])
def test_control_flow_is_refused_with_the_primitive_named(which):
    def f(x):
        if which == "cond":
            return lax.cond(x.sum() > 0, lambda v: v, lambda v: -v, x)
        if which == "while":
            return lax.while_loop(lambda v: v.sum() < 10, lambda v: v + 1, x)
        return lax.scan(lambda c, v: (c + v, c), 0.0, x)[0]

    with pytest.raises(UnsupportedModelError, match=f"control flow \\('{which}'\\)"):
        trace_jax(f, np.ones(3, np.float32), params_argnum=None)


def test_outputs_that_are_inputs_or_repeated_get_their_own_node():
    def f(x):
        y = x * 2.0
        return x, y, y

    model = trace_jax(f, np.ones(2, np.float32), params_argnum=None)
    assert [v.name for v in model.graph.outputs] == ["output_0", "output_1", "output_2"]
    assert len({v.name for v in model.graph.outputs}) == 3
    qir.verify(model, full=True)


def test_closed_over_arrays_and_literals_become_constants():
    table = np.arange(6, dtype=np.float32).reshape(2, 3)

    def f(x):
        return jnp.maximum(x @ table, 0.0)

    model = trace_jax(f, np.ones((4, 2), np.float32), params_argnum=None)
    (dot,) = qir.quantizable_nodes(model)
    assert op_facts.weight_of(dot) is not None  # a closed-over array is a constant weight too
    literals = [v for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 0]
    assert literals and literals[0].const_value.numpy() == 0.0


def test_pytree_inputs_are_named_by_path():
    def f(params, batch):
        return batch["ids"].astype(jnp.float32) * batch["scale"]

    model = trace_jax(f, {}, {"ids": np.ones(3, np.int32), "scale": np.ones(3, np.float32)})
    assert [v.name for v in model.graph.inputs] == ["batch.ids", "batch.scale"]


def test_bad_params_argnum_is_one_clear_error():
    with pytest.raises(UnsupportedModelError, match="params_argnum=2"):
        trace_jax(lambda p, x: x, {}, np.ones(1), params_argnum=2)
