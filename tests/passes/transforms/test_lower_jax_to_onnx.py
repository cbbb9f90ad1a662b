"""lower-jax-to-onnx: small JAX functions traced, lowered, saved, run in onnxruntime, compared with JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from jax import lax
from qinject.passes import Calibrate, InsertQDQ
from qinject.passes.transforms.lower_jax_to_onnx import LowerJaxToOnnx

import qinject
from qinject.app.api import export_onnx
from qinject.core import ir as qir
from qinject.core.errors import UnsupportedModelError
from qinject.frontends.jax_frontend import trace_jax
from qinject.plan import Plan

R = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return R.normal(size=shape).astype(np.float32)


def nchw_conv(**kw):
    return lambda p, x: lax.conv_general_dilated(x, p["conv.weight"], **kw)


def nhwc_conv(**kw):
    return lambda p, x: lax.conv_general_dilated(x, p["conv.kernel"], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 **kw)


def layernorm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * p["ln.scale"] + p["ln.bias"]


def attention(p, x):
    q, k, v = x @ p["q.w"], x @ p["k.w"], x @ p["v.w"]
    return jax.nn.softmax(q @ k.swapaxes(-1, -2) / 2.0, axis=-1) @ v


# (id, function, params (None: the function takes only inputs), inputs)
CASES = [
    # dot_general layouts
    ("x@W", lambda p, x: x @ p["fc.w"], {"fc.w": f32(4, 5)}, [f32(3, 4)]),
    ("x@W.T", lambda p, x: x @ p["fc.weight"].T, {"fc.weight": f32(5, 4)}, [f32(3, 4)]),
    ("x.W_NK", lambda p, x: lax.dot_general(x, p["fc.w"], (((1,), (1,)), ((), ()))), {"fc.w": f32(5, 4)},
     [f32(3, 4)]),
    ("W@x", lambda p, x: p["fc.w"] @ x, {"fc.w": f32(5, 4)}, [f32(4, 3)]),
    ("x3d@W", lambda p, x: x @ p["fc.w"], {"fc.w": f32(4, 5)}, [f32(2, 3, 4)]),
    ("x@W3d", lambda p, x: jnp.einsum("bi,ijk->bjk", x, p["fc.w"]), {"fc.w": f32(4, 2, 3)}, [f32(5, 4)]),
    ("x@vec", lambda p, x: x @ p["fc.w"], {"fc.w": f32(4)}, [f32(3, 4)]),
    ("einsum_bij_bjk", lambda a, b: jnp.einsum("bij,bjk->bik", a, b), None, [f32(2, 3, 4), f32(2, 4, 5)]),
    ("einsum_ij_kj", lambda a, b: jnp.einsum("ji,kj->ik", a, b), None, [f32(4, 3), f32(5, 4)]),
    ("einsum_batch_last", lambda a, b: jnp.einsum("ijb,jkb->bki", a, b), None, [f32(3, 4, 2), f32(4, 5, 2)]),
    ("attention", attention, {"q.w": f32(8, 4), "k.w": f32(8, 4), "v.w": f32(8, 4)}, [f32(2, 6, 8)]),
    ("int8_dot", lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                              preferred_element_type=jnp.int32),
     None, [R.integers(-100, 100, (3, 4)).astype(np.int8), R.integers(-100, 100, (4, 2)).astype(np.int8)]),
    ("bias_gemm", lambda p, x: x @ p["fc.w"] + p["fc.b"], {"fc.w": f32(4, 5), "fc.b": f32(5)}, [f32(3, 4)]),
    ("bias_gemm_transB", lambda p, x: lax.dot_general(x, p["fc.w"], (((1,), (1,)), ((), ()))) + p["fc.b"],
     {"fc.w": f32(5, 4), "fc.b": f32(5)}, [f32(3, 4)]),
    # convolutions
    ("conv_nchw_bias", lambda p, x: nchw_conv(window_strides=(1, 1), padding="SAME")(p, x)
     + p["conv.bias"].reshape(1, -1, 1, 1), {"conv.weight": f32(4, 3, 3, 3), "conv.bias": f32(4)},
     [f32(2, 3, 8, 8)]),
    ("conv_nchw_dilated", nchw_conv(window_strides=(1, 1), padding=((1, 2), (0, 1)), rhs_dilation=(2, 2)),
     {"conv.weight": f32(4, 3, 3, 3)}, [f32(1, 3, 9, 9)]),
    ("conv_nchw_groups", nchw_conv(window_strides=(2, 1), padding="VALID", feature_group_count=2),
     {"conv.weight": f32(4, 2, 3, 3)}, [f32(1, 4, 7, 7)]),
    ("conv_nhwc_same_stride_bias",
     lambda p, x: nhwc_conv(window_strides=(2, 2), padding="SAME")(p, x) + p["conv.b"],
     {"conv.kernel": f32(3, 3, 3, 5), "conv.b": f32(5)}, [f32(2, 9, 9, 3)]),
    ("conv_nhwc_depthwise", nhwc_conv(window_strides=(1, 1), padding="SAME", feature_group_count=3),
     {"conv.kernel": f32(3, 3, 1, 6)}, [f32(1, 6, 6, 3)]),
    ("conv1d_nwc", lambda p, x: lax.conv_general_dilated(x, p["conv.kernel"], (1,), "SAME",
                                                         dimension_numbers=("NWC", "WIO", "NWC")),
     {"conv.kernel": f32(3, 2, 4)}, [f32(2, 10, 2)]),
    ("conv_transpose", lambda p, x: lax.conv_transpose(x, p["deconv.weight"], (2, 2), "SAME",
                                                       dimension_numbers=("NCHW", "OIHW", "NCHW")),
     {"deconv.weight": f32(3, 2, 3, 3)}, [f32(1, 2, 4, 4)]),
    ("conv_transpose_nhwc_valid", lambda p, x: lax.conv_transpose(x, p["deconv.kernel"], (3, 2), "VALID",
                                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")),
     {"deconv.kernel": f32(2, 3, 2, 4)}, [f32(1, 4, 5, 2)]),
    ("conv_transpose_dilated",
     lambda p, x: lax.conv_transpose(x, p["deconv.weight"], (2, 1), ((2, 1), (0, 3)), rhs_dilation=(1, 2),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW")),
     {"deconv.weight": f32(3, 2, 3, 3)}, [f32(1, 2, 4, 5)]),
    # pooling
    ("maxpool_nhwc", lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
     None, [f32(2, 8, 8, 3)]),
    ("maxpool_nchw_same", lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2), "SAME"),
     None, [f32(1, 2, 7, 7)]),
    ("avgpool_nhwc", lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0,
     None, [f32(2, 8, 8, 3)]),
    ("sumpool_padded", lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 3, 3), (1, 1, 1), "SAME"), None,
     [f32(2, 5, 5)]),
    ("minpool", lambda x: lax.reduce_window(x, jnp.inf, lax.min, (2, 2), (1, 2), "VALID"), None, [f32(6, 6)]),
    # composites
    ("softmax", lambda x: jax.nn.softmax(x, axis=-1), None, [f32(3, 7)]),
    ("layernorm", layernorm, {"ln.scale": f32(6), "ln.bias": f32(6)}, [f32(2, 3, 6)]),
    ("gelu_erf", lambda x: jax.nn.gelu(x, approximate=False), None, [f32(4, 5)]),
    ("gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True), None, [f32(4, 5)]),
    ("one_hot_argmax", lambda x: jax.nn.one_hot(jnp.argmax(x, -1), 5), None, [f32(4, 5)]),
    ("argmin_int", lambda x: jnp.argmin(x, 0), None, [f32(4, 5)]),
    ("where", lambda x: jnp.where(x > 0.5, x, -x), None, [f32(4, 5)]),
    ("select_n_int", lambda i, a, b, c: lax.select_n(i, a, b, c), None,
     [R.integers(0, 3, (4, 5)).astype(np.int32), f32(4, 5), f32(4, 5), f32(4, 5)]),
    # layout
    ("pad", lambda x: jnp.pad(x, ((1, 2), (0, 1)), constant_values=3.0), None, [f32(3, 4)]),
    ("pad_negative", lambda x: lax.pad(x, 0.0, ((-1, 2, 0), (1, -2, 0))), None, [f32(3, 4)]),
    ("slice", lambda x: x[1:3, ::2, :-1], None, [f32(4, 5, 3)]),
    ("concatenate", lambda a, b: jnp.concatenate([a, b, a], axis=1), None, [f32(2, 3), f32(2, 1)]),
    ("split_rev", lambda x: [s[::-1] for s in jnp.split(x, [1, 3], axis=1)], None, [f32(2, 5)]),
    ("reshape_transpose", lambda x: x.reshape(4, 6).T[None, :, :].squeeze(0), None, [f32(2, 3, 4)]),
    ("broadcast_out", lambda x: jnp.broadcast_to(x[:, None], (3, 4)), None, [f32(3)]),
    ("take", lambda p, ids: jnp.take(p["embed.table"], ids, axis=0), {"embed.table": f32(10, 4)},
     [R.integers(0, 10, (2, 3)).astype(np.int32)]),
    ("index", lambda p, ids: p["embed.table"][ids], {"embed.table": f32(10, 4)},
     [R.integers(-10, 10, (5,)).astype(np.int32)]),
    ("dynamic_slice", lambda x, i: lax.dynamic_slice(x, (i, 1), (2, 2)), None,
     [f32(4, 5), np.asarray(3, np.int32)]),
    ("dynamic_slice_const", lambda x: lax.dynamic_slice(x, (1, 7), (2, 2)), None, [f32(4, 5)]),
    ("cumsum", lambda x: jnp.cumsum(x, 1) + lax.cumsum(x, 0, reverse=True), None, [f32(3, 4)]),
    ("iota", lambda x: x + jnp.arange(4, dtype=jnp.float32), None, [f32(3, 4)]),
    # elementwise
    ("unary", lambda x: jnp.exp(x) + jnp.tanh(x) + jax.nn.sigmoid(x) + jnp.abs(x) * jnp.sign(x) + jnp.sin(x)
     + jnp.floor(x) + jnp.ceil(x) + lax.erf(x) - x, None, [f32(4, 5)]),
    ("positive", lambda x: jnp.log(x) + jnp.sqrt(x) + lax.rsqrt(x) + x ** -2 + x ** 5 + jnp.exp2(x) + x ** 1.5
     + lax.square(x), None, [np.abs(f32(4, 5)) + 0.1]),
    ("log1p_expm1", lambda x: jnp.log1p(x) / x + jnp.expm1(x) / x, None, [f32(5) * 1e-6]),
    ("round", lambda x: jnp.round(x) + lax.round(x) * 10, None,
     [np.array([0.5, 1.5, -0.5, -2.5, 2.4], np.float32)]),
    ("clip_rem", lambda x: jnp.clip(x, -0.5, 0.5) + lax.rem(x, 0.3) + lax.clamp(-x, x, x + 1), None,
     [f32(4, 5)]),
    ("compare_logic", lambda a, b: (((a < b) & (a != 0.5)) | ~(a >= b)) ^ (a == b) | (a <= b) & (a > b), None,
     [f32(4, 5), f32(4, 5)]),
    ("int_ops", lambda a, b: (a // 3 + a % 5 + jnp.maximum(a, b) - jnp.minimum(a, b) * 2) & 0xFF, None,
     [R.integers(1, 100, (4, 5)).astype(np.int32), R.integers(1, 100, (4, 5)).astype(np.int32)]),
    ("reduce", lambda x: (x.max(1), x.min(0), x.prod(1), x.sum((0, 1)), jnp.any(x > 1.0, 1),
                          jnp.all(x > -1.0, 0)), None, [f32(4, 5)]),
    ("convert", lambda x: (x * 10).astype(jnp.int32).astype(jnp.float16), None, [f32(4, 5)]),
    ("is_finite", lambda x: jnp.isfinite(x / (x - x[0, 0])), None, [f32(3, 3)]),
    ("stop_gradient", lambda x: lax.stop_gradient(x), None, [f32(3)]),
]


CASE = {c[0]: c[1:] for c in CASES}


def _run_and_compare(fn, params, inputs, tmp_path):
    args = ([params] if params is not None else []) + list(inputs)
    model = trace_jax(fn, *args, params_argnum=0 if params is not None else None)
    result = LowerJaxToOnnx()(model)
    assert result.modified and result.model is model
    assert not qir.has_jax_nodes(model) and "jax" not in model.opset_imports
    qir.verify(model, full=True)
    path = export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], inputs))
    got = session.run(None, feeds)
    want = [np.asarray(w) for w in jax.tree_util.tree_leaves(jax.jit(fn)(*args))]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = float(np.abs(w).max()) if w.dtype.kind == "f" and w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    return model


@pytest.mark.parametrize("fn, params, inputs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lowered_model_matches_jax(fn, params, inputs, tmp_path):
    _run_and_compare(fn, params, inputs, tmp_path)


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def test_constant_weights_are_relaid_out_not_transposed(tmp_path):
    """x . W[N, K] and W @ x read a re-laid-out [K, N] initializer directly; W @ x transposes
    activations only; the node keeps the weight's layer name."""
    for fn, params, x in CASE["x.W_NK"], CASE["W@x"]:
        model = _run_and_compare(fn, params, x, tmp_path)
        mm = _node(model, "fc")
        assert mm.op_type == "MatMul"
        w = mm.inputs[1]
        assert w.const_value is not None and list(w.shape) == [4, 5]
        assert all(n.inputs[0].const_value is None for n in model.graph if n.op_type == "Transpose")


