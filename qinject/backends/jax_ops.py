"""The ONNX op table of the JAX backend: how each default-domain ONNX op runs in JAX.

The contract with the interpreter (``qinject.backends.jax_backend``):

- ``ONNX_OPS[op_type]`` is a lowering ``fn(node, *inputs)``. ``inputs`` follow ``node.inputs``:
  jax arrays (tracers under ``jax.jit`` / ``jax.grad``), numpy arrays, or None for an omitted
  optional input. It returns an array, or for a node with several outputs a tuple as long as
  ``node.outputs`` (an output nobody reads may be None).
- Lowerings are pure (``jax.numpy``, ``jax.lax``) and differentiable wherever the op is.
- Inputs that decide a shape (Reshape's shape, Slice's starts, a reduction's axes, Pad's pads) must
  be known at trace time: ``static`` turns them into numpy and refuses a tracer with a one-line
  ``UnsupportedModelError``. The interpreter evaluates a node whose inputs are all concrete under
  ``jax.ensure_compile_time_eval``, so shape subgraphs (Shape -> Gather -> Concat -> Reshape) are
  concrete by the time they reach ``static``.
- Both the attribute form of an input (older opsets: Squeeze's ``axes`` before 13, Clip's
  ``min``/``max`` before 11, Slice's ``starts`` before 10) and the input form are accepted: an
  attribute that is present wins. Where an opset changed a meaning without changing the form
  (Softmax's axis before 13, Dropout's mask type before 10), the node's opset decides.

Dtypes follow onnxruntime. Ops that do integer and shape arithmetic (Add, Gather, Concat, Slice,
Cast, ...) compute with numpy when every input is a numpy array and with ``jax.numpy`` otherwise:
JAX without ``jax_enable_x64`` holds int64 as int32, and a shape computation carrying int64's
"to the end" marker (2**63 - 1, as PyTorch writes Slice ends) would wrap to -1 on the way. The
numpy path keeps such chains exact and int64, as onnxruntime does; on the JAX path the ONNX dtype
is canonicalised by JAX (int64 -> int32 unless x64 is on).

Floating-point contractions (Conv, MatMul, Gemm, Einsum) ask for ``Precision.HIGHEST``: accelerators
otherwise run float32 products as TF32/bfloat16, three decimal digits away from onnxruntime.

Neural-network ops (convolution, pooling, normalisation) live in ``jax_ops_nn`` and recurrent ones
(LSTM, and the contrib DynamicQuantizeLSTM) in ``jax_ops_rnn``, which register into the same tables
when they are imported (``jax_backend`` imports them: the tables are whole wherever the backend runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from jax import lax

from qinject.core.errors import UnsupportedModelError

ONNX_OPS: dict[str, Callable[..., Any]] = {}
# Ops of other domains onnxruntime runs (its com.microsoft contrib ops), by (domain, op_type): the
# forms the Q/DQ rewrite writes that have no default-domain equivalent (DynamicQuantizeLSTM).
CONTRIB_OPS: dict[tuple[str, str], Callable[..., Any]] = {}

HIGHEST = lax.Precision.HIGHEST
# The opset assumed for a node that belongs to no graph (built by hand, e.g. in tests).
NEWEST_OPSET = onnx.defs.onnx_opset_version()


def onnx_op(*op_types: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated lowering under each ONNX op type (default domain)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op_type in op_types:
            if op_type in ONNX_OPS:
                raise ValueError(f"ONNX op {op_type!r} has two JAX lowerings")
            ONNX_OPS[op_type] = fn
        return fn

    return register


def contrib_op(domain: str, op_type: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated lowering for ``op_type`` of ``domain`` (a contrib op) in ``CONTRIB_OPS``."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if (domain, op_type) in CONTRIB_OPS:
            raise ValueError(f"op {domain}::{op_type} has two JAX lowerings")
        CONTRIB_OPS[(domain, op_type)] = fn
        return fn

    return register


# -- helpers shared by the lowerings ------------------------------------------------------------------


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The Python value of attribute ``name`` of ``node``, or ``default`` if it is absent.

    INTS/FLOATS/STRINGS become lists and tensors numpy arrays.
    """
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    value = attribute.value
    if attribute.type == ir.AttributeType.TENSOR:
        return value.numpy()
    if attribute.type == ir.AttributeType.TENSORS:
        return [t.numpy() for t in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def static(value: Any, what: str) -> np.ndarray:
    """``value`` as a concrete numpy array; it must not depend on the graph's traced inputs.

    Raises:
        UnsupportedModelError: if ``value`` is a jax tracer (the input is computed at run time).
    """
    if isinstance(value, jax.core.Tracer):
        raise UnsupportedModelError(
            f"{what} must be known when the graph is traced, but it depends on the graph inputs "
            "(a data-dependent shape); the JAX backend needs it constant")
    return np.asarray(value)


def opset(node: ir.Node) -> int:
    """The default-domain opset the node is defined by (the newest one if it is in no graph)."""
    if node.version is not None:
        return node.version
    graph = node.graph
    version = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx")) if graph is not None else None
    return NEWEST_OPSET if version is None else version


def what(node: ir.Node, part: str) -> str:
    """How an error names an input of a node: ``Reshape 'reshape_3': shape``."""
    return f"{node.op_type} {node.name!r}: {part}"


def is_used(value: ir.Value | None) -> bool:
    """Whether some node or the graph reads ``value`` (an omitted optional output is never read)."""
    return value is not None and bool(value.name) and (bool(value.uses()) or value.is_graph_output())


def ints_from(node: ir.Node, name: str, value: Any) -> list[int] | None:
    """Integer list from attribute ``name`` if present (older opsets), else from input ``value``;
    None if neither is given (an omitted input, or an empty tensor meaning "not given")."""
    found = attr(node, name)
    if found is None and value is not None:
        found = static(value, what(node, name)).reshape(-1).tolist()
    return None if found is None else [int(v) for v in found]


def xp_of(*arrays: Any) -> Any:
    """numpy when every array is a concrete numpy array (shape arithmetic), else jax.numpy."""
    if all(a is None or isinstance(a, (np.ndarray, np.generic)) for a in arrays):
        return np
    return jnp


def as_dtype(xp: Any, dtype: Any) -> np.dtype:
    """The dtype an array of ONNX type ``dtype`` has in namespace ``xp`` (JAX narrows int64 without x64)."""
    return np.dtype(dtype) if xp is np else jax.dtypes.canonicalize_dtype(dtype)


def extreme(dtype: Any, largest: bool) -> Any:
    """The largest (or smallest) value of ``dtype``: the identity of min (or max)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return largest
    if dtype.kind in "iu":
        return np.iinfo(dtype).max if largest else np.iinfo(dtype).min
    return np.inf if largest else -np.inf


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def along(axis: int, index: Any) -> tuple[Any, ...]:
    """An indexing tuple that applies ``index`` (a slice or int) to ``axis`` only."""
    return (slice(None),) * axis + (index,)


# -- elementwise ------------------------------------------------------------------------------------

# Integer-capable ops: numpy on numpy inputs, so shape arithmetic keeps int64.
_GENERIC_UNARY = {"Abs": "abs", "Neg": "negative", "Sign": "sign", "Not": "logical_not",
                  "BitwiseNot": "bitwise_not"}
_GENERIC_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Equal": "equal", "Less": "less",
                   "Greater": "greater", "LessOrEqual": "less_equal", "GreaterOrEqual": "greater_equal",
                   "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
                   "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor"}
# Float math: always jax.
_FLOAT_UNARY: dict[str, Callable[[Any], Any]] = {
    "Exp": jnp.exp, "Log": jnp.log, "Sqrt": jnp.sqrt, "Reciprocal": jnp.reciprocal, "Tanh": jnp.tanh,
    "Sin": jnp.sin, "Cos": jnp.cos, "Tan": jnp.tan,
    "Asin": jnp.arcsin, "Acos": jnp.arccos, "Atan": jnp.arctan,
    "Sinh": jnp.sinh, "Cosh": jnp.cosh, "Asinh": jnp.arcsinh, "Acosh": jnp.arccosh, "Atanh": jnp.arctanh,
    "Erf": lax.erf, "Floor": jnp.floor, "Ceil": jnp.ceil, "Round": jnp.round,  # jnp.round: half to even
    "Sigmoid": jax.nn.sigmoid, "Softplus": jax.nn.softplus, "Softsign": lambda x: x / (1 + jnp.abs(x)),
    "Mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)), "IsNaN": jnp.isnan,
}


@onnx_op(*_GENERIC_UNARY)
def _generic_unary(node: ir.Node, x: Any) -> Any:
    xp = xp_of(x)
    return xp.asarray(getattr(xp, _GENERIC_UNARY[node.op_type])(x))


@onnx_op(*_FLOAT_UNARY)
def _float_unary(node: ir.Node, x: Any) -> Any:
    return _FLOAT_UNARY[node.op_type](jnp.asarray(x))


def _legacy_broadcast(node: ir.Node, a: Any, b: Any) -> Any:
    """Opsets before 7 broadcast ``b`` against ``a`` starting at attribute ``axis``, not at the end."""
    axis = attr(node, "axis")
    if attr(node, "broadcast", 0) and axis is not None:
        axis = normalize_axis(axis, np.ndim(a))
        b = b.reshape(tuple(np.shape(b)) + (1,) * (np.ndim(a) - axis - np.ndim(b)))
    return b


@onnx_op(*_GENERIC_BINARY)
def _generic_binary(node: ir.Node, a: Any, b: Any) -> Any:
    xp = xp_of(a, b)
    return xp.asarray(getattr(xp, _GENERIC_BINARY[node.op_type])(a, _legacy_broadcast(node, a, b)))


@onnx_op("Div")
def _div(node: ir.Node, a: Any, b: Any) -> Any:
    xp = xp_of(a, b)
    b = _legacy_broadcast(node, a, b)
    if np.dtype(a.dtype).kind not in "iu":
        return xp.asarray(xp.divide(a, b))
    # onnxruntime divides integers as C does: truncating toward zero, not flooring as numpy does.
    q = xp.floor_divide(a, b)
    return xp.asarray(xp.where((xp.remainder(a, b) != 0) & ((a < 0) != (b < 0)), q + 1, q))


@onnx_op("Mod")
def _mod(node: ir.Node, a: Any, b: Any) -> Any:
    xp = xp_of(a, b)
    # fmod=1: the sign of the dividend (C fmod); fmod=0 (integers only): the sign of the divisor.
    return xp.asarray(xp.fmod(a, b) if attr(node, "fmod", 0) else xp.remainder(a, b))


@onnx_op("Pow")
def _pow(node: ir.Node, base: Any, exponent: Any) -> Any:
    xp = xp_of(base, exponent)
    exponent = _legacy_broadcast(node, base, exponent)
    # The result has the base's type whatever the exponent's (opset 12 allows them to differ).
    return xp.asarray(xp.power(base, exponent)).astype(as_dtype(xp, base.dtype))


@onnx_op("BitShift")
def _bit_shift(node: ir.Node, x: Any, shift: Any) -> Any:
    xp = xp_of(x, shift)
    fn = xp.left_shift if attr(node, "direction") == "LEFT" else xp.right_shift
    return xp.asarray(fn(x, shift))


@onnx_op("Max", "Min", "Sum", "Mean")
def _variadic(node: ir.Node, *inputs: Any) -> Any:
    xp = xp_of(*inputs)
    fn = {"Max": xp.maximum, "Min": xp.minimum, "Sum": xp.add, "Mean": xp.add}[node.op_type]
    result = inputs[0]
    for x in inputs[1:]:
        result = fn(result, x)
    if node.op_type == "Mean":
        result = result / len(inputs)
    return xp.asarray(result)


@onnx_op("Where")
def _where(node: ir.Node, condition: Any, x: Any, y: Any) -> Any:
    xp = xp_of(condition, x, y)
    return xp.asarray(xp.where(condition, x, y))


@onnx_op("IsInf")
def _is_inf(node: ir.Node, x: Any) -> Any:
    x = jnp.asarray(x)
    positive, negative = bool(attr(node, "detect_positive", 1)), bool(attr(node, "detect_negative", 1))
    return jnp.isinf(x) & (((x > 0) & positive) | ((x < 0) & negative))


# -- activations ------------------------------------------------------------------------------------


@onnx_op("Relu")
def _relu(node: ir.Node, x: Any) -> Any:
    return jax.nn.relu(jnp.asarray(x))  # its gradient at 0 is 0, not jnp.maximum's 0.5


@onnx_op("LeakyRelu")
def _leaky_relu(node: ir.Node, x: Any) -> Any:
    return jnp.where(x < 0, x * attr(node, "alpha", 0.01), x)


@onnx_op("PRelu")
def _prelu(node: ir.Node, x: Any, slope: Any) -> Any:
    if opset(node) < 7 and np.ndim(slope) == 1 and np.ndim(x) > 2:
        # Before opset 7 a 1-D slope is per channel (axis 1), not broadcast from the last axis.
        slope = jnp.reshape(slope, (-1,) + (1,) * (np.ndim(x) - 2))
    return jnp.where(x < 0, x * slope, x)


@onnx_op("ThresholdedRelu")
def _thresholded_relu(node: ir.Node, x: Any) -> Any:
    return jnp.where(x > attr(node, "alpha", 1.0), x, jnp.zeros_like(x))


@onnx_op("Elu")
def _elu(node: ir.Node, x: Any) -> Any:
    return jax.nn.elu(jnp.asarray(x), attr(node, "alpha", 1.0))  # exp of the negative part only: no inf


@onnx_op("Selu")
def _selu(node: ir.Node, x: Any) -> Any:
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    return attr(node, "gamma", 1.05070102214813232421875) * jax.nn.elu(jnp.asarray(x), alpha)


@onnx_op("Celu")
def _celu(node: ir.Node, x: Any) -> Any:
    return jax.nn.celu(jnp.asarray(x), attr(node, "alpha", 1.0))


@onnx_op("HardSigmoid")
def _hard_sigmoid(node: ir.Node, x: Any) -> Any:
    return jnp.clip(x * attr(node, "alpha", 0.2) + attr(node, "beta", 0.5), 0, 1)


@onnx_op("HardSwish")
def _hard_swish(node: ir.Node, x: Any) -> Any:
    return x * jnp.clip(x * (1 / 6) + 0.5, 0, 1)


@onnx_op("Gelu")
def _gelu(node: ir.Node, x: Any) -> Any:
    return jax.nn.gelu(jnp.asarray(x), approximate=attr(node, "approximate", "none") == "tanh")


@onnx_op("Clip")
def _clip(node: ir.Node, x: Any, low: Any = None, high: Any = None) -> Any:
    xp = xp_of(x, low, high)
    # Before opset 11 the bounds are attributes; from 11 optional inputs.
    low = attr(node, "min", low)
    high = attr(node, "max", high)
    if low is not None:
        x = xp.maximum(x, xp.asarray(low, dtype=x.dtype))
    if high is not None:
        x = xp.minimum(x, xp.asarray(high, dtype=x.dtype))
    return xp.asarray(x)


# -- type ---------------------------------------------------------------------------------------------


def _cast(node: ir.Node, x: Any, dtype: np.dtype) -> Any:
    if dtype.kind in "OSU":
        raise UnsupportedModelError(f"{what(node, 'casting to strings')} is not supported by the JAX backend")
    xp = xp_of(x)
    x = xp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        if _is_small_float(dtype) and attr(node, "saturate", 1):
            # saturate=1 (the default): out-of-range values, infinities included, become the largest
            # finite value of the 8-bit/4-bit float, not inf/NaN. NaN stays NaN.
            limit = float(ml_dtypes.finfo(dtype).max)
            x = xp.clip(x, -limit, limit)
        elif jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize < 4:
            # As onnxruntime (and C): to int32 first, then narrowing wraps (300.0 -> int8 44).
            x = x.astype(as_dtype(xp, np.int32))
    return x.astype(as_dtype(xp, dtype))


def _is_small_float(dtype: np.dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1


@onnx_op("Cast")
def _cast_to(node: ir.Node, x: Any) -> Any:
    return _cast(node, x, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to"))))


@onnx_op("CastLike")
def _cast_like(node: ir.Node, x: Any, target: Any) -> Any:
    return _cast(node, x, np.dtype(target.dtype))


@onnx_op("Identity")
def _identity(node: ir.Node, x: Any) -> Any:
    return x


# -- shape and layout ---------------------------------------------------------------------------------


@onnx_op("Shape")
def _shape(node: ir.Node, x: Any) -> np.ndarray:
    # Python slicing clamps start/end exactly as opset 15's Shape does.
    return np.asarray(np.shape(x)[attr(node, "start", 0):attr(node, "end")], np.int64)


@onnx_op("Size")
def _size(node: ir.Node, x: Any) -> np.ndarray:
    return np.asarray(math.prod(np.shape(x)), np.int64)


@onnx_op("Reshape")
def _reshape(node: ir.Node, x: Any, shape: Any = None) -> Any:
    dims = ints_from(node, "shape", shape)  # an attribute before opset 5
    if not attr(node, "allowzero", 0):
        # 0 copies the input's dimension (unless allowzero=1, opset 14, where 0 means an empty dim).
        dims = [np.shape(x)[i] if d == 0 else d for i, d in enumerate(dims)]
    return xp_of(x).reshape(x, dims)


@onnx_op("Flatten")
def _flatten(node: ir.Node, x: Any) -> Any:
    axis = normalize_axis(attr(node, "axis", 1), np.ndim(x))
    shape = np.shape(x)
    return xp_of(x).reshape(x, (math.prod(shape[:axis]), math.prod(shape[axis:])))


@onnx_op("Squeeze")
def _squeeze(node: ir.Node, x: Any, axes: Any = None) -> Any:
    axes = ints_from(node, "axes", axes)
    if axes is None:  # every dimension of size 1
        axes = [i for i, d in enumerate(np.shape(x)) if d == 1]
    return xp_of(x).squeeze(x, tuple(normalize_axis(a, np.ndim(x)) for a in axes))


@onnx_op("Unsqueeze")
def _unsqueeze(node: ir.Node, x: Any, axes: Any = None) -> Any:
    axes = ints_from(node, "axes", axes)
    rank = np.ndim(x) + len(axes)  # axes index the output
    return xp_of(x).expand_dims(x, tuple(sorted(normalize_axis(a, rank) for a in axes)))


@onnx_op("Transpose")
def _transpose(node: ir.Node, x: Any) -> Any:
    return xp_of(x).transpose(x, attr(node, "perm", list(range(np.ndim(x)))[::-1]))


@onnx_op("Concat")
def _concat(node: ir.Node, *inputs: Any) -> Any:
    xp = xp_of(*inputs)
    return xp.concatenate(inputs, axis=normalize_axis(attr(node, "axis", 1), np.ndim(inputs[0])))


@onnx_op("Split")
def _split(node: ir.Node, x: Any, split: Any = None) -> tuple[Any, ...]:
    axis = normalize_axis(attr(node, "axis", 0), np.ndim(x))
    sizes = ints_from(node, "split", split)  # an attribute before opset 13
    if sizes is None:
        # Equal parts, the last one smaller if the dimension does not divide (opset 18's rule;
        # earlier opsets require it to divide, where this is the same).
        parts, dim = len(node.outputs), np.shape(x)[axis]
        size = -(-dim // parts)
        sizes = [size] * (parts - 1) + [dim - size * (parts - 1)]
    return tuple(xp_of(x).split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis))


def _onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """Python's slice for ONNX Slice bounds: negatives count from the end, then clamp."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)  # end -1: through index 0, not "last"


@onnx_op("Slice")
def _slice(node: ir.Node, x: Any, starts: Any = None, ends: Any = None, axes: Any = None,
           steps: Any = None) -> Any:
    starts, ends = ints_from(node, "starts", starts), ints_from(node, "ends", ends)
    axes = ints_from(node, "axes", axes) or list(range(len(starts)))
    steps = ints_from(node, "steps", steps) or [1] * len(starts)
    index = [slice(None)] * np.ndim(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, np.ndim(x))
        index[axis] = _onnx_slice(start, end, step, np.shape(x)[axis])
    return x[tuple(index)]


def _in_range(xp: Any, indices: Any, dim: int) -> Any:
    return xp.where(indices < 0, indices + dim, indices)  # ONNX indices may count from the end


@onnx_op("Gather")
def _gather(node: ir.Node, x: Any, indices: Any) -> Any:
    xp = xp_of(x, indices)
    axis = normalize_axis(attr(node, "axis", 0), np.ndim(x))
    return xp.asarray(xp.take(x, _in_range(xp, indices, np.shape(x)[axis]), axis=axis))


@onnx_op("GatherElements")
def _gather_elements(node: ir.Node, x: Any, indices: Any) -> Any:
    xp = xp_of(x, indices)
    axis = normalize_axis(attr(node, "axis", 0), np.ndim(x))
    return xp.take_along_axis(x, _in_range(xp, indices, np.shape(x)[axis]), axis=axis)


@onnx_op("Expand")
def _expand(node: ir.Node, x: Any, shape: Any) -> Any:
    dims = static(shape, what(node, "shape")).tolist()
    # Expand broadcasts both ways: a 1 in `shape` keeps the input's dimension.
    return xp_of(x).broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(dims)))


