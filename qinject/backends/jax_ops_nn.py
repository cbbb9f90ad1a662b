"""Neural-network ONNX ops for the JAX backend: convolution, pooling, normalisation, dropout.

Registered into ``jax_ops.ONNX_OPS`` on import (``jax_backend`` imports this module). Layouts are ONNX's:
``N, C, D1, ..., Dn`` for data and ``M, C/group, k1, ..., kn`` for Conv weights, for any number of
spatial dimensions, so the dimension numbers are the identity permutation rather than a string
such as ``"NCHW"``.

Padding is computed once, in ``same_padding``/``explicit_padding``, the way onnxruntime computes it
(``auto_pad``, ``ceil_mode``), and handed to XLA as explicit ``(low, high)`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from jax import lax

from qinject.backends.jax_ops import (
    HIGHEST,
    attr,
    extreme,
    is_used,
    normalize_axis,
    onnx_op,
    opset,
    static,
    what,
)
from qinject.core.errors import UnsupportedModelError

Padding = list[tuple[int, int]]


def _identity_dims(rank: int) -> lax.ConvDimensionNumbers:
    spec = tuple(range(rank))
    return lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=spec, out_spec=spec)


def _per_axis(node: ir.Node, name: str, spatial: int, default: int) -> list[int]:
    return list(attr(node, name, [default] * spatial))


def same_padding(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int], upper: bool) -> Padding:
    """SAME_UPPER / SAME_LOWER: pad so that out = ceil(in / stride); the odd pixel goes at the end
    (UPPER) or at the beginning (LOWER)."""
    padding = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        padding.append((small, total - small) if upper else (total - small, small))
    return padding


def explicit_padding(node: ir.Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int]) -> Padding:
    """The (low, high) padding of each spatial axis from ``auto_pad`` and ``pads``."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_padding(sizes, kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")
    n = len(sizes)
    if auto_pad == "VALID":
        return [(0, 0)] * n
    pads = attr(node, "pads", [0] * 2 * n)  # begins of every axis, then ends
    return list(zip(pads[:n], pads[n:]))


# -- convolution --------------------------------------------------------------------------------------


def _add_bias(y: Any, bias: Any) -> Any:
    return y if bias is None else y + jnp.reshape(bias, (-1,) + (1,) * (y.ndim - 2))


@onnx_op("Conv")
def _conv(node: ir.Node, x: Any, w: Any, bias: Any = None) -> Any:
    x, w = jnp.asarray(x), jnp.asarray(w)
    n = x.ndim - 2
    kernel = w.shape[2:]  # kernel_shape, when given, must equal it
    strides, dilations = _per_axis(node, "strides", n, 1), _per_axis(node, "dilations", n, 1)
    y = lax.conv_general_dilated(
        x, w, window_strides=strides, padding=explicit_padding(node, x.shape[2:], kernel, strides, dilations),
        rhs_dilation=dilations, dimension_numbers=_identity_dims(x.ndim),
        feature_group_count=attr(node, "group", 1), precision=HIGHEST)
    return _add_bias(y, bias)


def _transpose_padding(node: ir.Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                       dilations: Sequence[int], output_padding: Sequence[int]) -> Padding:
    """ConvTranspose's (low, high) crop of the full transposed output, as onnxruntime computes it."""
    n = len(sizes)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    output_shape = attr(node, "output_shape")
    if output_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        if auto_pad == "VALID":
            return [(0, 0)] * n
        pads = attr(node, "pads", [0] * 2 * n)
        return list(zip(pads[:n], pads[n:]))
    # A target size (output_shape, or in * stride for SAME): crop the full output down to it.
    targets = output_shape[-n:] if output_shape is not None else [i * s for i, s in zip(sizes, strides)]
    padding = []
    for size, k, s, d, extra, target in zip(sizes, kernel, strides, dilations, output_padding, targets):
        full = s * (size - 1) + extra + (k - 1) * d + 1
        total = max(full - target, 0)
        head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        # An explicit output_shape larger than the full output is zero-filled at the end
        # (a negative crop); SAME never grows the output.
        tail = full - head - target if output_shape is not None else total - head
        padding.append((head, tail))
    return padding