def test_bias_folds_into_gemm_and_conv(tmp_path):
    gemm = _run_and_compare(*CASE["bias_gemm"], tmp_path)
    assert _ops(gemm) == ["Gemm"] and _node(gemm, "fc").outputs[0].is_graph_output()
    gemm_t = _run_and_compare(*CASE["bias_gemm_transB"], tmp_path)
    assert _ops(gemm_t) == ["Gemm"] and _node(gemm_t, "fc").attributes["transB"].value == 1
    conv = _run_and_compare(*CASE["conv_nchw_bias"], tmp_path)
    assert _ops(conv) == ["Conv"] and len(_node(conv, "conv").inputs) == 3
    nhwc = _run_and_compare(*CASE["conv_nhwc_same_stride_bias"], tmp_path)
    assert _ops(nhwc) == ["Transpose", "Conv", "Transpose"] and len(_node(nhwc, "conv").inputs) == 3
    assert _node(nhwc, "conv").inputs[1].const_value is not None  # OIHW initializer, no Transpose on it


def test_forms_of_pooling_and_relu(tmp_path):
    avg = _run_and_compare(*CASE["avgpool_nhwc"], tmp_path)
    assert _ops(avg) == ["Transpose", "AveragePool", "Transpose"]  # the divide by 4 is folded in
    relu = _run_and_compare(lambda x: jax.nn.relu(x), None, [f32(3, 4)], tmp_path)
    assert _ops(relu) == ["Relu"]


