"""The plan's execution modes in the JAX backend, both backend modes, under ``jax.jit``.

Graphs are written inline in the form the Q/DQ rewrite gives each mode (``qinject.plan``):
dynamic as DynamicQuantizeLinear -> MatMulInteger -> rescale, or DynamicQuantizeLinear ->
DequantizeLinear -> the op; weight-only as a block-wise DequantizeLinear of int4/int8 weight codes.
ONNX-frontend graphs (MatMul, Gemm, Conv) and jax-frontend graphs (dot_general,
conv_general_dilated) are checked against numpy references of each mode (the integer product is
exact there) and the ONNX ones against onnxruntime.
"""

from __future__ import annotations

import math

import jax
import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from jax import lax
from onnx import TensorProto, helper, numpy_helper

import qinject.jax as qjax
from qinject.app.api import export_onnx, quantize_jax, quantize_onnx
from qinject.backends.jax_backend import Program, to_jax
from qinject.backends.onnx_backend import to_proto
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import PlanError
from qinject.frontends.jax_frontend import trace_jax
from qinject.frontends.onnx_frontend import load_onnx
from qinject.plan import NodeQuant, Plan
from tests.builders import conv_net, matmul_net

BACKENDS = ("simulated", "integer")
DYNAMIC = NodeQuant(mode="dynamic")
K, N = 40, 6  # a reduction of 40 leaves a partial last block at block sizes 16 and 32


# -- numpy references ------------------------------------------------------------------------------------
def dynamic_quantize_ref(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear (onnxruntime gives an all-zero tensor scale 1)."""
    x = np.asarray(x, np.float32)
    lo, hi = np.minimum(x.min(), np.float32(0)), np.maximum(x.max(), np.float32(0))
    scale = np.float32((hi - lo) / np.float32(255)) or np.float32(1)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    codes = np.clip(np.rint(x / scale) + zero, 0, 255)
    return codes.astype(np.uint8), scale, np.uint8(zero)


def dynamic_matmul_ref(x: np.ndarray, w_codes: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """Quantize x at run time, multiply the integers exactly, rescale by x_scale * w_scale."""
    q, s, z = dynamic_quantize_ref(x)
    acc = (q.astype(np.int64) - int(z)) @ w_codes.astype(np.int64)
    return acc.astype(np.float32) * (s * w_scale).astype(np.float32)


def channel_quantize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and one scale per channel along ``axis``."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=other) / 127).astype(np.float32)
    shape = [-1 if i == axis else 1 for i in range(w.ndim)]
    return np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8), scale


def block_quantize(w: np.ndarray, axis: int, block: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric signed codes and one scale per ``block`` weights along ``axis`` (last block partial)."""
    qmax, n = 2 ** (bits - 1) - 1, w.shape[axis]
    blocks = math.ceil(n / block)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, blocks * block - n)
    split = np.pad(w, pad).reshape(*w.shape[:axis], blocks, block, *w.shape[axis + 1:])
    scale = (np.abs(split).max(axis=axis + 1) / qmax).astype(np.float32)
    scale[scale == 0] = 1
    codes = np.clip(np.rint(w / _repeat(scale, axis, block, n)), -qmax, qmax).astype(np.int8)
    return codes.astype(ml_dtypes.int4) if bits == 4 else codes, scale


