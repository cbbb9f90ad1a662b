"""ONNX-sourced real models run through the JAX backend: the light model zoo (at its shipped opset)
and magika's model match onnxruntime's float outputs, and ``jax.grad`` through them works, so later
passes can take Hessians of any model.

Bound: output SQNR against onnxruntime >= 80 dB (float32 rounding in a different summation order
through tens of layers; 120-140 dB is typical), and identical top-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from models.light_zoo import NAMES, materialize
from qinject.backends.jax_backend import to_jax, to_jax_with_weights
from qinject.core.numerics import sqnr_db
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import run

MIN_SQNR_DB = 80.0
QUICK = ("squeezenet", "shufflenet")


# -m long: VGG-19 (20 GFLOPs, 548 MB of weights; AlexNet and ZFNet-512 have its structure) and
# DenseNet-121 (27 s; Inception v1/v2 cover concatenated branches, ResNet-50 the residual joins).
LONG = ("vgg19", "densenet121", "inception_v2", "zfnet512", "bvlc_alexnet")


def _light_params():
    return [pytest.param(n, marks=() if n in QUICK else pytest.mark.long if n in LONG else pytest.mark.slow)
            for n in NAMES]


@pytest.mark.parametrize("name", _light_params())
def test_light_model_matches_onnxruntime(name):
    proto = materialize(name, opset=None)  # the shipped opset: old attribute forms exercised
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = run(proto, {proto.graph.input[0].name: x})[0]
    got = np.asarray(to_jax(load_onnx(proto), "simulated")(x))
    assert got.shape == want.shape
    assert sqnr_db(want, got) >= MIN_SQNR_DB
    assert np.argmax(got) == np.argmax(want)


@pytest.mark.parametrize("name", QUICK)
def test_gradients_through_a_light_model(name):
    model = load_onnx(materialize(name, opset=None))
    fn, weights = to_jax_with_weights(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    grads = jax.jit(jax.grad(lambda w: jnp.sum(fn(w, x) ** 2)))(weights)
    flat = np.concatenate([np.asarray(g).ravel() for g in grads.values()])
    assert np.isfinite(flat).all() and np.count_nonzero(flat) > flat.size // 4


def test_magika_matches_onnxruntime_and_differentiates():
    pytest.importorskip("magika")
    from tests.zoo.magika_data import magika_features, magika_model_path, real_files

    path = magika_model_path()
    files, _ = real_files(seed=0)
    features = magika_features(files[:32])
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    want = run(str(path), {name: features})[0]
    model = load_onnx(path)
    got = np.asarray(jax.jit(to_jax(model, "simulated"))(features))
    assert sqnr_db(want, got) >= MIN_SQNR_DB
    assert np.array_equal(got.argmax(-1), want.argmax(-1))

    fn, weights = to_jax_with_weights(model)
    grads = jax.jit(jax.grad(lambda w: -jnp.sum(jnp.log(fn(w, features).max(axis=-1)))))(weights)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert sum(float(np.abs(np.asarray(g)).sum()) for g in grads.values()) > 0
