"""LSQ+ fake quantization: a learnable scale and offset with the gradients of the papers.

LSQ (Esser et al., 2020) learns a quantizer's step size ``s`` by gradient descent; LSQ+ (Bhalgat
et al., 2020) adds a learnable offset ``β`` for asymmetric ranges and initialises by MSE. With
``v = (x − β) / s`` and code range ``[n, p]``, the quantizer is ``x̂ = ⌊clamp(v, n, p)⌉ · s + β`` and
the gradients (rounding passed straight through) are::

    ∂x̂/∂x = 1 if n < v < p else 0
    ∂x̂/∂s = ⌊v⌉ − v if n < v < p;  n if v ≤ n;  p if v ≥ p
    ∂x̂/∂β = 0 if n < v < p else 1

ONNX stores an *integer* zero point ``z`` (``x̂ = (clip(⌊x/s⌉ + z, n, p) − z) · s``), so the forward
pass here uses the offset on the grid, ``z = clip(⌊−β/s⌉, n, p)``, which is exactly what
QuantizeLinear/DequantizeLinear compute with that scale and zero point; the backward pass applies the
formulas above at ``v = x/s + z``, the offset's own gradient passing straight through its rounding.
LSQ scales the gradients of ``s`` and ``β`` by ``g = 1/√(N·p)`` (``N``: elements sharing the scale),
so that their updates are in proportion to the weights' (``grad_scale``).

Pure functions of arrays: nothing here knows the IR. The weights' restricted symmetric range
(``[−p, p]``, as ``numerics.scale_zero_point`` writes them) is the caller's choice of ``n``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@jax.custom_jvp
def rint_ste(x: jax.Array) -> jax.Array:
    """Round half to even, with the straight-through gradient 1."""
    return jnp.rint(x)


rint_ste.defjvp(lambda primals, tangents: (jnp.rint(primals[0]), tangents[0]))


def grad_scale(x: jax.Array, g: float) -> jax.Array:
    """``x`` in the forward pass; its gradient multiplied by ``g`` in the backward pass."""
    return x * g + lax.stop_gradient(x - x * g)


def grad_factor(elements: int, qmax: int) -> float:
    """LSQ's gradient scale ``1/√(N·p)`` for a scale shared by ``elements`` values."""
    return float(1.0 / np.sqrt(max(elements, 1) * max(qmax, 1)))


def zero_point(scale: jax.Array, offset: jax.Array, qmin: int, qmax: int) -> jax.Array:
    """The integer zero point standing for offset ``β`` (``z = clip(⌊−β/s⌉, n, p)``), held in float32."""
    return jnp.clip(jnp.rint(-offset / scale), qmin, qmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fake_quant(x: jax.Array, scale: jax.Array, offset: jax.Array, qmin: int, qmax: int) -> jax.Array:
    """LSQ+ quantize-dequantize of ``x``; ``scale`` and ``offset`` broadcast against ``x``.

    The forward value equals ONNX QuantizeLinear → DequantizeLinear with scale ``scale`` and zero point
    ``zero_point(scale, offset)`` (round half to even, saturate); the gradients are LSQ+'s (module doc).
    """
    z = zero_point(scale, offset, qmin, qmax)
    q = jnp.clip(jnp.rint(x / scale) + z, qmin, qmax)
    return (q - z) * scale


def _fake_quant_fwd(x, scale, offset, qmin, qmax):
    z = zero_point(scale, offset, qmin, qmax)
    q = jnp.clip(jnp.rint(x / scale) + z, qmin, qmax)
    return (q - z) * scale, (x, scale, offset, z)


def _fake_quant_bwd(qmin, qmax, residuals, g):
    x, scale, offset, z = residuals
    v = x / scale + z
    inside = (v > qmin) & (v < qmax)
    d_scale = jnp.where(inside, jnp.rint(v) - v, jnp.where(v <= qmin, float(qmin), float(qmax)))
    return (jnp.where(inside, g, 0.0).astype(x.dtype),
            _reduce_to(g * d_scale, jnp.shape(scale)).astype(scale.dtype),
            _reduce_to(jnp.where(inside, 0.0, g), jnp.shape(offset)).astype(offset.dtype))


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant_frozen(codes: jax.Array, scale: jax.Array, offset: jax.Array, qmin: int, qmax: int) -> jax.Array:
    """The value of weights frozen at integer ``codes`` (relative to the zero point's code 0):
    ``(c − z) · s`` with ``c`` held; the gradients to ``s`` and ``β`` are those of a value held at a
    code, as for a clipped value (``c`` and 1)."""
    z = jnp.clip(rint_ste(-offset / scale), qmin, qmax)
    return (codes - z) * scale


def _reduce_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``g`` summed over the axes a parameter of ``shape`` was broadcast along."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    return jnp.sum(g, axis=axes).reshape(shape)


def mse_scale(x: np.ndarray, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
              steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """LSQ+'s MSE initialisation: per channel (``axis``) or per tensor, the ``(scale, offset)`` that
    minimise ``‖x̂ − x‖²`` among the min/max range shrunk by factors ``α ∈ (0, 1]`` (``steps`` of them).

    Symmetric: ``s = α·max|x| / p``, ``β = 0``; asymmetric: ``s = α·(max − min) / (p − n)`` with the
    offset on the grid nearest ``α·min`` (the range includes 0, as ``numerics.scale_zero_point``'s).
    """
    x = np.asarray(x, dtype=np.float64)
    moved = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    lo, hi = np.minimum(moved.min(axis=1), 0.0), np.maximum(moved.max(axis=1), 0.0)
    best_err = np.full(len(moved), np.inf)
    best_s, best_b = np.ones(len(moved)), np.zeros(len(moved))
    for alpha in np.linspace(1.0, 1.0 / steps, steps):
        if symmetric:
            s = alpha * np.maximum(-lo, hi) / qmax
            z = np.zeros_like(s)
        else:
            s = alpha * (hi - lo) / (qmax - qmin)
            z = np.clip(np.rint(qmin - alpha * lo / np.where(s > 0, s, 1.0)), qmin, qmax)
        s = np.where(s > 0, s, 1.0)
        q = np.clip(np.rint(moved / s[:, None]) + z[:, None], qmin, qmax)
        err = np.sum(((q - z[:, None]) * s[:, None] - moved) ** 2, axis=1)
        better = err < best_err
        best_err, best_s, best_b = np.where(better, err, best_err), np.where(better, s, best_s), \
            np.where(better, -z * s, best_b)
    if axis is None:
        return np.float32(best_s[0]).reshape(()), np.float32(best_b[0]).reshape(())
    return best_s.astype(np.float32), best_b.astype(np.float32)


__all__ = ["fake_quant", "fake_quant_frozen", "grad_factor", "grad_scale", "mse_scale", "rint_ste", "zero_point"]
