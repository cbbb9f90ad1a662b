"""Integer kernels of the JAX backend: quantized dots and convolutions on int8 operands.

A quantized node computes ``op(x, w)`` with ``x = s_x (q_x - z_x)`` and ``w = s_w (q_w - z_w)``,
``op`` bilinear (a ``dot_general`` or ``conv_general_dilated``; ONNX Gemm, MatMul and Conv are
mapped onto them). Expanding the product::

    op(x, w) = s_x s_w [op(q_x, q_w) - z_x op(1, q_w) - z_w op(q_x, 1) + z_x z_w op(1, 1)]

The first term is the int8 x int8 -> int32 kernel (``preferred_element_type=int32``): real integer
compute. Where ``w`` is a constant the correction ``op(1, q_w)`` is evaluated once at trace time;
``1`` has size 1 along every dimension the correction does not depend on (the batch, the free
dimensions of a dot), so it broadcasts. uint8 codes are shifted to int8 (``q - 128``, ``z - 128``)
so both operands share one 8-bit type. The int32 result is rescaled once by ``s_x s_w`` (per
output channel when the weight is quantized per channel) and the bias, if any, added in float.

An activation quantized at run time (the plan's dynamic mode: DynamicQuantizeLinear ->
DequantizeLinear) is an operand like any other, except that its scale and zero point are values of
the program, not constants: the zero-point corrections are always computed and the rescale multiplies
by the run-time scale.

A node runs here only when every quantized operand is DequantizeLinear-fed with at most 8 bits and
per-tensor activation scales (not block-wise: weight-only nodes keep float activations); otherwise
``plan_for`` returns None and the node runs in float on dequantized operands (simulated), which is
always correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from jax import lax

from qinject.backends.jax_ops import attr, may_be_nonzero
from qinject.backends.jax_ops_nn import explicit_padding
from qinject.backends.jax_qdq import param_axis, qparams
from qinject.core import numerics, op_facts


@dataclass(frozen=True)
class Operand:
    """A DequantizeLinear-fed input of a quantized node: where its integer codes are."""

    index: int  # the node's input index
    codes: str  # name of the value holding the integer codes (a QuantizeLinear output or a constant)
    dequantize: ir.Node
    quantize: ir.Node | None = None  # the QuantizeLinear producing the codes at run time, if any
    dynamic: ir.Node | None = None  # the DynamicQuantizeLinear producing codes, scale and zero point, if any


@dataclass(frozen=True)
class Kernel:
    """How one quantized node runs on integers.

    Attributes:
        kind: "dot" (lax.dot_general) or "conv" (lax.conv_general_dilated).
        params: the lax keyword parameters (dimension numbers, strides, padding, ...), for operands
            permuted by ``perms``.
        lhs, rhs: the two operands.
        out_channel: per operand index, the output axis along which that operand's per-axis scale
            varies (a weight's output channel).
        perms: transposes applied to (lhs, rhs) before the op and to its result after (None: none).
        bias: input index of a float bias added after the rescale (ONNX Conv/Gemm), or None.
        alpha, beta: Gemm's factors.
    """

    kind: str
    params: dict[str, Any]
    lhs: Operand
    rhs: Operand
    out_channel: dict[int, int] = field(default_factory=dict)
    perms: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    bias: int | None = None
    alpha: float = 1.0
    beta: float = 1.0


def plan_for(node: ir.Node) -> Kernel | None:
    """The integer kernel of ``node``, or None if it cannot run on integers."""
    if not op_facts.fact(node).quantizable or len(node.inputs) < 2:
        return None
    if any(v is None or v.shape is None for v in (*node.inputs[:2], node.outputs[0])):
        return None  # the kernels lay out their axes by rank (a body value may have none inferred): float
    lhs, rhs = _operand(node, 0), _operand(node, 1)
    if lhs is None or rhs is None:
        return None
    name = op_facts.fact(node).integer_kernel
    build = INTEGER_KERNELS.get(name) if name is not None else None
    return build(node, lhs, rhs) if build else None


def run(kernel: Kernel, node: ir.Node, args: list[Any], env: dict[str, Any],
        constants: dict[str, np.ndarray]) -> Any:
    """Compute the node on integers; returns its float output."""
    ndim = len(node.outputs[0].shape)
    sides = []
    for k, operand in enumerate((kernel.lhs, kernel.rhs)):
        perm = kernel.perms[k] if kernel.perms else None
        if operand.dynamic is not None:
            sides.append(_dynamic_side(operand, perm, env))
            continue
        q = qparams(operand.dequantize, constants)
        codes, zero = _int8_codes(operand, q, perm, env)
        scale = q.scale
        if q.axis is not None:  # per-axis: it must become an output axis (checked by the builder)
            scale = _along(scale, kernel.out_channel[operand.index], ndim)
            zero = _along(zero, kernel.out_channel[operand.index], ndim)
        sides.append((codes, zero, scale))
    (a, za, sa), (b, zb, sb) = sides
    op = _dot if kernel.kind == "dot" else _conv
    acc = op(a, b, kernel.params)
    if may_be_nonzero(za):
        acc = acc - za * _correction(op, _ones_like_broadcast(a, kernel, "lhs"), b, kernel.params)
    if may_be_nonzero(zb):
        acc = acc - zb * _correction(op, a, _ones_like_broadcast(b, kernel, "rhs"), kernel.params)
        if may_be_nonzero(za):
            acc = acc + za * zb * _correction(op, _ones_like_broadcast(a, kernel, "lhs"),
                                              _ones_like_broadcast(b, kernel, "rhs"), kernel.params)
    out = acc.astype(jnp.float32) * (jnp.asarray(sa, jnp.float32) * jnp.asarray(sb, jnp.float32))
    if kernel.alpha != 1.0:
        out = out * np.float32(kernel.alpha)
    if kernel.bias is not None and kernel.bias < len(args) and args[kernel.bias] is not None:
        # Conv's per-channel bias lines up with the channels-last result's last axis.
        out = out + np.float32(kernel.beta) * args[kernel.bias]
    return jnp.transpose(out, kernel.perms[2]) if kernel.perms else out


def _int8_codes(operand: Operand, q: Any, perm: tuple[int, ...] | None, env: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """The operand's codes as int8 (permuted by ``perm``) and its zero point to match.

    uint8 codes shifted down by 128 (zero point too) fit int8 exactly. Codes produced at run time are
    recomputed from the QuantizeLinear's float input: the same codes (quantization is elementwise),
    straight into int8 in one fused op, and permuted in float first: an int8 convolution whose input
    is transposed inside the program gets an operand layout XLA:CPU runs some 50x slower (measured).
    """
    shift = 128 if q.qtype.bits == 8 and not q.qtype.signed else 0
    zero = np.asarray(q.zero_point).astype(np.int32) - shift
    if operand.quantize is None:  # constant codes (a weight): converted once, at trace time
        codes = env[operand.codes]
        if perm is not None:
            codes = _concrete_if_possible(jnp.transpose, codes, perm)
        return _concrete_if_possible(_shifted, codes, shift), zero
    source = env[operand.quantize.inputs[0].name]
    if perm is not None:
        source = jnp.transpose(source, perm)
    codes = numerics.quantize_codes(source, q.scale, q.zero_point, q.qtype, None, xp=jnp)
    return (codes - shift).astype(jnp.int8), zero


def _dynamic_side(operand: Operand, perm: tuple[int, ...] | None,
                  env: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Codes (as int8, permuted by ``perm``), zero point and scale of an activation that
    DynamicQuantizeLinear quantized at run time: uint8 codes and zero point shifted down by 128 like
    constant ones, the scale a scalar of the program."""
    codes, scale, zero = (env[v.name] for v in operand.dynamic.outputs)
    if perm is not None:
        codes = jnp.transpose(codes, perm)
    return _shifted(codes, 128), jnp.asarray(zero).astype(jnp.int32) - 128, scale


def _shifted(codes: Any, shift: int) -> Any:
    codes = jnp.asarray(codes)
    return (codes.astype(jnp.int16) - shift).astype(jnp.int8) if shift else codes.astype(jnp.int8)


# -- operands ------------------------------------------------------------------------------------------
def _operand(node: ir.Node, index: int) -> Operand | None:
    value = node.inputs[index]
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    if attr(dq, "block_size", 0) > 0:
        return None  # block scales vary along the reduction: they do not factor out of the sum
    dynamic = _dynamic_source(dq)
    if dynamic is not None:
        return Operand(index, dq.inputs[0].name, dq, dynamic=dynamic)
    zero_point = dq.inputs[2] if len(dq.inputs) > 2 else None
    if dq.inputs[1].const_value is None or (zero_point is not None and zero_point.const_value is None):
        return None
    # The codes' type is the zero point's (uint8 when it is omitted).
    if zero_point is not None and zero_point.const_value.numpy().dtype not in _EIGHT_BITS_OR_FEWER:
        return None
    producer = dq.inputs[0].producer()
    quantize = producer if producer is not None and producer.op_type == "QuantizeLinear" else None
    if quantize is not None and quantize.inputs[1].const_value is not None and (
            quantize.inputs[1].const_value.numpy().size > 1):
        return None  # per-axis activations do not factor out of the sum
    return Operand(index, dq.inputs[0].name, dq, quantize)


def _dynamic_source(dq: ir.Node) -> ir.Node | None:
    """The DynamicQuantizeLinear whose codes, scale and zero point ``dq`` reads, all three, or None."""
    source = dq.inputs[0].producer()
    if source is None or source.op_type != "DynamicQuantizeLinear" or source.domain not in ("", "ai.onnx"):
        return None
    reads = [v.name if v is not None else None for v in dq.inputs[:3]]
    return source if reads == [v.name for v in source.outputs] else None


_EIGHT_BITS_OR_FEWER = {np.dtype(np.int8), np.dtype(np.uint8), np.dtype("int4"), np.dtype("uint4")}


def _axis_of(operand: Operand) -> int | None:
    if operand.dynamic is not None:
        return None  # one run-time scale for the whole tensor
    scale = operand.dequantize.inputs[1].const_value.numpy()
    axis = param_axis(operand.dequantize, scale.ndim, scale.size)
    return None if axis is None else axis % len(operand.dequantize.outputs[0].shape)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = values.size
    return np.asarray(values).reshape(shape)


# -- the two integer ops ---------------------------------------------------------------------------------
def _dot(a: Any, b: Any, params: dict[str, Any]) -> Any:
    return lax.dot_general(a, b, params["dimension_numbers"], preferred_element_type=jnp.int32)


def _conv(x: Any, w: Any, params: dict[str, Any]) -> Any:
    return lax.conv_general_dilated(x, w, preferred_element_type=jnp.int32, **params)


def _correction(op: Any, a: Any, b: Any, params: dict[str, Any]) -> Any:
    """A zero-point correction term; constant (computed once at trace time) when its inputs are."""
    return _concrete_if_possible(op, a, b, params)


def _concrete_if_possible(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, evaluated at trace time when no argument is traced (a weight's codes)."""
    if any(isinstance(a, jax.core.Tracer) for a in args):
        return fn(*args)
    with jax.ensure_compile_time_eval():
        return fn(*args)


def _ones_like_broadcast(x: Any, kernel: Kernel, side: str) -> np.ndarray:
    """Ones shaped like ``x`` but of size 1 along the dimensions the correction does not depend on."""
    shape = list(np.shape(x))
    if kernel.kind == "conv":
        if side == "lhs":
            shape[0] = 1  # the batch (operands are channels-last)
        return np.ones(shape, np.int8)
    (contract_l, contract_r), (batch_l, batch_r) = kernel.params["dimension_numbers"]
    keep = set(contract_l) | set(batch_l) if side == "lhs" else set(contract_r) | set(batch_r)
    return np.ones([d if i in keep else 1 for i, d in enumerate(shape)], np.int8)


# -- from each quantizable op to its kernel -----------------------------------------------------------------
# Builders by the name an op's facts give (``OpFact.integer_kernel``): ``builder(node, lhs, rhs)`` maps
# the node onto a dot or a convolution (a ``Kernel``), or returns None (it then runs in float).
Builder = Callable[[ir.Node, Operand, Operand], "Kernel | None"]
INTEGER_KERNELS: dict[str, Builder] = {}


def integer_kernel(name: str) -> Callable[[Builder], Builder]:
    """Register the decorated builder under ``name`` (what an op-facts entry's ``integer_kernel``
    names; a plugin's op registers its own)."""

    def register(fn: Builder) -> Builder:
        if name in INTEGER_KERNELS:
            raise ValueError(f"integer kernel {name!r} has two builders")
        INTEGER_KERNELS[name] = fn
        return fn

    return register


def _dot_output_axis(dims: Any, ranks: tuple[int, int], side: int, axis: int) -> int | None:
    """Where dimension ``axis`` of operand ``side`` lands in dot_general's output (None: contracted)."""
    (contract_l, contract_r), (batch_l, batch_r) = dims
    contract, batch = (contract_l, batch_l) if side == 0 else (contract_r, batch_r)
    if axis in contract:
        return None
    if axis in batch:
        return list(batch).index(axis)
    free_l = [d for d in range(ranks[0]) if d not in contract_l and d not in batch_l]
    free_r = [d for d in range(ranks[1]) if d not in contract_r and d not in batch_r]
    if side == 0:
        return len(batch_l) + free_l.index(axis)
    return len(batch_l) + len(free_l) + free_r.index(axis)


def dot_kernel(node: ir.Node, lhs: Operand, rhs: Operand, dims: Any, **extra: Any) -> Kernel | None:
    ranks = (len(node.inputs[0].shape), len(node.inputs[1].shape))
    out_channel = {}
    for side, operand in enumerate((lhs, rhs)):
        axis = _axis_of(operand)
        if axis is not None:
            landed = _dot_output_axis(dims, ranks, side, axis)
            if landed is None:
                return None  # a scale varying along the contraction does not factor out of the sum
            out_channel[side] = landed
    return Kernel("dot", {"dimension_numbers": dims}, lhs, rhs, out_channel, **extra)


@integer_kernel("jax-dot")
def _jax_dot(node: ir.Node, lhs: Operand, rhs: Operand) -> Kernel | None:
    return dot_kernel(node, lhs, rhs, op_facts.jax_params(node)["dimension_numbers"])


@integer_kernel("jax-conv")
def _jax_conv(node: ir.Node, lhs: Operand, rhs: Operand) -> Kernel | None:
    p = op_facts.jax_params(node)
    params = {k: p[k] for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
                                "dimension_numbers", "feature_group_count", "batch_group_count")}
    return _conv_kernel(lhs, rhs, params)


def _conv_kernel(lhs: Operand, rhs: Operand, params: dict[str, Any], **extra: Any) -> Kernel | None:
    """A convolution kernel computed channels-last (NHWC / HWIO) whatever the graph's layout:
    XLA:CPU runs int8 convolutions at float speed in that layout but some 20x slower in NCHW
    (measured, jax 0.10). Operands are permuted in, the result permuted back."""
    spec = params["dimension_numbers"]
    if _axis_of(lhs) is not None:
        return None
    axis = _axis_of(rhs)
    if axis is not None and axis != spec.rhs_spec[0]:
        return None
    if _has_nonzero_zero_point(rhs):
        return None  # op(q_x, 1) of a convolution would be a second full convolution
    n = len(spec.lhs_spec)
    last = (0, n - 1, *range(1, n - 1))
    back = [0] * n
    back[spec.out_spec[0]], back[spec.out_spec[1]] = 0, n - 1
    for i, out_axis in enumerate(spec.out_spec[2:]):
        back[out_axis] = 1 + i
    perms = ((spec.lhs_spec[0], *spec.lhs_spec[2:], spec.lhs_spec[1]),
             (*spec.rhs_spec[2:], spec.rhs_spec[1], spec.rhs_spec[0]), tuple(back))
    channels_last = lax.ConvDimensionNumbers(last, (n - 1, n - 2, *range(n - 2)), last)
    return Kernel("conv", {**params, "dimension_numbers": channels_last}, lhs, rhs,
                  {1: n - 1} if axis is not None else {}, perms, **extra)


def _has_nonzero_zero_point(operand: Operand) -> bool:
    if operand.dynamic is not None:
        return True  # known only at run time
    dq = operand.dequantize
    if len(dq.inputs) < 3 or dq.inputs[2] is None:
        return False
    return bool(np.any(dq.inputs[2].const_value.numpy().astype(np.int32) != 0))


@integer_kernel("onnx-conv")
def _onnx_conv(node: ir.Node, lhs: Operand, rhs: Operand) -> Kernel | None:
    x_shape, w_shape = node.inputs[0].shape, node.inputs[1].shape
    if x_shape is None or not all(isinstance(d, int) for d in list(x_shape)[2:]):
        return None  # SAME padding needs the spatial sizes
    spatial = len(w_shape) - 2
    strides = tuple(attr(node, "strides", None) or [1] * spatial)
    dilations = tuple(attr(node, "dilations", None) or [1] * spatial)
    spec = tuple(range(spatial + 2))
    params = {
        "window_strides": strides,
        "padding": tuple(explicit_padding(node, list(x_shape)[2:], list(w_shape)[2:], strides, dilations)),
        "lhs_dilation": (1,) * spatial,
        "rhs_dilation": dilations,
        "dimension_numbers": lax.ConvDimensionNumbers(spec, spec, spec),
        "feature_group_count": attr(node, "group", 1),
        "batch_group_count": 1,
    }
    return _conv_kernel(lhs, rhs, params, bias=2)


@integer_kernel("onnx-gemm")
def _onnx_gemm(node: ir.Node, lhs: Operand, rhs: Operand) -> Kernel | None:
    dims = (((0 if attr(node, "transA", 0) else 1,), (1 if attr(node, "transB", 0) else 0,)), ((), ()))
    return dot_kernel(node, lhs, rhs, dims, bias=2, alpha=float(attr(node, "alpha", 1.0)),
                       beta=float(attr(node, "beta", 1.0)))


@integer_kernel("onnx-matmul")
def _onnx_matmul(node: ir.Node, lhs: Operand, rhs: Operand) -> Kernel | None:
    a, b = len(node.inputs[0].shape), len(node.inputs[1].shape)
    if b == 2 and a >= 2:
        dims = (((a - 1,), (0,)), ((), ()))
    elif a == b and a > 2 and list(node.inputs[0].shape)[:-2] == list(node.inputs[1].shape)[:-2]:
        batch = tuple(range(a - 2))
        dims = (((a - 1,), (a - 2,)), (batch, batch))
    else:
        return None  # broadcast batch dims: the float path handles them
    return dot_kernel(node, lhs, rhs, dims)

