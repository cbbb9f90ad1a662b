"""ONNX If, Loop and Scan in the JAX backend (qinject.backends.jax_control_flow): equal to onnxruntime
in float and simulated-quantized mode, on graphs built here and on the committed real exports; lax.cond,
lax.scan and the unrolled loop differentiate; data-dependent loops run forward and are recorded."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qinject
from models.realworld import exports_loader
from qinject.backends.jax_backend import Program, to_jax
from qinject.core.errors import UnsupportedModelError
from qinject.plan import Plan
from tests.test_control_flow import W, W2, _value, if_model, loop_model, nested_model, scan_model

REAL = ["torchscript_if_conv_torchscript", "torchscript_if_conv_dynamo", "torchscript_loop_mlp_torchscript",
        "torchscript_loop_mlp_dynamo"]


def _ort(model, feeds):
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _x(sign=1.0, seed=0):
    return (sign * np.random.default_rng(seed).standard_normal((4, 8))).astype(np.float32)


def loop_scan_output_model(trip=3):
    """Loop ``trip`` times (a constant): st = Relu(st @ W2), with the states stacked as a scan output."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cid"),
         helper.make_node("MatMul", ["st", "w2"], ["mm"], name="body_mm"),
         helper.make_node("Relu", ["mm"], ["st_out"], name="body_relu"),
         helper.make_node("Identity", ["st_out"], ["scan_out"], name="body_scan")], "body",
        [_value("i", TensorProto.INT64, []), _value("cond_in", TensorProto.BOOL, []), _value("st", shape=[4, 8])],
        [_value("cond_out", TensorProto.BOOL, []), _value("st_out", shape=[4, 8]), _value("scan_out", shape=[4, 8])])
    inits = {"w": W, "w2": 0.3 * W2, "trip": np.array(trip, np.int64), "true": np.array(True)}
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                           helper.make_node("Loop", ["trip", "true", "h"], ["y", "ys"], name="loop", body=body)],
                          "loop_scan", [_value("x", shape=[4, 8])],
                          [_value("y", shape=[4, 8]), _value("ys", shape=[trip, 4, 8])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def while_model():
    """A Loop whose condition is data: halve st until its largest magnitude is below 1 (at most 20 times)."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["st", "half"], ["st_out"], name="halve"),
         helper.make_node("Abs", ["st_out"], ["a"], name="abs"),
         helper.make_node("ReduceMax", ["a"], ["m"], name="max", keepdims=0),
         helper.make_node("Greater", ["m", "one"], ["cond_out"], name="gt")], "body",
        [_value("i", TensorProto.INT64, []), _value("cond_in", TensorProto.BOOL, []), _value("st", shape=[4, 8])],
        [_value("cond_out", TensorProto.BOOL, []), _value("st_out", shape=[4, 8])])
    inits = {"trip": np.array(20, np.int64), "true": np.array(True), "half": np.array(0.5, np.float32),
             "one": np.array(1.0, np.float32)}
    g = helper.make_graph([helper.make_node("Loop", ["trip", "true", "x"], ["y"], name="halving", body=body)],
                          "while", [_value("x", shape=[4, 8])], [_value("y", shape=[4, 8])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("sign", [1.0, -1.0])  # sum(x @ W) > 0 takes the then branch: both are taken
def test_if_with_a_traced_condition_matches_onnxruntime(sign):
    x = _x(sign)
    proto = if_model()
    fn = to_jax(qinject.load_onnx(proto))
    want = _ort(proto, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x)), want, rtol=1e-5, atol=1e-5)  # lax.cond
    np.testing.assert_allclose(np.asarray(fn(x)), want, rtol=1e-5, atol=1e-5)  # eager: the branch taken
    assert bool(np.sum(x @ W) > 0) == (sign > 0)


def test_gradient_flows_through_the_branch_taken():
    x = _x()
    fn = to_jax(qinject.load_onnx(if_model()))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(fn(v) ** 2)))(x)
    want = jax.grad(lambda v: jnp.sum(((v @ W) @ W2) ** 2))(x)  # then branch: y = h @ W2
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-4, atol=1e-3)


def test_loop_with_a_constant_trip_count_stacks_its_scan_output_and_differentiates():
    x = _x()
    proto = loop_scan_output_model()
    fn = to_jax(qinject.load_onnx(proto))
    y, ys = jax.jit(fn)(x)
    want_y, want_ys = _ort(proto, {"x": x})
    assert ys.shape == (3, 4, 8)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys), want_ys, rtol=1e-5, atol=1e-5)
    program = Program(qinject.load_onnx(proto))
    jaxpr = jax.make_jaxpr(lambda v: program.run(program.constants, [v]))(x)
    assert "scan" in str(jaxpr) and not program.forward_only  # one lax.scan, not unrolled, not a while loop

    def reference(v):
        st = v @ W
        for _ in range(3):
            st = jax.nn.relu(st @ (0.3 * W2))
        return jnp.sum(st**2)

    grad = jax.grad(lambda v: jnp.sum(fn(v)[0] ** 2))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(reference)(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [loop_model, scan_model, nested_model])
def test_loop_scan_and_nested_bodies_match_onnxruntime(make):
    x = _x()
    proto = make()
    fn = to_jax(qinject.load_onnx(proto))
    want = _ort(proto, {"x": x})[0]
    for out in (fn(x), jax.jit(fn)(x)):
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_a_data_dependent_loop_runs_forward_as_a_while_loop_and_is_recorded():
    x = 10 * _x()
    proto = while_model()
    program = Program(qinject.load_onnx(proto))
    out = jax.jit(lambda v: program.run(program.constants, [v])[0])(x)
    np.testing.assert_allclose(np.asarray(out), _ort(proto, {"x": x})[0], rtol=1e-6)
    assert program.forward_only == ["halving"]
    assert np.abs(np.asarray(out)).max() <= 1.0


def test_branches_of_different_shapes_under_a_traced_condition_are_refused_in_one_line():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="t_id")], "then", [], [_value("t")])
    else_g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["e"], name="e_sum", keepdims=0)], "else", [],
                               [_value("e")])
    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
                           helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                           helper.make_node("If", ["c"], ["y"], name="shapes", then_branch=then_g, else_branch=else_g),
                           helper.make_node("ReduceSum", ["y"], ["z"], name="total", keepdims=0)],
                          "g", [_value("x", shape=[4, 8])], [_value("z", shape=[])],
                          [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    fn = to_jax(qinject.load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])))
    with pytest.raises(UnsupportedModelError) as caught:
        jax.jit(fn)(_x())
    # under jit JAX appends a note on filtered traceback frames after the message's one line
    assert re.fullmatch(r"If node 'shapes': its branches return different shapes or dtypes \(.+\); under a condition "
                        r"computed at run time JAX needs equal ones: bind the condition's input to a constant",
                        str(caught.value).splitlines()[0])
    np.testing.assert_allclose(fn(_x()), np.sum(_x()), rtol=1e-5)  # eager: the condition is known, its branch taken


@pytest.mark.parametrize("name", REAL)
def test_real_control_flow_exports_match_onnxruntime_in_float(name):
    proto = exports_loader.load(name)
    feeds = exports_loader.example_feeds(name, batch=2, height=16, width=16)
    model = qinject.load_onnx(proto)
    order = [v.name for v in model.graph.inputs]
    fn = to_jax(model)
    want = _ort(proto, feeds)[0]
    scale = np.abs(want).max()
    for out in (fn(*[feeds[k] for k in order]), jax.jit(fn)(*[feeds[k] for k in order])):
        assert np.abs(np.asarray(out) - want).max() <= 1e-5 * scale


@pytest.mark.parametrize("name", REAL)
def test_real_control_flow_exports_quantized_match_onnxruntime_within_one_step(name, tmp_path):
    proto = exports_loader.load(name)
    calib = exports_loader.example_feeds(name, batch=16, height=16, width=16)
    result = qinject.quantize_onnx(proto, tmp_path / "q.onnx", calib=calib, plan=Plan.uniform(8, 8), progress=False)
    assert any("inside its subgraph(s) quantized" in note for notes in result.notes.values() for note in notes)
    feeds = exports_loader.example_feeds(name, batch=2, seed=1, height=16, width=16)
    order = [v.name for v in result.model.graph.inputs]
    got = np.asarray(jax.jit(to_jax(result.model, "simulated"))(*[feeds[k] for k in order]))
    want = _ort(result.output, feeds)[0]
    step = np.abs(got).max() / 127
    assert np.abs(got - want).max() <= step  # one output step
    # integer mode: int8 kernels inside the bodies (the Gemm the branch or loop body holds)
    integer = np.asarray(jax.jit(to_jax(result.model, "integer"))(*[feeds[k] for k in order]))
    assert np.abs(integer - got).max() <= 2 * step
    inner = {n.name for n in result.model.graph.all_nodes() if n.graph is not result.model.graph}
    assert inner & set(result.quantized) & set(Program(result.model, "integer").kernels)
