"""LSQ+ fake quantization against the papers' formulas, on tensors small enough to check by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qinject.backends import lsq
from qinject.core import numerics


def test_forward_equals_onnx_quantize_dequantize():
    x = np.array([-1.3, -0.26, -0.25, 0.0, 0.1, 0.25, 0.75, 2.9, 40.0], np.float32)
    for scale, offset, qtype in ((0.5, 0.0, numerics.QType(8, True)), (0.1, -0.3, numerics.QType(4, False)),
                                 (0.25, 0.25, numerics.QType(8, False))):
        z = float(lsq.zero_point(jnp.float32(scale), jnp.float32(offset), qtype.qmin, qtype.qmax))
        got = lsq.fake_quant(jnp.asarray(x), jnp.float32(scale), jnp.float32(offset), qtype.qmin, qtype.qmax)
        want = numerics.fake_quantize(x, np.float32(scale), np.asarray(z).astype(qtype.numpy_dtype), qtype)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_gradients_match_the_lsq_plus_formulas():
    # 4-bit unsigned, s = 0.5, beta = -1 (zero point 2): v = x/s + 2 spans below, inside and above [0, 15]
    x = np.array([-3.0, -1.2, -0.4, 0.3, 1.1, 2.6, 6.4, 7.0, 9.0], np.float32)
    s, beta, n, p = 0.5, -1.0, 0, 15
    upstream = np.arange(1, len(x) + 1, dtype=np.float32)  # distinct weights per element

    def loss(x, s, b):
        return jnp.sum(lsq.fake_quant(x, s, b, n, p) * upstream)

    gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.float32(s), jnp.float32(beta))
    v = (x.astype(np.float64) - beta) / s
    inside = (v > n) & (v < p)
    want_x = np.where(inside, upstream, 0)
    want_s = np.sum(upstream * np.where(inside, np.rint(v) - v, np.where(v <= n, n, p)))
    want_b = np.sum(upstream * np.where(inside, 0.0, 1.0))
    assert inside.any() and (v <= n).any() and (v >= p).any()
    np.testing.assert_allclose(np.asarray(gx), want_x)
    np.testing.assert_allclose(float(gs), want_s, rtol=1e-5)
    np.testing.assert_allclose(float(gb), want_b)


def test_per_channel_scale_gradient_sums_its_channel():
    w = np.array([[0.3, -0.8, 0.05], [1.7, -0.2, 0.9]], np.float32)
    s = np.array([[0.1], [0.25]], np.float32)
    gs = jax.grad(lambda s: jnp.sum(lsq.fake_quant(jnp.asarray(w), s, jnp.zeros_like(s), -7, 7)))(jnp.asarray(s))
    v = w / s
    per = np.where(np.abs(v) < 7, np.rint(v) - v, np.sign(v) * 7)
    np.testing.assert_allclose(np.asarray(gs), per.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_grad_scale_keeps_the_value_and_scales_the_gradient():
    g = lsq.grad_factor(64, 7)
    assert g == pytest.approx(1 / np.sqrt(64 * 7))
    value, grad = jax.value_and_grad(lambda s: lsq.grad_scale(s, g) ** 2)(3.0)
    assert value == pytest.approx(9.0) and grad == pytest.approx(6.0 * g)


def test_frozen_codes_hold_their_value():
    got = lsq.fake_quant_frozen(jnp.array([3.0, -2.0]), jnp.float32(0.5), jnp.float32(0.0), -7, 7)
    np.testing.assert_array_equal(np.asarray(got), [1.5, -1.0])


def test_mse_scale_beats_min_max_and_matches_a_brute_force_search():
    x = np.random.default_rng(0).laplace(size=4000).astype(np.float32)
    s, b = lsq.mse_scale(x, -7, 7, symmetric=True)
    assert float(b) == 0.0

    def err(scale):
        return float(np.sum((np.clip(np.rint(x / scale), -7, 7) * scale - x) ** 2))

    grid = np.abs(x).max() / 7 * np.linspace(0.01, 1, 100)
    assert err(float(s)) == pytest.approx(min(err(g) for g in grid), rel=1e-6)
    assert err(float(s)) < 0.7 * err(np.abs(x).max() / 7)  # heavy tails: clipping pays


def test_mse_scale_per_channel_and_asymmetric():
    w = np.stack([np.linspace(0, 1, 50), np.linspace(-4, 2, 50)]).astype(np.float32)
    s, b = lsq.mse_scale(w, 0, 15, symmetric=False, axis=0)
    assert s.shape == (2,) and b.shape == (2,)
    # the offset sits on the grid: -b/s is an integer zero point
    np.testing.assert_allclose(-b / s, np.rint(-b / s), atol=1e-4)


def test_quadratic_toy_converges_to_the_optimal_scale():
    """min_s E[(x̂ - x)^2] by LSQ's gradient: it reaches the scale a brute-force search finds best."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal(20000).astype(np.float32))
    n, p = -7, 7

    def mse(s):
        return jnp.mean((lsq.fake_quant(x, s, jnp.float32(0.0), n, p) - x) ** 2)

    # sign descent with a decaying relative step (the loss is flat near its minimum)
    step = jax.jit(lambda s, size: s * (1 - size * jnp.sign(jax.grad(mse)(s))))
    s = jnp.float32(float(jnp.max(jnp.abs(x))) / p)  # min/max start: far too coarse at 4 bits
    for t in range(400):
        s = step(s, 0.05 * 0.985**t)
    grid = np.linspace(0.05, 0.8, 1501, dtype=np.float32)
    losses = np.asarray(jax.vmap(mse)(jnp.asarray(grid)))
    best = float(grid[losses.argmin()])
    assert float(s) == pytest.approx(best, rel=0.02)
    assert float(mse(s)) == pytest.approx(float(losses.min()), rel=0.005)