@onnx_op("Tile")
def _tile(node: ir.Node, x: Any, repeats: Any) -> Any:
    return xp_of(x).tile(x, static(repeats, what(node, "repeats")).tolist())


@onnx_op("ConstantOfShape")
def _constant_of_shape(node: ir.Node, shape: Any) -> np.ndarray:
    value = attr(node, "value")
    value = np.zeros((), np.float32) if value is None else value.reshape(())
    # numpy, so an int64 fill stays int64 for the shape arithmetic that often follows.
    return np.full(static(shape, what(node, "shape")).tolist(), value, dtype=value.dtype)


@onnx_op("Range")
def _range(node: ir.Node, start: Any, limit: Any, delta: Any) -> np.ndarray:
    start, limit, delta = (static(v, what(node, n)) for v, n in ((start, "start"), (limit, "limit"),
                                                                  (delta, "delta")))
    count = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
    # onnxruntime adds delta repeatedly; accumulating in the input type gives its exact floats.
    steps = np.concatenate([start.reshape(1), np.full(max(count - 1, 0), delta, start.dtype)])[:count]
    return np.add.accumulate(steps, dtype=start.dtype)


@onnx_op("Pad")
def _pad(node: ir.Node, x: Any, pads: Any = None, value: Any = None, axes: Any = None) -> Any:
    rank, mode = np.ndim(x), attr(node, "mode", "constant")
    widths = ints_from(node, "pads", pads)  # an attribute before opset 11
    value = attr(node, "value", value)
    axes = [normalize_axis(a, rank) for a in ints_from(node, "axes", axes) or range(rank)]
    lo, hi = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        lo[axis], hi[axis] = widths[i], widths[i + len(axes)]
    if mode == "constant":
        # lax.pad crops on negative widths, as ONNX asks, and takes a traced fill value.
        fill = jnp.zeros((), x.dtype) if value is None else jnp.asarray(value, x.dtype).reshape(())
        return lax.pad(jnp.asarray(x), fill, [(a, b, 0) for a, b in zip(lo, hi)])
    padded = jnp.pad(x, [(max(a, 0), max(b, 0)) for a, b in zip(lo, hi)], mode=mode)
    crop = tuple(slice(-min(a, 0), size + min(b, 0)) for size, a, b in zip(padded.shape, lo, hi))
    return padded[crop]