def block_dequantize(codes: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    return codes.astype(np.float32) * _repeat(scale, axis, block, codes.shape[axis])


def _repeat(scale: np.ndarray, axis: int, block: int, n: int) -> np.ndarray:
    return np.take(np.repeat(scale, block, axis=axis), np.arange(n), axis=axis)


# -- graphs --------------------------------------------------------------------------------------------------
def _proto(nodes: list, inputs: list, output_shape: list, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    graph = helper.make_graph(nodes, "g", inputs, [out],
                              [numpy_helper.from_array(a, name) for name, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _x(*shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _dql() -> onnx.NodeProto:
    return helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="x_dynamic")


def matmul_integer_graph(w: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x -> DynamicQuantizeLinear -> MatMulInteger(int8 weight) -> Cast -> Mul(x_scale * w_scale)."""
    codes, scale = channel_quantize(w, 1)
    nodes = [_dql(), helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["acc"], name="fc"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]), helper.make_node("Mul", ["accf", "s"], ["y"])]
    return _proto(nodes, [_x("N", K)], ["N", N], {"wq": codes, "ws": scale}), codes, scale


def dynamic_qdq_graph(op: str, w: np.ndarray, bias: np.ndarray | None
                      ) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x -> DynamicQuantizeLinear -> DequantizeLinear -> MatMul, or Gemm (transB, bias), on an int8
    per-channel weight; returns the codes and scales as [K, N]."""
    transposed = op == "Gemm"
    codes, scale = channel_quantize(w.T if transposed else w, 0 if transposed else 1)
    nodes = [_dql(), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="w_dq",
                              axis=0 if transposed else 1)]
    if transposed:
        nodes.append(helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], name="fc", transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"], name="fc"))
    inits = {"wq": codes, "ws": scale, **({"b": bias} if transposed else {})}
    return _proto(nodes, [_x("N", K)], ["N", N], inits), (codes.T if transposed else codes), scale


def weight_only_graph(op: str, w: np.ndarray, axis: int, block: int,
                      bits: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """A block-wise DequantizeLinear of the weight's codes -> MatMul / Gemm (transB) / Conv;
    returns the dequantized weight."""
    codes, scale = block_quantize(w, axis, block, bits)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="w_dq", axis=axis,
                              block_size=block)]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["x", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]))
        inputs, out = [_x("N", w.shape[1], 5, 5)], ["N", w.shape[0], 5, 5]
    elif op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x", "wd"], ["y"], name="fc", transB=1))
        inputs, out = [_x("N", K)], ["N", N]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "wd"], ["y"], name="fc"))
        inputs, out = [_x("N", K)], ["N", N]
    return _proto(nodes, inputs, out, {"wq": codes, "ws": scale}), block_dequantize(codes, scale, axis, block)


def _float_graph(op: str, w: np.ndarray) -> onnx.ModelProto:
    """The float op on a float weight: the weight-only reference is this, on the dequantized weight."""
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {"transB": 1} if op == "Gemm" else {}
    shape_in, shape_out = ((["N", w.shape[1], 5, 5], ["N", w.shape[0], 5, 5]) if op == "Conv"
                           else (["N", K], ["N", N]))
    return _proto([helper.make_node(op, ["x", "w"], ["y"], **attrs)], [_x(*shape_in)], shape_out, {"w": w})


def _applied(model: ir.Model, name: str, choice: NodeQuant) -> ir.Model:
    """Record ``choice`` on node ``name`` as the Q/DQ rewrite does."""
    next(n for n in model.graph if n.name == name).meta[qir.QUANT_APPLIED] = choice
    return model


