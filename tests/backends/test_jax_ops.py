"""The JAX backend's ONNX op table against onnxruntime, one single-node model per case.

Each case builds a one-node ONNX model inline and runs it in onnxruntime (or, for dtypes its Python
API cannot return, in onnx's reference evaluator). The lowering from ``ONNX_OPS`` then runs on the
same inputs under ``jax.jit``, shape-deciding inputs closed over as numpy (dtypes as JAX canonicalises
them); again under ``jax_enable_x64`` for cases with non-float32 types (dtypes exactly onnxruntime's);
and eagerly on numpy inputs, where shape arithmetic must stay numpy with exact dtypes. A few
differentiable ops are checked with ``jax.grad`` against finite differences.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qinject.backends.jax_ops import ONNX_OPS, attr, opset, static
from qinject.core.errors import UnsupportedModelError

RNG = np.random.default_rng(20240611)
I64_MAX, I64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def f32(*shape: int, low: float | None = None, high: float | None = None) -> np.ndarray:
    if low is None:
        return RNG.standard_normal(shape).astype(np.float32)
    return RNG.uniform(low, high, shape).astype(np.float32)


def pos(*shape: int) -> np.ndarray:
    return f32(*shape, low=0.5, high=2.0)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def ints(*shape: int, low: int = -10, high: int = 10, dtype: Any = np.int64) -> np.ndarray:
    return RNG.integers(low, high, shape).astype(dtype)


def u8(*shape: int) -> np.ndarray:
    return ints(*shape, low=0, high=256, dtype=np.uint8)


def s8(*shape: int) -> np.ndarray:
    return ints(*shape, low=-128, high=128, dtype=np.int8)


def bools(*shape: int) -> np.ndarray:
    return RNG.random(shape) < 0.5


# Inputs that decide shapes: closed over as numpy constants under jit (the interpreter makes them
# concrete); every other input is a jit argument.
STATIC_INPUTS = {"Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4}, "Squeeze": {1},
                 "Unsqueeze": {1}, "Split": {1}, "Pad": {1, 3}, "ConstantOfShape": {0}, "Range": {0, 1, 2},
                 "CumSum": {1}, "Trilu": {1}, "Dropout": {2}}
for _kind in ("Sum", "Mean", "Max", "Min", "Prod", "L1", "L2", "LogSum", "LogSumExp", "SumSquare"):
    STATIC_INPUTS[f"Reduce{_kind}"] = {1}


@dataclass
class Case:
    op: str
    inputs: list[np.ndarray | None]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    outputs: int = 1
    tol: float = 1e-5
    static: set[int] = field(default_factory=set)
    reference: bool = False  # expected values from onnx's reference evaluator, not onnxruntime


_counters: dict[str, itertools.count] = {}


def case(op: str, *inputs: np.ndarray | None, opset: int = 17, outputs: int = 1, tol: float = 1e-5,
         static: set[int] | None = None, reference: bool = False, id: str = "", **attrs: Any) -> Any:
    static = STATIC_INPUTS.get(op, set()) if static is None else static
    c = Case(op, list(inputs), attrs, opset, outputs, tol, set(static), reference)
    return pytest.param(c, id=f"{op}-{id or next(_counters.setdefault(op, itertools.count()))}")


UNARY_FLOAT = [
    ("Exp", f32(3, 4)), ("Log", pos(3, 4)), ("Sqrt", pos(3, 4)), ("Reciprocal", pos(3, 4)),
    ("Tanh", f32(3, 4)),
    ("Sin", f32(3, 4)), ("Cos", f32(3, 4)), ("Tan", f32(3, 4, low=-1, high=1)),
    ("Asin", f32(3, 4, low=-0.9, high=0.9)), ("Acos", f32(3, 4, low=-0.9, high=0.9)), ("Atan", f32(3, 4)),
    ("Sinh", f32(3, 4)), ("Cosh", f32(3, 4)), ("Asinh", f32(3, 4)), ("Acosh", f32(3, 4, low=1.1, high=3)),
    ("Atanh", f32(3, 4, low=-0.9, high=0.9)), ("Erf", f32(3, 4)), ("Floor", f32(3, 4) * 3),
    ("Ceil", f32(3, 4) * 3), ("Round", np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51], np.float32)),
    ("Sigmoid", f32(3, 4)), ("Softplus", f32(3, 4)), ("Softsign", f32(3, 4)), ("Relu", f32(3, 4)),
    ("Abs", f32(3, 4)), ("Neg", f32(3, 4)), ("Sign", np.array([-2.0, 0.0, 3.0], np.float32)),
    ("IsNaN", np.array([1.0, np.nan, -np.inf], np.float32)), ("Identity", f32(2, 3)),
]

CASES = [
    *(case(op, x, opset=13, id="f32") for op, x in UNARY_FLOAT),
    case("Mish", f32(3, 4), opset=18),
    case("Abs", ints(5), id="i64"), case("Neg", ints(5, dtype=np.int32), id="i32"),
    case("Sign", ints(6), id="i64"), case("Relu", ints(6, dtype=np.int32), opset=14, id="i32"),
    case("Not", bools(7)), case("BitwiseNot", ints(5, dtype=np.int32), opset=18),
    case("IsInf", np.array([1.0, np.inf, -np.inf, np.nan], np.float32), opset=10),
    case("IsInf", np.array([1.0, np.inf, -np.inf], np.float32), opset=10, detect_negative=0, id="pos"),
    # Binary, with broadcasting.
    *(case(op, f32(2, 3, 4), f32(3, 1), opset=14, id="bcast") for op in ("Add", "Sub", "Mul", "Div")),
    case("Add", ints(4), ints(4), id="i64"), case("Mul", i64(2, 3), i64(4), id="i64"),
    case("Div", i64(7, -7, 7, -7, 6, 0), i64(2, 2, -2, -2, 3, 5), id="i64-trunc"),
    case("Div", ints(6, dtype=np.int32), ints(6, low=1, high=4, dtype=np.int32), id="i32"),
    case("Mod", i64(7, -7, 7, -7), i64(3, 3, -3, -3), opset=13, id="i64"),
    case("Mod", f32(5) * 5, pos(5), opset=13, fmod=1, id="fmod"),
    case("Mod", i64(7, -7, 7, -7), i64(3, 3, -3, -3), opset=13, fmod=1, id="i64-fmod"),
    case("Pow", pos(3, 4), f32(4), opset=15, tol=1e-4, id="f32"),
    case("Pow", f32(3, 4), i64(2), opset=15, id="int-exponent"),
    case("Pow", f32(3, 4), np.array(3.0, np.float32), opset=15, id="neg-base"),
    case("Pow", i64(2, 3, 4), i64(3), opset=15, id="i64"),
    case("Equal", i64(1, 2, 3), i64(1, 0, 3), opset=13, id="i64"),
    case("Equal", np.array([1.0, 2.0], np.float32), np.array([1.0], np.float32), opset=13, id="f32"),
    case("Less", f32(3, 4), f32(4), opset=13), case("Greater", f32(3, 4), f32(4), opset=13),
    case("LessOrEqual", ints(8, low=0, high=3), ints(8, low=0, high=3), opset=16),
    case("GreaterOrEqual", f32(3, 4), f32(3, 4), opset=16),
    *(case(op, bools(4, 5), bools(5)) for op in ("And", "Or", "Xor")),
    *(case(op, ints(6, high=100, dtype=np.int32), ints(6, high=100, dtype=np.int32), opset=18)
      for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")),
    case("BitShift", ints(5, low=0, high=50, dtype=np.uint8), np.array([1, 2, 0, 3, 1], np.uint8),
         direction="LEFT", id="left"),
    case("BitShift", ints(5, low=0, high=5000, dtype=np.uint32), np.array([1, 2, 0, 3, 4], np.uint32),
         direction="RIGHT", id="right"),
    case("Max", f32(2, 3), f32(3), f32(1, 3), opset=13), case("Min", f32(2, 3), f32(2, 1), opset=13),
    case("Max", i64(1, 5, -2), i64(3), opset=13, id="i64"),
    case("Sum", f32(2, 3), f32(2, 3), opset=8, id="two"), case("Sum", f32(2, 3), f32(3), f32(2, 1), opset=13),
    case("Mean", f32(2, 3), f32(3), opset=13),
    case("Where", bools(2, 3), f32(2, 3), f32(3), opset=16),
    case("Where", bools(4), ints(4), i64(-1), opset=16, id="i64"),
    # Activations.
    case("LeakyRelu", f32(3, 4), alpha=0.1), case("LeakyRelu", f32(3, 4), id="default"),
    case("PRelu", f32(2, 3, 4, 4), f32(3, 1, 1), opset=16), case("PRelu", f32(2, 3, 4), f32(3, 1), opset=16),
    case("ThresholdedRelu", f32(3, 4), alpha=0.5), case("Elu", f32(3, 4), alpha=0.7),
    case("Selu", f32(3, 4)), case("Selu", f32(3, 4), alpha=1.5, gamma=2.0, id="custom"),
    case("Celu", f32(3, 4), alpha=1.5), case("HardSigmoid", f32(3, 4), alpha=0.3, beta=0.4),
    case("HardSwish", f32(3, 4) * 4, opset=14),
    case("Gelu", f32(3, 4), opset=20), case("Gelu", f32(3, 4), opset=20, approximate="tanh", id="tanh"),
    case("Clip", f32(3, 4), opset=6, min=-0.5, max=0.5, id="attrs"),
    case("Clip", f32(3, 4), np.array(-0.5, np.float32), np.array(0.3, np.float32), opset=13),
    case("Clip", f32(3, 4), None, np.array(0.3, np.float32), opset=13, id="max-only"),
    case("Clip", ints(6), i64(-3), i64(4), opset=13, id="i64"),
    # Types.
    case("Cast", f32(8) * 5, to=TensorProto.INT64, opset=13, id="f32-i64"),
    case("Cast", f32(8) * 5, to=TensorProto.INT32, opset=13, id="f32-i32"),
    case("Cast", ints(5), to=TensorProto.FLOAT, opset=13, id="i64-f32"),
    case("Cast", np.array([0.0, 1.5, -2.0], np.float32), to=TensorProto.BOOL, opset=13, id="f32-bool"),
    case("Cast", bools(5), to=TensorProto.FLOAT, opset=13, id="bool-f32"),
    case("Cast", f32(5), to=TensorProto.FLOAT16, opset=13, tol=1e-3, id="f32-f16"),
    case("Cast", f32(5), to=TensorProto.DOUBLE, opset=13, id="f32-f64"),
    # Float to integer out of range is undefined in the ONNX spec, so runtimes are compared in range
    # only (truncation toward zero at the edges); qinject's own out-of-range choice is tested below.
    case("Cast", np.array([127.9, -128.0, -3.7, 3.7], np.float32), to=TensorProto.INT8, opset=13,
         id="f32-i8"),
    # onnxruntime's Python API cannot return float8/int4 arrays: onnx's reference evaluator instead.
    case("Cast", np.array([1e6, np.inf, -np.inf, np.nan, 0.3], np.float32), to=TensorProto.FLOAT8E4M3FN,
         opset=19, reference=True, id="f32-f8-saturate"),
    case("Cast", np.array([7.0, -8.0, 3.0, -2.0], np.float32), to=TensorProto.INT4, opset=21, reference=True,
         id="f32-i4"),
    case("CastLike", ints(5), f32(1), opset=15),
    # Shapes and layout.
    case("Shape", f32(2, 3, 4), opset=13),
    case("Shape", f32(2, 3, 4, 5), opset=15, start=1, end=-1, id="slice"),
    case("Size", f32(2, 3, 4), opset=13),
    case("Reshape", f32(2, 3, 4), i64(0, -1), opset=13),
    case("Reshape", f32(2, 3, 4), i64(4, 1, 6), opset=13),
    case("Reshape", np.zeros((0, 3), np.float32), i64(3, 0), opset=14, allowzero=1, id="allowzero"),
    case("Flatten", f32(2, 3, 4, 5), opset=13), case("Flatten", f32(2, 3, 4), axis=0, opset=13, id="axis0"),
    case("Flatten", f32(2, 3, 4, 5), axis=-1, opset=13, id="neg"),
    case("Squeeze", f32(1, 3, 1, 4, 1), i64(0, -1), opset=13),
    case("Squeeze", f32(1, 3, 1, 4), opset=13, id="all"),
    case("Squeeze", f32(3, 1, 4), opset=11, axes=[1], id="attr"),
    case("Unsqueeze", f32(3, 4), i64(0, -1), opset=13),
    case("Unsqueeze", f32(3, 4), opset=11, axes=[1, 2], id="attr"),
    case("Unsqueeze", i64(5), i64(0), opset=13, id="i64"),
    case("Transpose", f32(2, 3, 4, 5), perm=[0, 2, 1, 3]), case("Transpose", f32(2, 3, 4), id="default"),
    case("Concat", f32(2, 3), f32(2, 1), f32(2, 2), axis=1),
    case("Concat", f32(2, 3), f32(1, 3), axis=-2, id="neg"),
    case("Concat", i64(2, 3), i64(I64_MAX), i64(-1), axis=0, static={0, 1, 2}, id="i64-max"),
    case("Split", f32(2, 6), i64(2, 4), axis=1, outputs=2, opset=13),
    case("Split", f32(6, 2), outputs=3, opset=13, id="equal"),
    case("Split", f32(3, 4), axis=1, split=[1, 3], outputs=2, opset=11, id="attr"),
    case("Split", f32(7, 2), outputs=3, opset=18, num_outputs=3, id="uneven"),
    case("Slice", f32(5, 6), i64(1, 0), i64(4, 6), opset=13),
    case("Slice", f32(5, 6), i64(-4), i64(I64_MAX), i64(1), opset=13, id="to-end"),
    case("Slice", f32(5, 6), i64(-1), i64(I64_MIN), i64(0), i64(-1), opset=13, id="reverse"),
    case("Slice", f32(5, 6), i64(4, 5), i64(0, -100), i64(0, 1), i64(-2, -2), opset=13, id="neg-steps"),
    case("Slice", f32(5, 6, 4), i64(0, 1), i64(6, 3), i64(-1, 0), i64(2, 1), opset=13, id="steps"),
    case("Slice", f32(5, 6), i64(1), i64(3), opset=13, static={1, 2}, id="no-axes"),
    case("Slice", f32(5, 6), opset=9, starts=[1, -3], ends=[100, -1], axes=[0, 1], id="attrs"),
    case("Slice", i64(2, 3, 4, 5), i64(1), i64(3), i64(0), static={0, 1, 2, 3}, opset=13, id="shape"),
    case("Gather", f32(5, 4), i64(0, -1, 2), opset=13), case("Gather", f32(3, 5), ints(2, 2, low=-5, high=5),
                                                              axis=1, opset=13, id="axis1"),
    case("Gather", i64(2, 3, 4), np.array(-1, np.int64), opset=13, id="scalar"),
    case("GatherElements", f32(3, 4), ints(3, 2, low=-4, high=4), axis=1, opset=13),
    case("Expand", f32(3, 1), i64(2, 3, 4), opset=13),
    case("Expand", f32(2, 3, 1), i64(1, 1, 5), opset=13, id="2way"),
    case("Tile", f32(2, 3, 1), i64(2, 1, 3), opset=13),
    case("ConstantOfShape", i64(2, 3), opset=13, id="default"),
    case("ConstantOfShape", i64(4), opset=13, id="i64",
         value=helper.make_tensor("v", TensorProto.INT64, [1], [7])),
    case("ConstantOfShape", i64(2, 2), opset=13,
         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])),
    case("Range", np.array(0, np.int64), np.array(10, np.int64), np.array(3, np.int64), opset=13, id="i64"),
    case("Range", np.array(1.0, np.float32), np.array(2.0, np.float32), np.array(0.3, np.float32), opset=13),
    case("Range", np.array(10, np.int32), np.array(2, np.int32), np.array(-3, np.int32), opset=13, id="down"),
    case("Pad", f32(2, 3, 4), i64(0, 1, 2, 0, 2, 1), np.array(0.5, np.float32), opset=13, id="constant"),
    case("Pad", f32(2, 3, 4), i64(0, 1, 2, 0, 1, 3), opset=13, mode="reflect", id="reflect"),
    case("Pad", f32(2, 3, 4), i64(0, 2, 1, 0, 1, 3), opset=13, mode="edge", id="edge"),
    case("Pad", f32(2, 3, 4), i64(0, -1, 2, 0, 1, -2), opset=13, id="negative"),
    case("Pad", f32(2, 3, 4), opset=2, pads=[0, 1, 1, 0, 1, 1], value=2.0, id="attrs"),
    case("Pad", f32(2, 3, 4), i64(1, 2, 1, 3), None, i64(1, -1), opset=19, mode="wrap", id="wrap-axes"),
    case("Trilu", f32(2, 4, 5), np.array(1, np.int64), opset=14), case("Trilu", f32(4, 5), opset=14, id="k0"),
    case("Trilu", f32(4, 5), np.array(-1, np.int64), opset=14, upper=0, id="lower"),
    case("DepthToSpace", f32(1, 8, 2, 3), opset=13, blocksize=2),
    case("DepthToSpace", f32(1, 8, 2, 3), opset=13, blocksize=2, mode="CRD", id="crd"),
    case("SpaceToDepth", f32(1, 2, 4, 6), opset=13, blocksize=2),
    case("SpaceToDepth", f32(1, 2, 4, 6), opset=28, blocksize=2, mode="CRD", id="crd"),
    # Reductions.
    case("ReduceSum", f32(2, 3, 4), i64(1), opset=13, keepdims=0),
    case("ReduceSum", f32(2, 3, 4), opset=13, id="all"),
    case("ReduceSum", f32(2, 3, 4), opset=13, noop_with_empty_axes=1, id="noop"),
    case("ReduceSum", f32(2, 3, 4), opset=11, axes=[0, -1], id="attr"),
    case("ReduceSum", ints(3, 4), i64(0), opset=13, id="i64"),
    case("ReduceMean", f32(2, 3, 4), opset=13, axes=[-1]),
    case("ReduceMean", f32(2, 3, 4), i64(1, 2), opset=18, keepdims=0, id="input"),
    case("ReduceMax", f32(2, 3, 4), opset=13, axes=[1], keepdims=0),
    case("ReduceMax", ints(3, 4), opset=13, axes=[1], id="i64"),
    case("ReduceMin", f32(2, 3, 4), i64(0, 2), opset=18),
    case("ReduceMax", np.zeros((2, 0, 3), np.float32), opset=18, keepdims=0, id="empty"),
    case("ReduceMin", np.zeros((0, 3), np.int64), i64(0), opset=18, id="empty-i64"),
    case("ReduceProd", f32(2, 3, 4), opset=13, axes=[2]),
    case("ReduceL1", f32(2, 3, 4), opset=13, axes=[1]), case("ReduceL2", f32(2, 3, 4), opset=13, axes=[1]),
    case("ReduceLogSum", pos(2, 3, 4), opset=13, axes=[1]),
    case("ReduceLogSumExp", f32(2, 3, 4), opset=13, axes=[1]),
    case("ReduceSumSquare", f32(2, 3, 4), i64(-1), opset=18),
    case("ArgMax", f32(3, 4), axis=1, keepdims=0, opset=13),
    case("ArgMin", f32(3, 4), opset=13, id="default"),
    case("ArgMax", i64(1, 3, 3, 0), opset=13, select_last_index=1, id="last"),
    case("ArgMin", i64(1, 0, 3, 0), opset=13, id="first"),
    case("CumSum", f32(3, 4), np.array(1, np.int64), opset=14),
    case("CumSum", f32(3, 4), np.array(0, np.int64), opset=14, exclusive=1, reverse=1, id="excl-rev"),
    case("CumSum", ints(5), np.array(0, np.int64), opset=14, exclusive=1, id="i64-excl"),
    # Contractions.
    case("MatMul", f32(3, 4), f32(4, 5), opset=13),
    case("MatMul", f32(2, 3, 4), f32(4, 5), opset=13, id="batch"),
    case("MatMul", f32(4), f32(4, 5), opset=13, id="vec-mat"),
    case("MatMul", f32(3, 4), f32(4), opset=13, id="mat-vec"),
    case("Gemm", f32(2, 6), f32(4, 6), f32(4), opset=9, transB=1, id="fc"),
    case("Gemm", f32(6, 2), f32(6, 4), f32(2, 4), opset=13, transA=1, alpha=0.5, beta=2.0, id="alpha"),
    case("Gemm", f32(2, 6), f32(6, 4), opset=13, id="no-c"),
    case("MatMulInteger", u8(3, 40), s8(40, 5), np.array(131, np.uint8), opset=10, id="u8s8"),
    case("MatMulInteger", u8(3, 4), u8(4, 5), np.array([200], np.uint8), u8(5), opset=10, id="per-column"),
    case("MatMulInteger", s8(2, 3, 4), s8(4, 5), None, np.array(-7, np.int8), opset=10, id="s8s8-batch"),
    case("MatMulInteger", u8(4), s8(4, 5), opset=10, id="vec-mat"),
    case("Einsum", f32(2, 3, 4), f32(2, 4, 5), opset=13, equation="bij,bjk->bik"),
    case("Einsum", f32(2, 2, 3, 4), f32(2, 2, 5, 4), opset=13, equation="bhqd, bhkd -> bhqk", id="attn"),
    case("Einsum", f32(3, 4), opset=13, equation="ij->ji", id="transpose"),
    # Softmax family: before opset 13 the input is coerced to 2-D at axis.
    case("Softmax", f32(2, 3, 4), opset=13), case("Softmax", f32(2, 3, 4), opset=13, axis=1, id="axis1"),
    case("Softmax", f32(2, 3, 4, 5), opset=11, id="old-default"),
    case("Softmax", f32(2, 3, 4), opset=11, axis=2, id="old-last"),
    case("Softmax", f32(1, 1000), opset=9, id="old-zoo"),
    case("LogSoftmax", f32(2, 3, 4), opset=11, axis=1, id="old"), case("LogSoftmax", f32(2, 3, 4), opset=13),
    case("Hardmax", f32(2, 3, 4), opset=13), case("Hardmax", f32(2, 3, 4), opset=11, id="old"),
    # Convolution (the light zoo, pytorch-converted and magika variants).
    case("Conv", f32(2, 3, 10), f32(4, 3, 3), f32(4), kernel_shape=[3], id="1d"),
    case("Conv", f32(2, 4, 10), f32(6, 2, 3), f32(6), group=2, dilations=[2], pads=[1, 2], id="1d-groups"),
    case("Conv", f32(2, 3, 10), f32(4, 3, 3), strides=[3], pads=[2, 2], id="1d-stride"),
    case("Conv", f32(2, 3, 8, 9), f32(5, 3, 3, 3), f32(5), pads=[1, 1, 1, 1], id="2d"),
    case("Conv", f32(1, 3, 11, 11), f32(4, 3, 5, 1), f32(4), kernel_shape=[5, 1], id="magika"),
    case("Conv", f32(2, 4, 8, 8), f32(4, 1, 3, 3), f32(4), group=4, pads=[1, 1, 1, 1], strides=[2, 2],
         id="depthwise"),
    case("Conv", f32(2, 4, 8, 8), f32(8, 1, 3, 3), group=4, id="depthwise-mult"),
    case("Conv", f32(2, 4, 9, 9), f32(6, 2, 3, 3), f32(6), group=2, dilations=[2, 2], strides=[2, 1],
         id="dilated"),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 3, 3), pads=[0, 1, 2, 0], id="asym-pads"),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 4, 4), strides=[2, 2], auto_pad="SAME_UPPER", id="same-upper"),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 4, 4), strides=[2, 2], auto_pad="SAME_LOWER", id="same-lower"),
    case("Conv", f32(1, 2, 7, 8), f32(3, 2, 3, 3), strides=[2, 2], auto_pad="VALID", id="valid"),
    case("Conv", f32(1, 2, 5, 6, 7), f32(4, 2, 3, 3, 3), f32(4), pads=[1] * 6, strides=[1, 2, 1], id="3d"),
    case("Conv", f32(1, 4, 6, 6, 6), f32(4, 2, 2, 2, 2), group=2, dilations=[2, 1, 2], id="3d-groups"),
    case("ConvTranspose", f32(2, 3, 5, 5), f32(3, 4, 3, 3), f32(4), id="2d"),
    case("ConvTranspose", f32(1, 3, 5, 6), f32(3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1],
         output_padding=[1, 0], id="stride-pads"),
    case("ConvTranspose", f32(1, 4, 5, 5), f32(4, 3, 3, 3), f32(6), group=2, strides=[2, 3], id="groups"),
    case("ConvTranspose", f32(1, 2, 4, 4), f32(2, 3, 3, 3), dilations=[2, 2], pads=[0, 1, 2, 0],
         id="dilated"),
    case("ConvTranspose", f32(1, 1, 3, 3), f32(1, 2, 3, 3), strides=[3, 2], output_shape=[10, 8],
         id="output-shape"),
    case("ConvTranspose", f32(1, 1, 3, 3), f32(1, 2, 3, 3), strides=[3, 2], output_shape=[8, 6],
         id="output-shape-odd"),
    case("ConvTranspose", f32(1, 2, 3, 4), f32(2, 2, 4, 3), strides=[2, 2],
         auto_pad="SAME_UPPER", id="same-upper"),
    case("ConvTranspose", f32(1, 2, 3, 4), f32(2, 2, 4, 3), strides=[2, 2],
         auto_pad="SAME_LOWER", id="same-lower"),
    case("ConvTranspose", f32(2, 3, 6), f32(3, 2, 4), f32(2), strides=[2], id="1d"),
    case("ConvTranspose", f32(1, 2, 3, 3, 3), f32(2, 2, 2, 2, 2), strides=[2, 2, 1], id="3d"),
    # Pooling.
    case("MaxPool", f32(2, 3, 9, 9), kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
         opset=9, id="alexnet"),
    case("MaxPool", f32(1, 2, 8, 9), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, opset=12, id="ceil"),
    case("MaxPool", f32(1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
         opset=12, id="ceil-pads"),
    case("MaxPool", f32(1, 2, 9, 9), kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 0, 1, 2], opset=12,
         id="dilated"),
    case("MaxPool", f32(1, 2, 7, 8), kernel_shape=[2, 2], strides=[2, 2],
         auto_pad="SAME_UPPER", id="same-upper"),
    case("MaxPool", f32(1, 2, 7, 8), kernel_shape=[2, 3], strides=[2, 2],
         auto_pad="SAME_LOWER", id="same-lower"),
    case("MaxPool", f32(1, 2, 7, 8), kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID", id="valid"),
    case("MaxPool", f32(2, 3, 10), kernel_shape=[3], strides=[2], pads=[1, 1], dilations=[2],
         opset=12, id="1d"),
    case("MaxPool", f32(1, 2, 5, 6, 7), kernel_shape=[2, 2, 2], strides=[2, 1, 2], id="3d"),
    case("MaxPool", ints(1, 2, 6, 6, dtype=np.int8), kernel_shape=[2, 2], opset=12, id="int8"),
    case("AveragePool", f32(2, 3, 8, 8), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], opset=9,
         id="pads-exclude"),
    case("AveragePool", f32(2, 3, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, opset=9,
         id="pads-include"),
    case("AveragePool", f32(1, 2, 7, 7), kernel_shape=[7, 7], pads=[0, 0, 1, 1], opset=9, id="inception"),
    case("AveragePool", f32(1, 2, 8, 9), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
         opset=12, id="ceil"),
    case("AveragePool", f32(1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
         count_include_pad=1, opset=12, id="ceil-include"),
    case("AveragePool", f32(1, 2, 7, 8), kernel_shape=[2, 3], strides=[2, 2],
         auto_pad="SAME_UPPER", id="same"),
    case("AveragePool", f32(1, 2, 9, 9), kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1], opset=19,
         id="dilated"),
    case("AveragePool", f32(2, 3, 10), kernel_shape=[4], strides=[3], id="1d"),
    case("AveragePool", f32(1, 2, 4, 5, 6), kernel_shape=[2, 2, 3], strides=[2, 2, 3], id="3d"),
    case("LpPool", f32(1, 2, 6, 6), kernel_shape=[2, 2], strides=[2, 2], opset=18),
    case("LpPool", f32(1, 2, 6, 6), kernel_shape=[3, 3], pads=[1, 1, 1, 1], p=1, opset=18, id="p1"),
    case("GlobalAveragePool", f32(2, 3, 4, 5)), case("GlobalMaxPool", f32(2, 3, 4, 5)),
    case("GlobalLpPool", f32(2, 3, 4, 5), p=3, tol=1e-4),
    # Normalisation and dropout.
    case("BatchNormalization", f32(2, 3, 4, 5), pos(3), f32(3), f32(3), pos(3), opset=15, epsilon=1e-3),
    case("BatchNormalization", f32(2, 3, 4), pos(3), f32(3), f32(3), pos(3), opset=9, id="1d"),
    case("BatchNormalization", f32(1, 2, 3, 3, 3), pos(2), f32(2), f32(2), pos(2), opset=14, id="3d"),
    case("InstanceNormalization", f32(2, 3, 4, 5), pos(3), f32(3), tol=1e-4),
    case("LayerNormalization", f32(2, 3, 8), pos(8), f32(8), tol=1e-4),
    case("LayerNormalization", f32(2, 3, 4), pos(3, 4), axis=1, outputs=3, tol=1e-4, id="3-outputs"),
    case("LRN", f32(2, 7, 4, 4), size=5, alpha=1e-4, beta=0.75, bias=1.0, opset=9, id="alexnet"),
    case("LRN", f32(2, 6, 3, 3), size=3, alpha=0.5, beta=0.6, bias=2.0, id="custom"),
    case("Dropout", f32(3, 4), opset=9, ratio=0.5, id="old"),
    case("Dropout", f32(3, 4), np.array(0.4, np.float32), opset=12, outputs=2, id="mask"),
    case("Dropout", f32(3, 4), np.array(0.4, np.float32), np.array(False), opset=13, id="inference"),
    case("LSTM", f32(5, 2, 4), f32(1, 12, 4), f32(1, 12, 3), f32(1, 24), opset=14, outputs=3, hidden_size=3,
         id="forward"),
    case("LSTM", f32(5, 2, 4), f32(2, 12, 4), f32(2, 12, 3), f32(2, 24), np.array([5, 3], np.int32),
         f32(2, 2, 3), f32(2, 2, 3), f32(2, 9), opset=14, outputs=3, hidden_size=3, direction="bidirectional",
         clip=2.0, id="bidirectional-lengths-peepholes-clip"),
    case("LSTM", f32(5, 2, 4), f32(1, 12, 4), f32(1, 12, 3), opset=14, outputs=2, hidden_size=3,
         direction="reverse", input_forget=1, activations=["Sigmoid", "Relu", "Tanh"], id="reverse-forget-relu"),
]

# Ops needing 64-bit results that jit cannot return exactly without x64 (checked there instead).
X64_ONLY = {"Concat-i64-max", "ReduceMin-empty-i64"}


# -- harness ------------------------------------------------------------------------------------------


def _model(c: Case) -> onnx.ModelProto:
    names = [f"x{i}" if a is not None else "" for i, a in enumerate(c.inputs)]
    outputs = [f"y{i}" for i in range(c.outputs)]
    node = helper.make_node(c.op, names, outputs, name=f"{c.op.lower()}_0", **c.attrs)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for n, a in zip(names, c.inputs) if a is not None]
    graph = helper.make_graph([node], "g", inputs, [onnx.ValueInfoProto(name=o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", c.opset)], ir_version=10)


def _run_ort(c: Case) -> list[np.ndarray]:
    if c.reference:
        feeds = {f"x{i}": a for i, a in enumerate(c.inputs) if a is not None}
        return ReferenceEvaluator(_model(c)).run(None, feeds)
    session = ort.InferenceSession(_model(c).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {f"x{i}": a for i, a in enumerate(c.inputs) if a is not None})


def _node(c: Case) -> ir.Node:
    return next(iter(ir.serde.deserialize_model(_model(c)).graph))


def _outputs(result: Any) -> list[Any]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _compare(ours: Any, expected: np.ndarray, c: Case, exact_dtype: bool) -> None:
    want = expected.dtype if exact_dtype else jax.dtypes.canonicalize_dtype(expected.dtype)
    assert np.dtype(ours.dtype) == want, f"dtype {ours.dtype}, onnxruntime {expected.dtype}"
    ours = np.asarray(ours)
    assert ours.shape == expected.shape
    if jnp.issubdtype(expected.dtype, jnp.floating) and expected.dtype.kind == "V":  # float8, bfloat16
        ours, expected = ours.astype(np.float32), expected.astype(np.float32)
    if expected.dtype.kind in "fc":
        np.testing.assert_allclose(ours.astype(expected.dtype), expected, rtol=c.tol, atol=c.tol)
    else:
        np.testing.assert_array_equal(ours, expected)


def _check_all(result: Any, expected: list[np.ndarray], c: Case, x64: bool = False) -> None:
    ours = _outputs(result)
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        # A numpy result (shape arithmetic) keeps onnxruntime's dtype even without x64.
        _compare(got, want, c, exact_dtype=x64 or isinstance(got, np.ndarray))


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles() -> Any:
    # Hundreds of tiny programs: XLA's optimisation passes would cost more than running them.
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def ort_results() -> dict[int, list[np.ndarray]]:
    return {}


def _expected(c: Case, cache: dict[int, list[np.ndarray]]) -> list[np.ndarray]:
    if id(c) not in cache:
        cache[id(c)] = _run_ort(c)
    return cache[id(c)]


# -- tests --------------------------------------------------------------------------------------------

# Lowerings that stay in numpy when every input is numpy (shape arithmetic, constant folding).
NUMPY_PATH = {"Abs", "Neg", "Sign", "Not", "BitwiseNot", "Add", "Sub", "Mul", "Div", "Mod", "Pow", "Equal",
              "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd",
              "BitwiseOr", "BitwiseXor", "BitShift", "Max", "Min", "Sum", "Mean", "Where", "Clip", "Cast",
              "CastLike", "Identity", "Shape", "Size", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
              "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "Expand", "Tile",
              "ConstantOfShape", "Range", "Trilu", "DepthToSpace", "SpaceToDepth", "ReduceSum", "ReduceMax",
              "ReduceMin", "ReduceProd", "ArgMax", "ArgMin", "CumSum", "MatMul", "Gemm"}


def _jit_all(cases: list[Case]) -> dict[int, Any]:
    """Every case's lowering under ONE ``jax.jit``: shape-deciding inputs closed over as numpy, the
    others traced. One XLA compilation instead of one per case keeps the file fast; a lowering that
    raises while tracing records its exception for its own test instead of failing the others."""
    nodes = {id(c): _node(c) for c in cases}
    traced = {id(c): [i for i, a in enumerate(c.inputs) if a is not None and i not in c.static]
              for c in cases}
    failures: dict[int, Exception] = {}

    def program(args: dict[int, list[Any]]) -> dict[int, list[Any]]:
        results = {}
        for c in cases:
            inputs = list(c.inputs)
            for i, a in zip(traced[id(c)], args[id(c)]):
                inputs[i] = a
            try:
                results[id(c)] = _outputs(ONNX_OPS[c.op](nodes[id(c)], *inputs))
            except Exception as exc:  # noqa: BLE001 - reported by the case's own test
                failures[id(c)] = exc
        return results

    results = jax.jit(program)({id(c): [c.inputs[i] for i in traced[id(c)]] for c in cases})
    return {**results, **failures}


def _jitted(c: Case, results: dict[int, Any]) -> list[Any]:
    result = results[id(c)]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.fixture(scope="module")
def jitted() -> dict[int, Any]:
    return _jit_all([p.values[0] for p in CASES if p.id not in X64_ONLY])


# int64 extremes (2^63 - 1 slice ends) need x64 on the traced path: the numpy-path and x64 tests
# cover those cases instead.
@pytest.mark.parametrize("c", [p for p in CASES if p.id not in X64_ONLY])
def test_matches_onnxruntime_under_jit(c: Case, ort_results: dict, jitted: dict) -> None:
    _check_all(_jitted(c, jitted), _expected(c, ort_results), c)


@pytest.mark.parametrize("c", [p for p in CASES if p.values[0].op in NUMPY_PATH])
def test_numpy_inputs_stay_numpy_with_exact_dtypes(c: Case, ort_results: dict) -> None:
    """Eagerly on numpy inputs (as the interpreter folds shape subgraphs) the result is numpy, with
    onnxruntime's dtype even without x64 (int64 shapes stay int64)."""
    result = ONNX_OPS[c.op](_node(c), *c.inputs)
    assert all(isinstance(r, np.ndarray) for r in _outputs(result))
    _check_all(result, _expected(c, ort_results), c)