def _cnn(p, x):
    h = lax.conv_general_dilated(x, p["conv1.weight"], (1, 1), "SAME")
    h = jax.nn.relu(h + p["conv1.bias"][None, :, None, None])
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p["fc1.weight"].T + p["fc1.bias"])
    return jax.nn.softmax(h @ p["fc2.kernel"], axis=-1)


CNN_PARAMS = {"conv1.weight": f32(4, 1, 3, 3) * 0.3, "conv1.bias": f32(4) * 0.1,
              "fc1.weight": f32(16, 64) * 0.1, "fc1.bias": f32(16) * 0.1, "fc2.kernel": f32(16, 10) * 0.3}


def test_quantizable_node_names_survive_lowering(tmp_path):
    x = f32(2, 1, 8, 8)
    model = trace_jax(_cnn, CNN_PARAMS, x)
    before = {n.name for n in qir.quantizable_nodes(model)}
    assert before == {"conv1", "fc1", "fc2"}
    _run_and_compare(_cnn, CNN_PARAMS, [x], tmp_path)
    LowerJaxToOnnx()(model)
    assert {n.name for n in qir.quantizable_nodes(model)} == before
    ops = {n.name: n.op_type for n in qir.quantizable_nodes(model)}
    assert ops == {"conv1": "Conv", "fc1": "Gemm", "fc2": "MatMul"}


