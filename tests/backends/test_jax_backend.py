"""The JAX backend: float, simulated and integer execution of IR graphs from either frontend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qinject.app.api import quantize_onnx
from qinject.backends.jax_backend import Program, to_jax, to_jax_with_weights
from qinject.core import numerics
from qinject.core.errors import UnsupportedModelError
from qinject.frontends.jax_frontend import trace_jax
from qinject.frontends.onnx_frontend import load_onnx
from qinject.plan import NodeQuant, Plan
from tests.builders import conv_net, matmul_net, run


def _calib(rng, shape, n=64):
    return {"x": rng.standard_normal((n, *shape)).astype(np.float32)}


def test_float_onnx_graph_matches_onnxruntime_under_jit(rng):
    proto = conv_net()
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    out = jax.jit(to_jax(load_onnx(proto)))(x)
    np.testing.assert_allclose(np.asarray(out), run(proto, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_traced_function_round_trips_exactly(rng):
    w = rng.standard_normal((6, 3)).astype(np.float32)

    def f(params, x):
        return jax.nn.gelu(x @ params["w"]) - jnp.mean(x, axis=-1, keepdims=True)

    x = rng.standard_normal((4, 6)).astype(np.float32)
    model = trace_jax(f, {"w": w}, x)
    np.testing.assert_array_equal(np.asarray(to_jax(model)(x)), np.asarray(f({"w": w}, x)))


@pytest.mark.parametrize("builder,shape", [(conv_net, (3, 8, 8)), (matmul_net, (16,))])
def test_simulated_mode_matches_onnxruntime_on_the_qdq_graph(rng, builder, shape):
    result = quantize_onnx(builder(), plan=Plan.uniform(8, 8), calib=_calib(rng, shape), progress=False)
    from qinject.backends.onnx_backend import to_proto

    x = rng.standard_normal((16, *shape)).astype(np.float32)
    ort_out = run(to_proto(result.model), {"x": x})[0]
    sim = np.asarray(jax.jit(to_jax(result.model, "simulated"))(x))
    # onnxruntime's integer kernels requantize with their own rounding: agreement to a few steps.
    assert numerics.sqnr_db(ort_out, sim) > 35


@pytest.mark.parametrize("builder,shape,kernels", [
    (conv_net, (3, 8, 8), {"conv1", "conv2", "fc"}),
    (matmul_net, (16,), {"mm1", "mm2"}),
])
def test_integer_mode_runs_every_quantized_node_on_integers(rng, builder, shape, kernels):
    result = quantize_onnx(builder(), plan=Plan.uniform(8, 8), calib=_calib(rng, shape), progress=False)
    assert set(Program(result.model, "integer").kernels) == kernels
    x = rng.standard_normal((16, *shape)).astype(np.float32)
    sim = np.asarray(jax.jit(to_jax(result.model, "simulated"))(x))
    integer = np.asarray(jax.jit(to_jax(result.model, "integer"))(x))
    # Only float accumulation order differs: int32 sums are exact.
    step = (sim.max() - sim.min()) / 255
    assert np.abs(integer - sim).max() <= step


def test_integer_mode_keeps_16_bit_nodes_in_float(rng):
    plan = Plan(NodeQuant(weights=8, activations=8), {"conv2": NodeQuant(weights=16, activations=16)})
    result = quantize_onnx(conv_net(), plan=plan, calib=_calib(rng, (3, 8, 8)), progress=False)
    assert set(Program(result.model, "integer").kernels) == {"conv1", "fc"}


def test_activation_times_activation_with_zero_points(rng):
    """Attention-style dot of two asymmetric uint8 activations: all four zero-point terms."""

    def f(params, q, k):
        return jnp.einsum("bqd,bkd->bqk", q + 1.0, k - 0.5)

    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 7, 8)).astype(np.float32)
    from qinject.passes import Calibrate, InsertQDQ

    from qinject.core.pass_manager import PassManager

    model = trace_jax(f, {}, q, k)
    model = PassManager([Calibrate({"q": q, "k": k}, progress=False), InsertQDQ(Plan.uniform(8, 8))]).run(model).model
    assert len(Program(model, "integer").kernels) == 1
    sim = np.asarray(to_jax(model, "simulated")(q, k))
    integer = np.asarray(jax.jit(to_jax(model, "integer"))(q, k))
    np.testing.assert_allclose(integer, sim, atol=1e-4)
    np.testing.assert_allclose(sim, np.asarray(f({}, q, k)), atol=0.15)


def test_straight_through_gradient(rng):
    """d/dx of quantize-dequantize is 1 inside the clipping range and 0 outside it."""
    node_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])
    node_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])
    inits = [numpy_helper.from_array(np.asarray(0.1, np.float32), "s"),
             numpy_helper.from_array(np.asarray(0, np.int8), "z")]
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
                              "qdq", [node_in], [node_out], inits)
    model = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    fn = to_jax(model, "simulated")
    x = np.asarray([-20.0, -12.7, -1.0, 0.04, 12.6, 13.0], np.float32)
    grad = np.asarray(jax.grad(lambda v: fn(v).sum())(x))
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 0])  # codes saturate at -128 and 127
    np.testing.assert_allclose(np.asarray(fn(x)), numerics.fake_quantize(x, np.float32(0.1), np.int8(0),
                                                                          numerics.QType(8, True)))


def test_gradients_with_respect_to_weights(rng):
    model = load_onnx(conv_net())
    fn, weights = to_jax_with_weights(model)
    assert {"w1", "b1", "w2", "b2", "w3", "b3"} == set(weights)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    grads = jax.grad(lambda w: jnp.sum(fn(w, x) ** 2))(weights)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0 for g in grads.values())


def test_bad_mode_and_shape_are_clear_errors(rng):
    model = trace_jax(lambda p, x: x * 2.0, {}, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="unknown JAX backend mode 'fast'"):
        to_jax(model, "fast")
    with pytest.raises(UnsupportedModelError, match="specialised to its example shapes"):
        to_jax(model)(np.ones((5, 3), np.float32))


def test_unknown_domain_is_refused():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example", name="m")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedModelError, match="com.example"):
        Program(load_onnx(onnx.load_from_string(proto.SerializeToString())))


def test_integer_conv_with_same_auto_padding_and_stride(rng):
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2])
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = quantize_onnx(proto, plan=Plan.uniform(8, 8), calib=_calib(rng, (3, 7, 7)), progress=False)
    assert set(Program(result.model, "integer").kernels) == {"conv"}
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    sim = np.asarray(to_jax(result.model, "simulated")(x))
    np.testing.assert_allclose(np.asarray(jax.jit(to_jax(result.model, "integer"))(x)), sim, atol=1e-5)