# The interpreter evaluates nodes with concrete inputs eagerly (folding weights); a sample of the
# jax.numpy lowerings run that way too.
EAGER_CASES = ["Conv-2d", "ConvTranspose-groups", "MaxPool-ceil-pads", "AveragePool-ceil-include",
               "Softmax-old-default", "LayerNormalization-3-outputs", "Pad-reflect", "Gelu-0"]


@pytest.mark.parametrize("name", EAGER_CASES)
def test_eager_on_numpy_inputs(name: str, ort_results: dict) -> None:
    c = next(p.values[0] for p in CASES if p.id == name)
    with jax.ensure_compile_time_eval():
        result = ONNX_OPS[c.op](_node(c), *c.inputs)
    _check_all(result, _expected(c, ort_results), c)


def _not_float32(p: Any) -> bool:
    c = p.values[0]
    return any(a is not None and a.dtype != np.float32 for a in c.inputs) or c.op in ("Cast", "Shape", "Size")


X64_CASES = [p for p in CASES if _not_float32(p)]


@pytest.fixture(scope="module")
def jitted_x64() -> dict[int, Any]:
    with jax.enable_x64(True):
        return _jit_all([p.values[0] for p in X64_CASES])


@pytest.mark.parametrize("c", X64_CASES)
def test_x64_dtypes_match_exactly(c: Case, ort_results: dict, jitted_x64: dict) -> None:
    """With x64 on, jitted lowerings return onnxruntime's exact dtypes (no int32 or float64 creep)."""
    _check_all(_jitted(c, jitted_x64), _expected(c, ort_results), c, x64=True)