def test_unsupported_primitives_are_listed_once_and_model_is_unchanged():
    def fn(x):
        return jnp.linalg.cholesky(x @ x.T) + lax.cumlogsumexp(x, 0) + lax.cumlogsumexp(x, 1)

    model = trace_jax(fn, f32(3, 3), params_argnum=None)
    snapshot = [(n.name, n.domain, n.op_type) for n in model.graph]
    with pytest.raises(UnsupportedModelError) as err:
        LowerJaxToOnnx()(model)
    message = str(err.value)
    assert "cholesky (x1)" in message and "cumlogsumexp (x2)" in message and "\n" not in message
    assert [(n.name, n.domain, n.op_type) for n in model.graph] == snapshot


def test_refused_parameters_are_reported_with_the_node():
    model = trace_jax(lambda x: lax.pad(x, 0.0, ((0, 0, 1),)) + 1.0, f32(3), params_argnum=None)
    with pytest.raises(UnsupportedModelError, match=r"node 'pad_0' \(pad\): interior padding"):
        LowerJaxToOnnx()(model)
    assert qir.has_jax_nodes(model)


def _mlp(p, x):
    h = jax.nn.relu(x @ p["fc1.weight"] + p["fc1.bias"])
    return lax.dot_general(h, p["fc2.weight"], (((1,), (1,)), ((), ())))  # h @ W2.T, W2 kept [N, K]