@onnx_op("Trilu")
def _trilu(node: ir.Node, x: Any, k: Any = None) -> Any:
    offset = 0 if k is None else int(static(k, what(node, "k")))
    xp = xp_of(x)
    return xp.triu(x, offset) if attr(node, "upper", 1) else xp.tril(x, offset)


@onnx_op("DepthToSpace")
def _depth_to_space(node: ir.Node, x: Any) -> Any:
    b, (n, c, h, w) = attr(node, "blocksize"), x.shape
    if attr(node, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // b**2, h, w).transpose(0, 3, 4, 1, 5, 2)
    else:  # CRD
        y = x.reshape(n, c // b**2, b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // b**2, h * b, w * b)


@onnx_op("SpaceToDepth")
def _space_to_depth(node: ir.Node, x: Any) -> Any:
    b, (n, c, h, w) = attr(node, "blocksize"), x.shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    # Output channels ordered (row, column, depth) in DCR mode, (depth, row, column) in CRD (opset 28).
    y = y.transpose(0, 3, 5, 1, 2, 4) if attr(node, "mode", "DCR") == "DCR" else y.transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# -- reductions ---------------------------------------------------------------------------------------


def _reduce_axes(node: ir.Node, x: Any, axes: Any) -> tuple[int, ...] | None:
    """The axes to reduce, or None when the node is a no-op (no axes and noop_with_empty_axes=1).

    Axes are an attribute before opset 13 (ReduceSum) / 18 (the others), then an optional input.
    """
    found = ints_from(node, "axes", axes)
    if not found:
        if attr(node, "noop_with_empty_axes", 0):
            return None
        return tuple(range(np.ndim(x)))
    return tuple(normalize_axis(a, np.ndim(x)) for a in found)


def _sum_squares(x: Any, axis: Any, keepdims: bool) -> Any:
    return jnp.sum(x * x, axis=axis, keepdims=keepdims)


# Integer-capable reductions (numpy on numpy inputs; the sum keeps the input's type, as onnxruntime).
_GENERIC_REDUCE = {"ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod"}
_FLOAT_REDUCE: dict[str, Callable[..., Any]] = {
    "ReduceMean": jnp.mean,
    "ReduceSumSquare": _sum_squares,
    "ReduceL1": lambda x, axis, keepdims: jnp.sum(jnp.abs(x), axis=axis, keepdims=keepdims),
    "ReduceL2": lambda x, axis, keepdims: jnp.sqrt(_sum_squares(x, axis, keepdims)),
    "ReduceLogSum": lambda x, axis, keepdims: jnp.log(jnp.sum(x, axis=axis, keepdims=keepdims)),
    "ReduceLogSumExp": lambda x, axis, keepdims: jax.nn.logsumexp(x, axis=axis, keepdims=keepdims),
}


@onnx_op(*_GENERIC_REDUCE, *_FLOAT_REDUCE)
def _reduce(node: ir.Node, x: Any, axes: Any = None) -> Any:
    axis = _reduce_axes(node, x, axes)
    if axis is None:
        return x
    keepdims = bool(attr(node, "keepdims", 1))
    if node.op_type in _FLOAT_REDUCE:
        # Integer inputs keep their type (onnxruntime truncates an integer mean).
        result = _FLOAT_REDUCE[node.op_type](jnp.asarray(x), axis=axis, keepdims=keepdims)
        return result.astype(as_dtype(jnp, x.dtype))
    xp, op = xp_of(x), node.op_type
    fn = getattr(xp, _GENERIC_REDUCE[op])
    if op in ("ReduceSum", "ReduceProd") and np.dtype(x.dtype) != np.bool_:
        return xp.asarray(fn(x, axis=axis, keepdims=keepdims, dtype=x.dtype))
    if op in ("ReduceMax", "ReduceMin") and math.prod(np.shape(x)[a] for a in axis) == 0:
        # ONNX reduces an empty set to the identity (-inf for max); numpy needs it spelled out.
        return xp.asarray(fn(x, axis=axis, keepdims=keepdims, initial=extreme(x.dtype, op == "ReduceMin")))
    return xp.asarray(fn(x, axis=axis, keepdims=keepdims))



@onnx_op("ArgMax", "ArgMin")
def _arg_reduce(node: ir.Node, x: Any) -> Any:
    xp = xp_of(x)
    axis = normalize_axis(attr(node, "axis", 0), np.ndim(x))
    keepdims = bool(attr(node, "keepdims", 1))
    fn = xp.argmax if node.op_type == "ArgMax" else xp.argmin
    if attr(node, "select_last_index", 0):
        # The last of equal extremes: search the reversed axis, then count back from the end.
        index = np.shape(x)[axis] - 1 - fn(xp.flip(x, axis), axis=axis, keepdims=keepdims)
    else:
        index = fn(x, axis=axis, keepdims=keepdims)
    return xp.asarray(index).astype(as_dtype(xp, np.int64))


@onnx_op("CumSum")
def _cumsum(node: ir.Node, x: Any, axis: Any) -> Any:
    xp = xp_of(x)
    axis = normalize_axis(int(static(axis, what(node, "axis"))), np.ndim(x))
    reverse = bool(attr(node, "reverse", 0))
    y = xp.flip(x, axis) if reverse else x
    y = xp.cumsum(y, axis=axis, dtype=x.dtype)
    if attr(node, "exclusive", 0):  # shift by one, so each sum leaves out its own element
        y = xp.concatenate([xp.zeros_like(y[along(axis, slice(0, 1))]), y[along(axis, slice(0, -1))]], axis)
    return xp.asarray(xp.flip(y, axis) if reverse else y)


# -- contractions -------------------------------------------------------------------------------------


def matmul(a: Any, b: Any) -> Any:
    """numpy's matmul, at full float32 precision on accelerators."""
    if xp_of(a, b) is np:
        return np.matmul(a, b)
    return jnp.matmul(a, b, precision=HIGHEST)


@onnx_op("MatMul")
def _matmul(node: ir.Node, a: Any, b: Any) -> Any:
    return matmul(a, b)


@onnx_op("MatMulInteger")
def _matmul_integer(node: ir.Node, a: Any, b: Any, a_zero: Any = None, b_zero: Any = None) -> Any:
    """``(A - a_zero_point) @ (B - b_zero_point)`` in int32; a zero point is a scalar, or one per
    row of A / per column of B.

    Integer codes run as int8 x int8 -> int32 (uint8 shifted down by 128, zero points with them)
    with the zero points factored out of the sum: row and column sums times the zero points.
    Codes held in float (the simulated backend's) are multiplied in float32 and stay float.
    """
    if np.ndim(a) == 1:  # numpy's matmul: a vector is a one-row matrix, dropped from the result
        return _matmul_integer(node, a[None], b, a_zero, b_zero)[..., 0, :]
    if np.ndim(b) == 1:
        return _matmul_integer(node, a, b[:, None], a_zero, b_zero)[..., 0]
    a_zero = _zero_point(a_zero, rows=True)
    b_zero = _zero_point(b_zero, rows=False)
    if any(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in (a, b)):
        return matmul(jnp.asarray(a, jnp.float32) - a_zero, jnp.asarray(b, jnp.float32) - b_zero)
    (a8, za), (b8, zb) = _int8(a, a_zero), _int8(b, b_zero)
    acc = jnp.matmul(a8, b8, preferred_element_type=jnp.int32)
    if may_be_nonzero(za):
        column_sums = xp_of(b8).sum(b8, axis=-2, keepdims=True, dtype=np.int32)  # once, for a constant weight
        acc = acc - za * column_sums
    if may_be_nonzero(zb):
        acc = acc - jnp.sum(a8, axis=-1, keepdims=True, dtype=jnp.int32) * zb
        if may_be_nonzero(za):
            acc = acc + np.int32(np.shape(a)[-1]) * za * zb
    return acc


def _zero_point(zero: Any, rows: bool) -> Any:
    """A MatMulInteger zero point shaped to broadcast: a per-row one as a column ``[M, 1]``."""
    if zero is None:
        return np.zeros((), np.int32)
    return zero.reshape(-1, 1) if rows and np.ndim(zero) == 1 else zero


def _int8(codes: Any, zero: Any) -> tuple[Any, Any]:
    """8-bit codes as int8 and their zero point as int32: uint8 shifted down by 128, both (the same
    product, one operand type). numpy stays numpy, so a constant weight is converted once."""
    xp = xp_of(codes, zero)
    shift = 128 if np.dtype(codes.dtype) == np.uint8 else 0
    codes = xp.asarray(codes)
    codes8 = (codes.astype(np.int16) - shift).astype(np.int8) if shift else codes.astype(np.int8)
    return codes8, xp_of(zero).asarray(zero).astype(np.int32) - shift


def may_be_nonzero(zero: Any) -> bool:
    """Whether a zero point needs its correction term: always for one known only at run time."""
    return isinstance(zero, jax.core.Tracer) or bool(np.any(np.asarray(zero) != 0))


@onnx_op("Gemm")
def _gemm(node: ir.Node, a: Any, b: Any, c: Any = None) -> Any:
    a = a.T if attr(node, "transA", 0) else a
    b = b.T if attr(node, "transB", 0) else b
    y = matmul(a, b)
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@onnx_op("Einsum")
def _einsum(node: ir.Node, *inputs: Any) -> Any:
    return jnp.einsum(attr(node, "equation").replace(" ", ""), *inputs, precision=HIGHEST)


# -- softmax family -----------------------------------------------------------------------------------


def _hardmax(x: Any, axis: int) -> Any:
    return jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis], axis=axis, dtype=x.dtype)


_SOFTMAX = {"Softmax": jax.nn.softmax, "LogSoftmax": jax.nn.log_softmax, "Hardmax": _hardmax}


@onnx_op(*_SOFTMAX)
def _softmax(node: ir.Node, x: Any) -> Any:
    fn, x = _SOFTMAX[node.op_type], jnp.asarray(x)
    if opset(node) >= 13:
        return fn(x, axis=normalize_axis(attr(node, "axis", -1), x.ndim))
    # Before opset 13 the input is coerced to 2-D at `axis` (default 1) and normalised over all of
    # the trailing dimensions together, not along one axis.
    axis = normalize_axis(attr(node, "axis", 1), x.ndim)
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return fn(flat, axis=1).reshape(x.shape)