def test_every_required_op_is_covered() -> None:
    light_zoo = {"Add", "AveragePool", "BatchNormalization", "Concat", "ConstantOfShape", "Conv", "Dropout",
                 "Gemm", "GlobalAveragePool", "LRN", "MaxPool", "Mul", "Relu", "Reshape", "Softmax", "Sum",
                 "Transpose", "Unsqueeze"}
    magika = {"Add", "Cast", "Concat", "Conv", "Div", "Equal", "Exp", "Expand", "GlobalMaxPool", "MatMul",
              "Max", "Mul", "Reciprocal", "ReduceMax", "ReduceSum", "Reshape", "Shape", "Slice", "Sqrt",
              "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze"}
    exporter = {"Identity", "Neg", "Log", "Erf", "Sigmoid", "Pow", "Where", "Min", "Abs", "Sign", "Gather",
                "GatherElements", "Flatten", "Pad", "ReduceMean", "ReduceMin", "ReduceProd", "ArgMax",
                "ArgMin", "Not", "And", "Or", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Einsum",
                "Range", "Clip", "LeakyRelu", "Elu", "Gelu", "LayerNormalization", "LogSoftmax", "Split",
                "Tile", "Floor", "Ceil", "Round", "Mod", "Sin", "Cos", "Tan", "HardSigmoid", "Selu", "PRelu",
                "InstanceNormalization", "CastLike", "Size", "ReduceL2", "Trilu", "CumSum", "ConvTranspose"}
    required = light_zoo | magika | exporter
    assert required <= set(ONNX_OPS), sorted(required - set(ONNX_OPS))
    tested = {p.values[0].op for p in CASES}
    assert set(ONNX_OPS) <= tested, sorted(set(ONNX_OPS) - tested)


