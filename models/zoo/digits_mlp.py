"""An MLP on scikit-learn's digits: 64 -> 128 -> 64 -> 10 with ReLU.

Input float32 ``[batch, 64]``: the 8x8 image flattened row by row, pixels in [0, 1] (the
``models/digits_cnn`` images reshaped, so the splits are the CNN's, sample for sample). Weights in
the ONNX Gemm layout ``[out, in]``. Trained by ``train_digits_mlp.py``; weights in ``digits_mlp.npz``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.zoo.base import ZooModel

HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "digits_cnn"
# (layer name, output features, input features)
LAYERS = [("fc1", 128, 64), ("fc2", 64, 128), ("fc3", 10, 64)]


def forward(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """Logits ``[batch, 10]`` of flattened ``[batch, 64]`` images."""
    h = x
    for i, (name, _, _) in enumerate(LAYERS):
        h = h @ params[f"{name}.weight"].T + params[f"{name}.bias"]
        if i < len(LAYERS) - 1:
            h = jax.nn.relu(h)
    return h


def flat(images: np.ndarray) -> np.ndarray:
    """``[N, 1, 8, 8]`` images as ``[N, 64]`` rows."""
    return images.reshape(len(images), -1)


def load() -> ZooModel:
    """The committed weights, and the digits CNN's committed calib / eval splits flattened."""
    with np.load(HERE / "digits_mlp.npz") as f:
        params = {k: f[k] for k in f.files}
    with np.load(DIGITS / "calib.npz") as calib, np.load(DIGITS / "eval.npz") as held_out:
        return ZooModel("digits_mlp", forward, params, flat(calib["input"]), flat(held_out["input"]),
                        held_out["labels"])
