"""Small ONNX models built inline for tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qinject.latency_table import LatencyTable

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn"  # the bundled default model: model.onnx, calib.npz, eval.npz


def roofline_table(target: str, peaks: dict[str, float], memory_bytes_per_s: float) -> LatencyTable:
    """An analytic target of the given peaks (ops/s per precision) and memory bandwidth, no launch cost."""
    return LatencyTable.from_dict({
        "format": "qinject-latency-table", "version": 1, "target": target, "kind": "analytic",
        "description": "test roofline", "source": "tests",
        "roofline": {"peak_ops_per_s": peaks, "memory_bytes_per_s": memory_bytes_per_s, "op_overhead_us": 0.0,
                     "sixteen_bit": "fp16"}})


def run_cli(*args: object, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line as users run it: a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "qinject.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, check=False)


def conv_net(seed: int = 0, opset: int = 13, batch: int | str = "N") -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8) -> Relu -> MaxPool -> Conv(16) -> Relu -> Flatten -> Gemm(10) -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.15).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array((rng.standard_normal((10, 256)) * 0.1).astype(np.float32), "w3"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_net(seed: int = 0, join: str = "Add") -> onnx.ModelProto:
    """Two ResNet blocks: x[N,4,8,8] -> Conv -> Relu -> a; a -> Conv -> Relu -> Conv -> join(., a) ->
    Relu -> s -> Conv -> Relu -> Conv -> join(., s) -> Relu -> GlobalAveragePool -> Flatten -> y
    (``join``: Add, or a two-input Sum as some exporters write it). ``s`` is read by a Conv and the
    second join; the last join's output by float ops only."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name: str, x: str, y: str, cin: int, relu: bool) -> None:
        w = (rng.standard_normal((8, cin, 3, 3)) * 0.2).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        inits.append(numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), f"{name}_b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{y}_pre" if relu else y], name=name,
                                      pads=[1, 1, 1, 1]))
        if relu:
            nodes.append(helper.make_node("Relu", [f"{y}_pre"], [y], name=f"{name}_relu"))

    conv("c0", "x", "a", 4, True)
    conv("c1", "a", "h1", 8, True)
    conv("c2", "h1", "y1", 8, False)
    nodes += [helper.make_node(join, ["y1", "a"], ["j1"], name="join1"),
              helper.make_node("Relu", ["j1"], ["s"], name="relu_j1")]
    conv("c3", "s", "h2", 8, True)
    conv("c4", "h2", "y2", 8, False)
    nodes += [helper.make_node(join, ["y2", "s"], ["j2"], name="join2"),
              helper.make_node("Relu", ["j2"], ["s2"], name="relu_j2"),
              helper.make_node("GlobalAveragePool", ["s2"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "residual_net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def matmul_net(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """x[N,16] -> MatMul(w[16,32]) -> Add(b) -> Relu -> MatMul(w2[32,4]) -> y, with the first
    weight produced by a Constant node and the second by Identity of an initializer."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 32)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((32, 4)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w1"], name="const_w1", value=numpy_helper.from_array(w1)),
        helper.make_node("Identity", ["w2_init"], ["w2"], name="id_w2"),
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "matmul_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w2, "w2_init")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model



def attention_block(width: int = 256, tokens: int = 128, seed: int = 0) -> onnx.ModelProto:
    """One head of a transformer's attention, x[1,tokens,width] -> y: Q, K and V projections with
    their bias Adds, the scores Q Kᵀ (a MatMul of two activations) scaled by 1/sqrt(width), Softmax,
    the context (probabilities x V, two activations again), the output projection and its bias."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.float32(1 / np.sqrt(width)), "scale")]
    for p in "qkvo":
        inits += [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                          f"w{p}"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(np.float32) * 0.1, f"b{p}")]
    nodes = []
    for p in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                  helper.make_node("Add", [f"{p}0", f"b{p}"], [p], name=f"{p}_bias")]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
              helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
              helper.make_node("MatMul", ["context", "wo"], ["o0"], name="o_proj"),
              helper.make_node("Add", ["o0", "bo"], ["y"], name="o_bias")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])



def post_norm_block(width: int = 64, tokens: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Two residual blocks, x[1,tokens,width] -> y: h1 = x W1, r1 = x + h1 -> LayerNormalization n1
    (BERT's post-norm: r1's only reader; onnxruntime fuses the two into SkipLayerNormalization), then
    h2 = n1 W2, r2 = n1 + h2 -> LayerNormalization n2, and y = n2 + r2 (r2 has two readers: not fused)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                     f"w{i}") for i in (1, 2)]
    inits += [numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(width, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Add", ["x", "h1"], ["r1"], name="res1"),
             helper.make_node("LayerNormalization", ["r1", "gamma", "beta"], ["n1"], name="ln1", axis=-1),
             helper.make_node("MatMul", ["n1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Add", ["n1", "h2"], ["r2"], name="res2"),
             helper.make_node("LayerNormalization", ["r2", "gamma", "beta"], ["n2"], name="ln2", axis=-1),
             helper.make_node("Add", ["n2", "r2"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "post_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def silu_net(seed: int = 0) -> onnx.ModelProto:
    """YOLO's convolution blocks: x[N,3,16,16] -> Conv c0 -> SiLU (Sigmoid, Mul) -> Conv c1 -> SiLU ->
    Conv c2 -> GlobalAveragePool -> Flatten -> y."""
    rng = np.random.default_rng(seed)
    inits, nodes, cin = [], [], 3
    for i in range(3):
        w = (rng.standard_normal((8, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"c{i}_w"),
                  numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), f"c{i}_b")]
        source = "x" if i == 0 else f"m{i - 1}"
        nodes.append(helper.make_node("Conv", [source, f"c{i}_w", f"c{i}_b"], [f"h{i}"], name=f"c{i}", pads=[1, 1, 1, 1]))
        if i < 2:
            nodes += [helper.make_node("Sigmoid", [f"h{i}"], [f"s{i}"], name=f"sigmoid{i}"),
                      helper.make_node("Mul", [f"h{i}", f"s{i}"], [f"m{i}"], name=f"silu{i}")]
        cin = 8
    nodes += [helper.make_node("GlobalAveragePool", ["h2"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "silu_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def c2f_net(seed: int = 0) -> onnx.ModelProto:
    """YOLOv8's C2f block: x[N,3,16,16] -> Conv c0 -> SiLU -> Split into a, b (4 channels each);
    b -> Conv b0 -> SiLU -> Conv b1 -> SiLU -> r = b + that (residual Add); Concat(a, b, r) -> Conv c1 ->
    GlobalAveragePool -> Flatten -> y. Every join reads another join's output."""
    rng = np.random.default_rng(seed)
    inits, nodes = [numpy_helper.from_array(np.array([4, 4], np.int64), "halves")], []

    def conv(name: str, source: str, cin: int, cout: int, silu: bool) -> str:
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_h"], name=name,
                                      pads=[1, 1, 1, 1]))
        if not silu:
            return f"{name}_h"
        nodes.extend([helper.make_node("Sigmoid", [f"{name}_h"], [f"{name}_s"], name=f"{name}_sigmoid"),
                      helper.make_node("Mul", [f"{name}_h", f"{name}_s"], [f"{name}_m"], name=f"{name}_silu")])
        return f"{name}_m"

    nodes.append(helper.make_node("Split", [conv("c0", "x", 3, 8, True), "halves"], ["a", "b"], name="split", axis=1))
    nodes.append(helper.make_node("Add", ["b", conv("b1", conv("b0", "b", 4, 4, True), 4, 4, True)], ["r"], name="residual"))
    nodes.append(helper.make_node("Concat", ["a", "b", "r"], ["cat"], name="concat", axis=1))
    nodes += [helper.make_node("GlobalAveragePool", [conv("c1", "cat", 12, 8, False)], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "c2f_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def depthwise_net(seed: int = 0, channels: int = 32, expanded: int = 96, size: int = 28) -> onnx.ModelProto:
    """MobileNet's inverted block: x[N,channels,size,size] -> 1x1 Conv pw0 (to ``expanded``) -> Relu ->
    3x3 depthwise Conv dw -> Relu -> 1x1 Conv pw1 (back to ``channels``) -> Relu -> GlobalAveragePool
    -> Flatten -> y."""
    rng = np.random.default_rng(seed)
    inits, nodes, source = [], [], "x"
    for name, shape, group in (("pw0", (expanded, channels, 1, 1), 1), ("dw", (expanded, 1, 3, 3), expanded),
                               ("pw1", (channels, expanded, 1, 1), 1)):
        fan_in = shape[1] * shape[2] * shape[3]
        inits += [numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array((rng.standard_normal(shape[0]) * 0.1).astype(np.float32), f"{name}_b")]
        pad = shape[2] // 2
        nodes += [helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_h"], name=name, group=group,
                                   pads=[pad] * 4),
                  helper.make_node("Relu", [f"{name}_h"], [f"{name}_r"], name=f"{name}_relu")]
        source = f"{name}_r"
    nodes += [helper.make_node("GlobalAveragePool", [source], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "depthwise_net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def dq_fed(model: onnx.ModelProto, ops: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")) -> list[str]:
    """Names of nodes of ``ops`` whose weight (input 1) is not produced by DequantizeLinear."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ops and producers.get(n.input[1]) != "DequantizeLinear"]


def calibrated_jax_mlp(hidden: int = 8):
    """x[32, 16] -> relu(x @ w1) @ w2 traced from JAX and calibrated on x: (IR model, x)."""
    import jax.numpy as jnp  # deferred: JAX takes seconds to import, and most tests need none of it

    from qinject.frontends.jax_frontend import trace_jax
    from qinject.passes import Calibrate
    from qinject.core.pass_manager import PassManager

    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((16, hidden)).astype(np.float32),
              "w2": rng.standard_normal((hidden, 4)).astype(np.float32)}
    x = rng.standard_normal((32, 16)).astype(np.float32)
    model = trace_jax(lambda p, x: jnp.maximum(x @ p["w1"], 0.0) @ p["w2"], params, x)
    return PassManager([Calibrate({"x": x}, progress=False)]).run(model).model, x