def test_static_refuses_a_tracer() -> None:
    with pytest.raises(UnsupportedModelError, match="Reshape 'r': shape must be known"):
        jax.jit(lambda s: static(s, "Reshape 'r': shape"))(np.array([2, 3]))
    assert static(jnp.array([2, 3]), "shape").tolist() == [2, 3]


def test_reshape_with_a_traced_shape_is_refused() -> None:
    node = _node(Case("Reshape", [f32(2, 3), i64(3, 2)], opset=13))
    message = r"Reshape 'reshape_0': shape .* depends on the graph inputs"
    with pytest.raises(UnsupportedModelError, match=message):
        jax.jit(lambda x, s: ONNX_OPS["Reshape"](node, x, s))(f32(2, 3), i64(3, 2))


def test_max_pool_indices_are_refused() -> None:
    node = _node(Case("MaxPool", [f32(1, 1, 4, 4)], {"kernel_shape": [2, 2]}, outputs=2))
    with pytest.raises(UnsupportedModelError, match="Indices output"):
        ONNX_OPS["MaxPool"](node, f32(1, 1, 4, 4))


def test_batch_norm_training_is_refused() -> None:
    args = [f32(2, 3, 4), pos(3), f32(3), f32(3), pos(3)]
    node = _node(Case("BatchNormalization", args, {"training_mode": 1}, opset=15, outputs=3))
    with pytest.raises(UnsupportedModelError, match="training mode"):
        ONNX_OPS["BatchNormalization"](node, *args)


