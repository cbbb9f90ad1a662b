"""Fuzzing: hypothesis builds random graphs of the supported ops (convolutions, Gemm, MatMul, ReLU,
sigmoid, max/average pooling, residual Add, Concat, Flatten) with random weights and random plans,
the head optionally inside control flow (an If choosing between two heads, or a Loop adding the
head's output twice; both read outer-scope values and weights, and the plans name body nodes too),
and each goes through the whole quantize pipeline: no crash (a refusal must be a one-line
QinjectError), a checker-valid output that onnxruntime runs, and with every node at W16A16 outputs
equal to float within 1e-2 relative to the output's range (16-bit steps are ~1.5e-5 of a range; a
few chained layers and MinMax ranges over 8 calibration samples leave far less than 1e-2).

The default suite runs 25 cases; ``-m long`` runs 1,000 (about 50 s on 2 cores).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qinject
from qinject.backends import onnx_backend
from qinject.core.errors import QinjectError
from qinject.plan import NodeQuant, Plan

BLOCKS = ("conv3", "conv1", "relu", "sigmoid", "maxpool", "avgpool", "residual", "concat")


def build(blocks: list[str], channels: list[int], seed: int, head: str,
          wrap: str | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A [1, 3, 8, 8] -> [1, 5] network from the block list, its head inside ``wrap`` ("if", "loop")
    if given; returns it and its quantizable node names."""
    rng = np.random.default_rng(seed)
    nodes, inits, quantizable = [], [], []
    c, hw, cur = 3, 8, "x"

    def conv(src: str, cin: int, cout: int, k: int, name: str) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                      pads=[k // 2] * 4))
        quantizable.append(name)
        return f"{name}.y"

    for i, (block, width) in enumerate(zip(blocks, channels)):
        name = f"b{i}"
        if block in ("conv3", "conv1"):
            cur, c = conv(cur, c, width, 3 if block == "conv3" else 1, name), width
        elif block in ("relu", "sigmoid"):
            nodes.append(helper.make_node("Relu" if block == "relu" else "Sigmoid", [cur], [f"{name}.y"], name=name))
            cur = f"{name}.y"
        elif block in ("maxpool", "avgpool") and hw >= 2:
            op = "MaxPool" if block == "maxpool" else "AveragePool"
            nodes.append(helper.make_node(op, [cur], [f"{name}.y"], name=name, kernel_shape=[2, 2], strides=[2, 2]))
            cur, hw = f"{name}.y", hw // 2
        elif block == "residual":
            branch = conv(cur, c, c, 3, f"{name}.conv")
            nodes.append(helper.make_node("Add", [cur, branch], [f"{name}.y"], name=name))
            cur = f"{name}.y"
        elif block == "concat":
            branch = conv(cur, c, width, 1, f"{name}.conv")
            nodes.append(helper.make_node("Concat", [cur, branch], [f"{name}.y"], name=name, axis=1))
            cur, c = f"{name}.y", c + width
    nodes.append(helper.make_node("Flatten", [cur], ["flat"], name="flatten"))
    features = c * hw * hw

    def head_node(name: str, out: str) -> onnx.NodeProto:
        w = (rng.standard_normal((features, 5)) / np.sqrt(features)).astype(np.float32)
        quantizable.append(name)
        if head == "gemm":
            inits.extend([numpy_helper.from_array(w.T.copy(), f"{name}.w"),
                          numpy_helper.from_array(np.zeros(5, np.float32), f"{name}.b")])
            return helper.make_node("Gemm", ["flat", f"{name}.w", f"{name}.b"], [out], name=name, transB=1)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        return helper.make_node("MatMul", ["flat", f"{name}.w"], [out], name=name)

    def body(name: str, inputs: list, outputs: list[str], body_nodes: list) -> onnx.GraphProto:
        return helper.make_graph(body_nodes, name, inputs,
                                 [helper.make_tensor_value_info(o, TensorProto.FLOAT if o != "cond_out" else
                                                                TensorProto.BOOL, None) for o in outputs])

    if wrap == "if":  # the sign of sum(x) picks one of two heads
        then_g = body("then", [], ["then.out"], [head_node("head", "then.out")])
        else_g = body("else", [], ["else.out"], [head_node("head_else", "else.out")])
        inits.append(numpy_helper.from_array(np.array(0, np.float32), "zero"))
        nodes += [helper.make_node("ReduceSum", ["x"], ["sum_x"], name="sum_x", keepdims=0),
                  helper.make_node("Greater", ["sum_x", "zero"], ["positive"], name="positive"),
                  helper.make_node("If", ["positive"], ["out"], name="if", then_branch=then_g, else_branch=else_g)]
    elif wrap == "loop":  # out = head(flat) + head(flat), carried through two iterations
        loop_body = body("loop_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                       helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                                       helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, 5])],
                         ["cond_out", "acc_out"],
                         [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"),
                          head_node("head", "head.y"),
                          helper.make_node("Add", ["acc", "head.y"], ["acc_out"], name="accumulate")])
        inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"),
                  numpy_helper.from_array(np.array(True), "true"),
                  numpy_helper.from_array(np.zeros((1, 5), np.float32), "acc0")]
        nodes.append(helper.make_node("Loop", ["trips", "true", "acc0"], ["out"], name="loop", body=loop_body))
    else:
        nodes.append(head_node("head", "out"))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), quantizable