def test_quantized_graph_lowers_to_qdq_onnx(tmp_path):
    params = {"fc1.weight": f32(4, 8), "fc1.bias": f32(8), "fc2.weight": f32(3, 8)}
    x = f32(32, 4)
    model = trace_jax(_mlp, params, x)
    Calibrate(data=[{"x": x}], progress=False)(model)
    InsertQDQ(Plan())(model)
    const = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    path = export_onnx(model, tmp_path / "q.onnx")
    model = qinject.load_onnx(path)  # what was written

    for name, op in (("fc1", "MatMul"), ("fc2", "MatMul")):
        node = _node(model, name)
        assert node.op_type == op
        dq = node.inputs[1].producer()  # the weight's DequantizeLinear feeds the MatMul directly
        assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.numpy().dtype == np.int8
        assert dq.attributes["axis"].value == 1  # per output channel of the [K, N] weight
    assert _node(model, "add_2").op_type == "Add"  # quantized graph: the bias stays an Add
    assert not any(n.op_type == "Transpose" for n in model.graph)

    def fake_quant(v, name):  # uint8 QuantizeLinear -> DequantizeLinear
        scale, zero_point = const[f"{name}_scale"], const[f"{name}_zero_point"].astype(np.float32)
        return (np.clip(np.rint(v / scale) + zero_point, 0, 255) - zero_point) * scale

    w1 = const["fc1.weight_quantized"] * const["fc1.weight_scale"][None, :]
    w2 = const["fc2.weight_quantized"] * const["fc2.weight_scale"][:, None]
    h = np.maximum(fake_quant(x, "x") @ w1 + params["fc1.bias"], 0)
    want = fake_quant(h, "max_3") @ w2.T
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    step = float(const["max_3_scale"]) * float(np.abs(w2).sum(1).max())  # one rounding flip of h
    np.testing.assert_allclose(got, want, atol=step)
    assert np.abs(got - _mlp(params, x)).max() < 0.05 * np.abs(want).max()


def _quantize(fn, params, x):
    model = trace_jax(fn, params, x)
    Calibrate(data=[{"x": x}], progress=False)(model)
    InsertQDQ(Plan())(model)
    return model


def _sqnr_db(got, want):
    return 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2))


def test_quantized_nhwc_conv_weight_is_relaid_out_as_integers(tmp_path):
    params = {"conv.kernel": f32(3, 3, 3, 8), "conv.b": f32(8)}
    fn = CASE["conv_nhwc_same_stride_bias"][0]  # NHWC/HWIO, stride 2, SAME, bias
    x = f32(2, 9, 9, 3)
    model = _quantize(fn, params, x)
    path = export_onnx(model, tmp_path / "q.onnx")
    model = qinject.load_onnx(path)  # what was written
    conv = _node(model, "conv")
    dq = conv.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].value == 0  # HWIO axis 3 -> OIHW axis 0
    assert list(dq.inputs[0].shape) == [8, 3, 3, 3] and dq.inputs[0].const_value.numpy().dtype == np.int8
    assert len(conv.inputs) == 2  # quantized graph: the bias stays an Add
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert _sqnr_db(got, np.asarray(jax.jit(fn)(params, x))) > 30


def test_quantized_weight_whose_channel_axis_a_reshape_merges_keeps_its_dequantize(tmp_path):
    """A [K, J, N] weight per channel along N cannot become a per-axis [K, J*N] integer weight: the
    Reshape goes after the DequantizeLinear instead."""
    params = {"fc.w": f32(4, 2, 3)}
    fn = CASE["x@W3d"][0]  # einsum("bi,ijk->bjk")
    x = f32(16, 4)
    model = _quantize(fn, params, x)
    path = export_onnx(model, tmp_path / "q.onnx")
    model = qinject.load_onnx(path)  # what was written
    reshape = _node(model, "fc").inputs[1].producer()
    assert reshape.op_type == "Reshape" and reshape.inputs[0].producer().op_type == "DequantizeLinear"
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert _sqnr_db(got, np.asarray(jax.jit(fn)(params, x))) > 30


def test_export_leaves_the_traced_model_untouched(tmp_path):
    params = {"fc1.weight": f32(4, 8), "fc1.bias": f32(8), "fc2.weight": f32(3, 8)}
    model = trace_jax(_mlp, params, f32(2, 4))
    before = [(n.name, n.domain, n.op_type) for n in model.graph]
    export_onnx(model, tmp_path / "m.onnx")
    assert [(n.name, n.domain, n.op_type) for n in model.graph] == before