def test_dropout_mask_before_opset_10_is_ones_of_the_input_type() -> None:
    # onnxruntime's opset 7-9 kernel writes zeros into this mask; ONNX (and its reference
    # implementation) means "every element kept", which the interpreter follows.
    x = f32(3, 4)
    node = _node(Case("Dropout", [x], {"ratio": 0.5}, opset=9, outputs=2))
    y, mask = ONNX_OPS["Dropout"](node, x)
    assert y is x and mask.dtype == np.float32 and np.all(mask == 1)


def test_prelu_slope_is_per_channel_before_opset_7() -> None:
    # onnxruntime has no PRelu-6 kernel; the pytorch-converted test models use it.
    x, slope = f32(2, 3, 4, 4), f32(3)
    node = _node(Case("PRelu", [x, slope], opset=6))
    want = np.where(x < 0, x * slope[:, None, None], x)
    np.testing.assert_allclose(np.asarray(ONNX_OPS["PRelu"](node, x, slope)), want, rtol=1e-6)


def test_legacy_broadcast_before_opset_7() -> None:
    a, b = f32(2, 3, 4, 5), f32(3, 4)
    node = _node(Case("Add", [a, b], {"broadcast": 1, "axis": 1}, opset=6))
    np.testing.assert_allclose(np.asarray(ONNX_OPS["Add"](node, a, b)), a + b[None, :, :, None], rtol=1e-6)