def _ort(proto: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# -- jax-frontend graphs, rewritten as the Q/DQ pass writes each mode ------------------------------------
def jax_dot(rng: np.random.Generator) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((5, K)).astype(np.float32)
    return trace_jax(lambda p, x: x @ p["fc"]["weight"], {"fc": {"weight": w}}, x), w, x


def jax_conv(rng: np.random.Generator) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    w = (rng.standard_normal((3, 3, K, 4)) * 0.1).astype(np.float32)  # HWIO: input features on axis 2
    x = rng.standard_normal((2, 5, 5, K)).astype(np.float32)

    def f(p: dict, x: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(x, p["conv"]["weight"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return trace_jax(f, {"conv": {"weight": w}}, x), w, x


def _weight_dq(graph: ir.Graph, node: ir.Node, codes: np.ndarray, scale: np.ndarray, **attrs: int) -> None:
    w = node.inputs[op_facts.weight_index(node)]
    inputs = [qir.add_initializer(graph, f"{w.name}_q", codes),
              qir.add_initializer(graph, f"{w.name}_scale", scale)]
    dq = ir.node("DequantizeLinear", inputs, attrs, name=f"{w.name}_dq")
    dq.outputs[0].shape, dq.outputs[0].type = w.shape, w.type
    graph.insert_before(node, [dq])
    node.replace_input_with(op_facts.weight_index(node), dq.outputs[0])


def rewrite_dynamic(model: ir.Model, name: str) -> tuple[np.ndarray, np.ndarray]:
    """DynamicQuantizeLinear -> DequantizeLinear on the activation, int8 per-channel weight."""
    graph = model.graph
    node = next(n for n in graph if n.name == name)
    widx, axis = op_facts.weight_index(node), op_facts.channel_axis(node)
    codes, scale = channel_quantize(node.inputs[widx].const_value.numpy(), axis)
    x = node.inputs[1 - widx]
    dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name="x_dynamic")
    dq = ir.node("DequantizeLinear", list(dql.outputs), name="x_dq")
    dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
    graph.insert_before(node, [dql, dq])
    _weight_dq(graph, node, codes, scale, axis=axis)
    node.replace_input_with(1 - widx, dq.outputs[0])
    node.meta[qir.QUANT_APPLIED] = DYNAMIC
    return codes, scale


def rewrite_weight_only(model: ir.Model, name: str, block: int, bits: int) -> np.ndarray:
    """Block-wise weight codes along the reduction axis; returns the dequantized weight."""
    graph = model.graph
    node = next(n for n in graph if n.name == name)
    axis = op_facts.reduction_axis(node)
    w = node.inputs[op_facts.weight_index(node)].const_value.numpy()
    codes, scale = block_quantize(w, axis, block, bits)
    _weight_dq(graph, node, codes, scale, axis=axis, block_size=block)
    node.meta[qir.QUANT_APPLIED] = NodeQuant(weights=bits, mode="weight-only", block_size=block)
    return block_dequantize(codes, scale, axis, block)


def _run(model: ir.Model, backend: str, *inputs: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(to_jax(model, backend))(*inputs))


def _jaxpr(model: ir.Model, backend: str, *inputs: np.ndarray) -> str:
    return str(jax.make_jaxpr(to_jax(model, backend))(*inputs))


# -- DynamicQuantizeLinear -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_quantize_linear_equals_onnxruntime_exactly(rng, backend):
    proto = _proto([_dql(), helper.make_node("Identity", ["xs"], ["y"])], [_x(7, 9)], [], {})
    proto.graph.output.extend([helper.make_tensor_value_info("xq", TensorProto.UINT8, [7, 9]),
                               helper.make_tensor_value_info("xz", TensorProto.UINT8, [])])
    fn = jax.jit(to_jax(load_onnx(proto), backend))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    halfway = np.resize(np.asarray([0.5, 1.5, 2.5, -0.5, -1.0, 254.5], np.float32), (7, 9))
    for x in (rng.standard_normal((7, 9)) * 3 + 1, np.abs(rng.standard_normal((7, 9))), -np.ones((7, 9)),
              np.zeros((7, 9)), halfway):
        x = x.astype(np.float32)
        scale, codes, zero = (np.asarray(a) for a in fn(x))
        want_scale, want_codes, want_zero = session.run(None, {"x": x})
        assert scale == want_scale and zero == want_zero
        np.testing.assert_array_equal(codes, want_codes)
        assert codes.dtype == np.uint8 and zero.dtype == np.uint8  # declared outputs keep their type
        ref_codes, ref_scale, ref_zero = dynamic_quantize_ref(x)
        np.testing.assert_array_equal(codes, ref_codes)
        assert (scale, zero) == (ref_scale, ref_zero)


# -- dynamic -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_matmul_integer_graph(rng, backend):
    w = rng.standard_normal((K, N)).astype(np.float32)
    proto, codes, scale = matmul_integer_graph(w)
    model = _applied(load_onnx(proto), "fc", DYNAMIC)
    x = (rng.standard_normal((5, K)) + 0.3).astype(np.float32)
    out = _run(model, backend, x)
    ref = dynamic_matmul_ref(x, codes, scale)
    # K * 255 * 127 < 2**24: even simulated mode's float accumulation of the codes is exact
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    step = float(dynamic_quantize_ref(x)[1] * scale.max())
    np.testing.assert_allclose(out, _ort(proto, x), rtol=0, atol=step)
    if backend == "integer":
        jaxpr = _jaxpr(model, backend, x)
        assert "i8[5,40]" in jaxpr and "preferred_element_type=int32" in jaxpr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_dynamic_qdq_onnx_matmul_and_gemm(rng, op, backend):
    w = rng.standard_normal((K, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    proto, codes, scale = dynamic_qdq_graph(op, w, bias)
    model = _applied(load_onnx(proto), "fc", DYNAMIC)
    if backend == "integer":
        assert set(Program(model, "integer").kernels) == {"fc"}  # int8 x int8 -> int32, run-time scale
    x = rng.standard_normal((5, K)).astype(np.float32)
    out = _run(model, backend, x)
    ref = dynamic_matmul_ref(x, codes, scale) + (bias if op == "Gemm" else 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    step = float(dynamic_quantize_ref(x)[1] * scale.max())
    np.testing.assert_allclose(out, _ort(proto, x), rtol=0, atol=step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_jax_dot_general(rng, backend):
    model, w, x = jax_dot(rng)
    codes, scale = rewrite_dynamic(model, "fc")
    if backend == "integer":
        assert set(Program(model, "integer").kernels) == {"fc"}
    x = x + 0.5  # an asymmetric range: a non-zero run-time zero point
    out = _run(model, backend, x)
    np.testing.assert_allclose(out, dynamic_matmul_ref(x, codes, scale), rtol=1e-5, atol=1e-5)
    # each call quantizes its own input: a scaled input gets its own scale, not a calibrated one
    np.testing.assert_allclose(_run(model, backend, 10 * x), dynamic_matmul_ref(10 * x, codes, scale),
                               rtol=1e-5, atol=1e-4)


def test_dynamic_simulated_mode_is_differentiable(rng):
    model, _, x = jax_dot(rng)
    rewrite_dynamic(model, "fc")
    fn = to_jax(model, "simulated")
    grad = np.asarray(jax.jit(jax.grad(lambda v: fn(v).sum()))(x))
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


# -- weight-only ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,bits,block", [("MatMul", 4, 16), ("Gemm", 8, 32), ("Conv", 4, 16)])
def test_weight_only_onnx(rng, op, bits, block, backend):
    if op == "Conv":
        w, axis, x = (rng.standard_normal((4, K, 3, 3)) * 0.1, 1, rng.standard_normal((2, K, 5, 5)))
    else:
        w, axis, x = ((rng.standard_normal((N, K)), 1, rng.standard_normal((5, K))) if op == "Gemm"
                      else (rng.standard_normal((K, N)), 0, rng.standard_normal((5, K))))
    w, x = w.astype(np.float32), x.astype(np.float32)
    proto, dequantized = weight_only_graph(op, w, axis, block, bits)
    model = _applied(load_onnx(proto), "conv" if op == "Conv" else "fc",
                     NodeQuant(weights=bits, mode="weight-only", block_size=block))
    out = _run(model, backend, x)
    ref = _ort(_float_graph(op, dequantized), x)  # the float op on the block-dequantized weight
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # onnxruntime on the block-wise graph itself; unoptimized: its fused MatMulNBits quantizes the
    # activations to int8 (session.qdq_matmulnbits_accuracy_level 4), which is no longer weight-only
    np.testing.assert_allclose(out, _ort(proto, x, optimize=False), rtol=1e-5, atol=1e-5)
    _check_weight_storage(model, backend, x, bits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("build,bits,block", [(jax_dot, 4, 32), (jax_dot, 8, 16), (jax_conv, 4, 16)])
def test_weight_only_jax(rng, build, bits, block, backend):
    model, w, x = build(rng)
    name = "fc" if build is jax_dot else "conv"
    dequantized = rewrite_weight_only(model, name, block, bits)
    out = _run(model, backend, x)
    if build is jax_dot:
        ref = x @ dequantized
    else:
        ref = np.asarray(lax.conv_general_dilated(x, dequantized, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                  precision=lax.Precision.HIGHEST))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    _check_weight_storage(model, backend, x, bits)


def _check_weight_storage(model: ir.Model, backend: str, x: np.ndarray, bits: int) -> None:
    """Integer mode keeps the weight as codes in the program and dequantizes it there; simulated
    mode folds the dequantized weight into a float constant."""
    codes = f"i{bits}["
    jaxpr = _jaxpr(model, backend, x)
    if backend == "integer":
        assert codes in jaxpr and "convert_element_type" in jaxpr
    else:
        assert codes not in jaxpr


def test_jax_reduction_axes():
    model, _, _ = jax_conv(np.random.default_rng(0))
    conv = next(n for n in model.graph if n.name == "conv")
    assert op_facts.reduction_axis(conv) == 2 and op_facts.modes(conv) == ("static", "weight-only")
    model, _, _ = jax_dot(np.random.default_rng(0))
    dot = next(n for n in model.graph if n.name == "fc")
    assert op_facts.reduction_axis(dot) == 0 and op_facts.modes(dot) == ("static", "dynamic", "weight-only")


# -- refusals ---------------------------------------------------------------------------------------------
def test_a_mode_the_op_lacks_is_refused(rng):
    model, _, _ = jax_conv(rng)
    _applied(model, "conv", DYNAMIC)
    with pytest.raises(PlanError, match=r"node 'conv' \(conv_general_dilated\): the plan's mode 'dynamic' "
                                        r"is not available for this op \(it runs static, weight-only\)"):
        to_jax(model, "simulated")
    proto, _ = weight_only_graph("Conv", rng.standard_normal((4, K, 3, 3)).astype(np.float32), 1, 16, 4)
    model = _applied(load_onnx(proto), "conv", DYNAMIC)
    with pytest.raises(PlanError, match=r"node 'conv' \(Conv\): the plan's mode 'dynamic' is not available"):
        to_jax(model, "integer")


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_a_static_graph_under_another_mode_is_refused(rng, mode):
    """A graph still holding calibrated activation Q/DQ never runs as if it were the planned mode."""
    calib = {"x": rng.standard_normal((16, 16)).astype(np.float32)}
    result = quantize_onnx(matmul_net(), plan=Plan.uniform(8, 8), calib=calib, progress=False)
    _applied(result.model, "mm1", NodeQuant(mode=mode))
    message = rf"node 'mm1' \(MatMul\) is planned '{mode}', but input 0 .* calibrated"
    with pytest.raises(PlanError, match=message):
        to_jax(result.model)


def test_planned_modes_missing_from_the_graph_are_refused(rng):
    model, _, _ = jax_dot(rng)
    _applied(model, "fc", DYNAMIC)
    with pytest.raises(PlanError, match="node 'fc' .* 'dynamic', but no input is quantized at run time"):
        to_jax(model)
    _applied(model, "fc", NodeQuant(mode="weight-only"))
    with pytest.raises(PlanError, match="node 'fc' .* planned 'weight-only' .* no integer weight"):
        to_jax(model)


# -- MatMulInteger beyond onnxruntime's coverage ------------------------------------------------------------
def test_matmul_integer_per_row_zero_point(rng):
    """A per-row a_zero_point (the ONNX spec's; onnxruntime takes scalars only) against numpy."""
    a = rng.integers(0, 256, (3, 5)).astype(np.uint8)
    b = rng.integers(-128, 128, (5, 4)).astype(np.int8)
    za, zb = np.asarray([1, 128, 255], np.uint8), np.asarray([3, -1, 0, 7], np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"], name="mmi")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [3, 4])],
                              [numpy_helper.from_array(v, n) for n, v in (("b", b), ("za", za), ("zb", zb))])
    model = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    want = (a.astype(np.int64) - za[:, None]) @ (b.astype(np.int64) - zb)
    np.testing.assert_array_equal(np.asarray(jax.jit(to_jax(model, "integer"))(a)), want)


# -- the Q/DQ rewrite's own output ---------------------------------------------------------------------------
WEIGHT_ONLY_4 = NodeQuant(weights=4, mode="weight-only", block_size=16)
MODE_CHOICES = pytest.mark.parametrize("choice", [DYNAMIC, WEIGHT_ONLY_4], ids=["dynamic", "weight-only"])


def _assert_written(model: ir.Model, choice: NodeQuant) -> None:
    if choice.mode == "dynamic":
        written = any(n.op_type == "DynamicQuantizeLinear" for n in model.graph)
    else:
        written = any(n.op_type == "DequantizeLinear" and "block_size" in n.attributes for n in model.graph)
    assert written, f"insert-qdq wrote no {choice.mode} form"


def _within_a_step(out: np.ndarray, ort_out: np.ndarray) -> None:
    step = float(np.abs(ort_out).max()) / 127  # one step of an 8-bit code over the output's range
    np.testing.assert_allclose(out, ort_out, rtol=0, atol=step)


@MODE_CHOICES
@pytest.mark.parametrize("builder,shape", [(matmul_net, (16,)), (conv_net, (3, 8, 8))], ids=["matmul", "conv"])
def test_rewritten_onnx_model_matches_onnxruntime(rng, builder, shape, choice):
    """MatMul, Gemm (lowered to MatMul + Add) and, weight-only, Conv; a dynamic Conv stays float."""
    calib = {"x": rng.standard_normal((16, *shape)).astype(np.float32)}
    result = quantize_onnx(builder(), plan=Plan(choice), calib=calib, progress=False)
    _assert_written(result.model, choice)
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    ort_out = _ort(to_proto(result.model), x, optimize=choice.mode == "dynamic")
    for backend in BACKENDS:
        _within_a_step(_run(result.model, backend, x), ort_out)
    if choice.mode == "dynamic":  # MatMulInteger on integers
        assert "preferred_element_type=int32" in _jaxpr(result.model, "integer", x)


@MODE_CHOICES
def test_rewritten_jax_function_matches_its_onnx_export(rng, choice, tmp_path):
    """The decorator's quantized function against onnxruntime on the exported (lowered) model."""
    params = {"fc1": {"weight": rng.standard_normal((K, 24)).astype(np.float32) * 0.2,
                      "bias": rng.standard_normal(24).astype(np.float32) * 0.1},
              "fc2": {"weight": rng.standard_normal((24, N)).astype(np.float32) * 0.2}}

    def forward(p: dict, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x @ p["fc1"]["weight"] + p["fc1"]["bias"]) @ p["fc2"]["weight"]

    x, calib = rng.standard_normal((8, K)).astype(np.float32), rng.standard_normal((32, K)).astype(np.float32)
    result = quantize_jax(forward, params, x, plan=Plan(choice), calib=calib, progress=False)
    _assert_written(result.model, choice)
    ort_out = _ort(onnx.load(str(export_onnx(result.model, tmp_path / "q.onnx"))), x,
                   optimize=choice.mode == "dynamic")
    for backend in BACKENDS:
        quantized = qjax.quantize(Plan(choice), params=params, calib=calib, mode=backend)(forward)
        _within_a_step(np.asarray(jax.jit(quantized)(x)), ort_out)
    if choice.mode == "dynamic":  # both dots on int8 with run-time activation scales
        assert set(Program(quantized.model_for(x), "integer").kernels) == {"fc1", "fc2"}
