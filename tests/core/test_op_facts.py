"""The op-facts table holds every per-op fact the passes, cost, profiler and backends read."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qinject.backends import jax_integer
from qinject.core import op_facts


def _node(op_type: str, n_inputs: int = 2, **attrs: object) -> ir.Node:
    inputs = [ir.Value(name=f"in{i}") for i in range(n_inputs)]
    node = ir.node(op_type, inputs, attrs, name=op_type.lower())
    node.outputs[0].name = "out"
    return node


def test_every_integer_kernel_an_entry_names_has_a_builder():
    named = {f.integer_kernel for f in op_facts.OP_FACTS.values() if f.integer_kernel is not None}
    assert named == {"onnx-conv", "onnx-gemm", "onnx-matmul", "jax-dot", "jax-conv"}
    assert named <= set(jax_integer.INTEGER_KERNELS)
    assert op_facts.OP_FACTS[("", "ConvTranspose")].integer_kernel is None  # runs dequantized in float


def test_gemm_bias_fuses_only_as_a_plain_vector_with_unit_factors():
    bias = np.zeros(4, np.float32)
    assert op_facts.bias_unfused(_node("Gemm", 3), bias) is None
    assert "alpha = beta = 1" in op_facts.bias_unfused(_node("Gemm", 3, alpha=2.0), bias)
    assert "alpha = beta = 1" in op_facts.bias_unfused(_node("Gemm", 3, beta=0.5), bias)
    assert "1-D" in op_facts.bias_unfused(_node("Gemm", 3), bias.reshape(1, 4))
    assert op_facts.bias_unfused(_node("Conv", 3), bias.reshape(1, 4)) is None


@pytest.mark.parametrize(("op", "rank", "axis"), [("Conv", 4, 1), ("ConvTranspose", 5, 1), ("Gemm", 2, 1),
                                                  ("MatMul", 3, 2)])
def test_output_channel_axis(op, rank, axis):
    assert op_facts.output_channel_axis(_node(op), rank) == axis


def test_an_op_without_an_output_channel_axis_is_named():
    with pytest.raises(KeyError, match="'Relu'.*'relu'"):
        op_facts.output_channel_axis(_node("Relu", 1), 4)


def test_layout_dense_and_group_facts():
    assert [op for op in ("Conv", "ConvTranspose", "Gemm", "MatMul") if op_facts.fact(_node(op)).sets_layout] == [
        "Conv", "ConvTranspose"]
    assert [op for op in ("Conv", "ConvTranspose", "Gemm", "MatMul") if op_facts.fact(_node(op)).dense] == [
        "Gemm", "MatMul"]
    assert op_facts.groups(_node("Conv", group=4)) == 4 and op_facts.groups(_node("Conv")) == 1


def test_gemm_and_matmul_need_a_quantized_output_only_before_a_relu():
    for op in ("Gemm", "MatMul"):
        node = _node(op)
        assert not op_facts.needs_quantized_output(node)
        ir.node("Relu", [node.outputs[0]])
        assert op_facts.needs_quantized_output(node)
    assert op_facts.needs_quantized_output(_node("Conv"))


def test_two_activations_make_matmul_quantizable_without_a_weight():
    matmul, conv = _node("MatMul"), _node("Conv")
    assert op_facts.is_quantizable(matmul) and op_facts.activation_inputs(matmul) == [0, 1]
    assert not op_facts.is_quantizable(conv)


def test_ops_that_carry_their_inputs_range_and_which_outputs_do():
    """Nearest Resize picks input values (onnxruntime runs it on uint8); linear mixes them. Every
    piece of a Split carries the range; MaxPool's second output (indices) does not."""
    assert op_facts.preserves_range(_node("Resize", 3, mode="nearest"))
    assert op_facts.preserves_range(_node("Resize", 3))  # nearest is the default
    assert not op_facts.preserves_range(_node("Resize", 3, mode="linear"))
    split = ir.node("Split", [ir.Value(name="x")], {"axis": 1}, num_outputs=3)
    assert op_facts.carried(split) == tuple(split.outputs)
    pool = ir.node("MaxPool", [ir.Value(name="x")], {"kernel_shape": [2, 2]}, num_outputs=2)
    assert op_facts.carried(pool) == (pool.outputs[0],)
    assert op_facts.carried(_node("Relu", 1)) == ()


def test_a_concat_joins_integers_only_of_activations():
    """onnxruntime fuses QLinearConcat only when every input is dequantized; a constant has no pair."""
    assert op_facts.joins_integers(_node("Concat", 2, axis=1))
    const = ir.Value(name="c", const_value=ir.tensor(np.zeros((1, 2), np.float32)))
    node = ir.node("Concat", [ir.Value(name="x"), const], {"axis": 1}, name="cat")
    assert not op_facts.joins_integers(node)