@onnx_op("ConvTranspose")
def _conv_transpose(node: ir.Node, x: Any, w: Any, bias: Any = None) -> Any:
    x, w = jnp.asarray(x), jnp.asarray(w)
    n, group = x.ndim - 2, attr(node, "group", 1)
    kernel = w.shape[2:]
    strides, dilations = _per_axis(node, "strides", n, 1), _per_axis(node, "dilations", n, 1)
    output_padding = _per_axis(node, "output_padding", n, 0)
    crop = _transpose_padding(node, x.shape[2:], kernel, strides, dilations, output_padding)
    # A transposed convolution is a convolution of the stride-dilated input with the spatially
    # flipped kernel, whose (C, M/group) axes are swapped within each group.
    c, m_per_group = w.shape[:2]
    w = w.reshape(group, c // group, m_per_group, *kernel).swapaxes(1, 2)
    w = jnp.flip(w.reshape(group * m_per_group, c // group, *kernel), axis=tuple(range(2, n + 2)))
    padding = [((k - 1) * d - lo, (k - 1) * d - hi + extra)
               for k, d, (lo, hi), extra in zip(kernel, dilations, crop, output_padding)]
    y = lax.conv_general_dilated(x, w, window_strides=(1,) * n, padding=padding, lhs_dilation=strides,
                                 rhs_dilation=dilations, dimension_numbers=_identity_dims(x.ndim),
                                 feature_group_count=group, precision=HIGHEST)
    return _add_bias(y, bias)


# -- pooling ------------------------------------------------------------------------------------------


def _pool_window(node: ir.Node, x: Any) -> tuple[list[int], list[int], list[int], Padding, Padding]:
    """Kernel, strides, dilations, the explicit padding, and the extra end padding ceil_mode needs.

    With ``ceil_mode`` the last, partial window is kept, unless it would start inside the end padding
    (onnxruntime and PyTorch drop that one). The extra padding is not counted by AveragePool.
    """
    n = np.ndim(x) - 2
    kernel = list(attr(node, "kernel_shape"))
    strides, dilations = _per_axis(node, "strides", n, 1), _per_axis(node, "dilations", n, 1)
    sizes = np.shape(x)[2:]
    padding = explicit_padding(node, sizes, kernel, strides, dilations)
    extra = [(0, 0)] * n
    if attr(node, "ceil_mode", 0):
        for i, (size, k, s, d, (lo, hi)) in enumerate(zip(sizes, kernel, strides, dilations, padding)):
            span = size + lo + hi - ((k - 1) * d + 1)
            out = -(-span // s) + 1
            if (out - 1) * s >= size + lo:
                out -= 1
            extra[i] = (0, max((out - 1) * s - span, 0))
    return kernel, strides, dilations, padding, extra


def _window(x: Any, init: Any, op: Any, kernel: Sequence[int], strides: Sequence[int],
            dilations: Sequence[int], padding: Padding) -> Any:
    return lax.reduce_window(x, init, op, (1, 1, *kernel), (1, 1, *strides), [(0, 0), (0, 0), *padding],
                             window_dilation=(1, 1, *dilations))


def _add_pads(padding: Padding, extra: Padding) -> Padding:
    return [(a + c, b + d) for (a, b), (c, d) in zip(padding, extra)]


@onnx_op("MaxPool")
def _max_pool(node: ir.Node, x: Any) -> Any:
    if len(node.outputs) > 1 and is_used(node.outputs[1]):
        raise UnsupportedModelError(f"{what(node, 'the Indices output')} is not supported by the JAX backend "
                                    "(only the pooled values are)")
    x = jnp.asarray(x)
    kernel, strides, dilations, padding, extra = _pool_window(node, x)
    # Padding with the identity of max lets lax use its differentiable max-pool primitive.
    lowest = np.array(extreme(x.dtype, largest=False), x.dtype)
    y = _window(x, lowest, lax.max, kernel, strides, dilations, _add_pads(padding, extra))
    return (y, None) if len(node.outputs) > 1 else y


@onnx_op("AveragePool")
def _average_pool(node: ir.Node, x: Any) -> Any:
    x = jnp.asarray(x)
    kernel, strides, dilations, padding, extra = _pool_window(node, x)
    zero = np.array(0, x.dtype)
    total = _window(x, zero, lax.add, kernel, strides, dilations, _add_pads(padding, extra))
    # The divisor of each window: the input positions it covers, plus the explicit padding when
    # count_include_pad=1; never the extra padding ceil_mode adds.
    ones = jnp.ones((1, 1, *x.shape[2:]), x.dtype)
    pad_value = np.array(attr(node, "count_include_pad", 0), x.dtype)
    ones = lax.pad(ones, pad_value, [(0, 0, 0), (0, 0, 0), *((lo, hi, 0) for lo, hi in padding)])
    count = _window(ones, zero, lax.add, kernel, strides, dilations, extra)
    return total / count


@onnx_op("LpPool")
def _lp_pool(node: ir.Node, x: Any) -> Any:
    x, p = jnp.asarray(x), attr(node, "p", 2)
    kernel, strides, dilations, padding, extra = _pool_window(node, x)
    total = _window(jnp.abs(x) ** p, np.array(0, x.dtype), lax.add, kernel, strides, dilations,
                    _add_pads(padding, extra))
    return total ** (1.0 / p)


_GLOBAL_POOLS = {"GlobalAveragePool": jnp.mean, "GlobalMaxPool": jnp.max}


@onnx_op(*_GLOBAL_POOLS)
def _global_pool(node: ir.Node, x: Any) -> Any:
    x = jnp.asarray(x)
    return _GLOBAL_POOLS[node.op_type](x, axis=tuple(range(2, x.ndim)), keepdims=True)


@onnx_op("GlobalLpPool")
def _global_lp_pool(node: ir.Node, x: Any) -> Any:
    x, p = jnp.asarray(x), attr(node, "p", 2)
    return jnp.sum(jnp.abs(x) ** p, axis=tuple(range(2, x.ndim)), keepdims=True) ** (1.0 / p)


# -- normalisation ------------------------------------------------------------------------------------


def _channel(stat: Any, rank: int) -> Any:
    """A per-channel parameter shaped to broadcast over ``N, C, D1, ...``. Opsets 7-8 allow
    ``spatial=0``, whose parameters are per element (``C, D1, ...``) and broadcast as they are."""
    stat = jnp.asarray(stat)
    return stat.reshape((-1,) + (1,) * (rank - 2)) if stat.ndim == 1 else stat


@onnx_op("BatchNormalization")
def _batch_norm(node: ir.Node, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    if attr(node, "training_mode", 0) or any(is_used(v) for v in node.outputs[1:]):
        raise UnsupportedModelError(f"{what(node, 'training mode')} (batch statistics, running-mean outputs) "
                                    "is not supported by the JAX backend; export the model for inference")
    x = jnp.asarray(x)
    inv = _channel(scale, x.ndim) * lax.rsqrt(_channel(var, x.ndim) + attr(node, "epsilon", 1e-5))
    y = (x - _channel(mean, x.ndim)) * inv + _channel(bias, x.ndim)
    return (y,) + (None,) * (len(node.outputs) - 1) if len(node.outputs) > 1 else y


@onnx_op("InstanceNormalization")
def _instance_norm(node: ir.Node, x: Any, scale: Any, bias: Any) -> Any:
    x = jnp.asarray(x)
    axes = tuple(range(2, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) * lax.rsqrt(var + attr(node, "epsilon", 1e-5))
    return y * _channel(scale, x.ndim) + _channel(bias, x.ndim)


@onnx_op("LayerNormalization")
def _layer_norm(node: ir.Node, x: Any, scale: Any, bias: Any = None) -> Any:
    x = jnp.asarray(x)
    axes = tuple(range(normalize_axis(attr(node, "axis", -1), x.ndim), x.ndim))
    # stash_type=1 (the default): statistics in at least float32, even for float16/bfloat16 inputs.
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32)) if attr(node, "stash_type", 1) == 1 else x
    mean = jnp.mean(xs, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xs - mean), axis=axes, keepdims=True)
    inv_std = lax.rsqrt(var + attr(node, "epsilon", 1e-5))
    y = ((xs - mean) * inv_std).astype(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv_std)[:len(node.outputs)] if len(node.outputs) > 1 else y


@onnx_op("LRN")
def _lrn(node: ir.Node, x: Any) -> Any:
    x, size = jnp.asarray(x), attr(node, "size")
    alpha, beta, bias = attr(node, "alpha", 1e-4), attr(node, "beta", 0.75), attr(node, "bias", 1.0)
    # The sum runs over channels c - floor((size-1)/2) .. c + ceil((size-1)/2), clipped to [0, C).
    below = (size - 1) // 2
    window = (1, size) + (1,) * (x.ndim - 2)
    padding = [(0, 0), (below, size - 1 - below)] + [(0, 0)] * (x.ndim - 2)
    square_sum = lax.reduce_window(x * x, np.array(0, x.dtype), lax.add, window, (1,) * x.ndim, padding)
    return x / (bias + (alpha / size) * square_sum) ** beta


@onnx_op("Dropout")
def _dropout(node: ir.Node, x: Any, ratio: Any = None, training_mode: Any = None) -> Any:
    # Inference: the identity. A graph that asks for training (random masks) is refused.
    if training_mode is not None and bool(static(training_mode, what(node, "training_mode"))):
        raise UnsupportedModelError(f"{what(node, 'training_mode=True')} (random dropout) is not supported "
                                    "by the JAX backend")
    if len(node.outputs) < 2:
        return x
    # The mask is boolean from opset 10, of the input's type before.
    mask = np.ones(np.shape(x), np.bool_ if opset(node) >= 10 else np.dtype(x.dtype))
    return x, mask