def test_attr_and_opset_helpers() -> None:
    attrs = {"pads": [0, 0, 0, 0], "auto_pad": "NOTSET"}
    node = _node(Case("Conv", [f32(1, 1, 3, 3), f32(1, 1, 1, 1)], attrs, opset=11))
    assert attr(node, "pads") == [0, 0, 0, 0] and attr(node, "auto_pad") == "NOTSET"
    assert attr(node, "group", 1) == 1 and opset(node) == 11
    loose = ir.Node("", "Relu", [])
    assert opset(loose) >= 21


GRAD_CASES = ["Conv-2d", "Conv-depthwise", "ConvTranspose-stride-pads", "Gemm-alpha", "Softmax-old-default",
              "LogSoftmax-old", "LayerNormalization-3-outputs", "MaxPool-ceil-pads",
              "AveragePool-ceil-include", "BatchNormalization-0", "LRN-alexnet", "InstanceNormalization-0",
              "Elu-0", "Pad-reflect"]


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_match_finite_differences(name: str) -> None:
    """jax.grad through the lowering against a central difference along a random direction, in float64."""
    c = next(p.values[0] for p in CASES if p.id == name)
    node, rng = _node(c), np.random.default_rng(1)
    with jax.enable_x64(True):
        args = [None if a is None else a.astype(np.float64) if a.dtype == np.float32 else a for a in c.inputs]
        traced = [i for i, a in enumerate(args)
                  if a is not None and a.dtype == np.float64 and i not in c.static]

        def output(*values: Any) -> Any:
            inputs = list(args)
            for i, v in zip(traced, values):
                inputs[i] = v
            return _outputs(ONNX_OPS[c.op](node, *inputs))[0]

        x = [args[i] for i in traced]
        weights = rng.standard_normal(jax.eval_shape(output, *x).shape)
        loss = jax.jit(lambda *values: jnp.sum(output(*values) * weights))
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(x)))))(*x)
        direction = [rng.standard_normal(v.shape) for v in x]
        eps = 1e-6
        plus = loss(*(v + eps * d for v, d in zip(x, direction)))
        minus = loss(*(v - eps * d for v, d in zip(x, direction)))
        along = sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(grads, direction))
        assert along == pytest.approx(float(plus - minus) / (2 * eps), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("to, values, wrapped", [
    (TensorProto.INT8, [300.0, -200.5, -129.0], [44, 56, 127]),
    (TensorProto.INT4, [9.0, -9.0], [-7, 7]),
])
def test_cast_out_of_range_wraps_as_documented(to: int, values: list[float], wrapped: list[int]) -> None:
    """The spec leaves float-to-integer casts out of range undefined; qinject picks C's choice (to int32,
    then narrowing drops the high bits), the same on numpy and traced inputs."""
    node = ir.Node("", "Cast", [], attributes=[ir.AttrInt64("to", to)])
    x = np.array(values, np.float32)
    for result in (ONNX_OPS["Cast"](node, x), jax.jit(lambda v: ONNX_OPS["Cast"](node, v))(x)):
        assert np.asarray(result).astype(np.int32).tolist() == wrapped