CHOICES = (None, NodeQuant(weights=4, activations=8), NodeQuant(weights=8, activations=8),
           NodeQuant(weights=16, activations=16), NodeQuant(weights=8, activations=8, per_channel=False))


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    blocks = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6))
    channels = draw(st.lists(st.integers(1, 6), min_size=len(blocks), max_size=len(blocks)))
    seed = draw(st.integers(0, 2**16))
    head = draw(st.sampled_from(("gemm", "matmul")))
    wrap = draw(st.sampled_from((None, None, "if", "loop")))
    picks = draw(st.lists(st.integers(0, len(CHOICES) - 1), min_size=20, max_size=20))
    return blocks, channels, seed, head, wrap, picks


def check_case(case: tuple, tmp_path_factory: pytest.TempPathFactory) -> None:
    blocks, channels, seed, head, wrap, picks = case
    model, names = build(blocks, channels, seed, head, wrap)
    x = np.random.default_rng(seed).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)
    feeds = [{"x": xi} for xi in x]
    reference = onnx_backend.session(model).run(None, feeds[0])[0]
    folder = tmp_path_factory.mktemp("fuzz")
    plans = [Plan.uniform(16, 16), Plan(None, {n: CHOICES[p] for n, p in zip(names, picks)})]
    for k, plan in enumerate(plans):
        out = folder / f"q{k}.onnx"
        try:
            qinject.quantize_onnx(model, out, plan=plan, calib=feeds, progress=False)
        except QinjectError as exc:  # a refusal is allowed, as one clear line
            assert str(exc) and "\n" not in str(exc)
            assert not out.exists()
            continue
        onnx.checker.check_model(str(out), full_check=True)
        got = onnx_backend.session(out).run(None, feeds[0])[0]
        assert got.shape == reference.shape and np.all(np.isfinite(got))
        if k == 0:
            span = max(float(np.ptp(reference)), 1e-3)
            assert np.abs(got - reference).max() <= 1e-2 * span, (blocks, channels, head, wrap)


FUZZ = settings(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FUZZ, max_examples=25)
@given(case=cases())
def test_random_graphs_and_plans(case, tmp_path_factory):
    check_case(case, tmp_path_factory)


@pytest.mark.long
@settings(FUZZ, max_examples=1000)
@given(case=cases())
def test_random_graphs_and_plans_long(case, tmp_path_factory):
    check_case(case, tmp_path_factory)
