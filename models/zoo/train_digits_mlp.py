"""Train the zoo's digits MLP with JAX and write ``digits_mlp.npz``.

Same data as the bundled CNN: ``models/digits_cnn/train.py``'s stratified splits (checked here to
equal its committed ``calib.npz`` / ``eval.npz``), flattened to ``[N, 64]``, with the same random
one-pixel shifts as augmentation. Deterministic (fixed PRNG keys) and independent of the core
count: a rerun, pinned to one core or not, rewrites identical bytes. About 3 s on 2 cores.

Usage:
    python -m models.zoo.train_digits_mlp      # from the repository root
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.digits_cnn.train import load_splits, npz_bytes, shift, write_atomic
from models.zoo.digits_mlp import DIGITS, HERE, LAYERS, flat, forward
from models.zoo.training import Params, adam_step, cross_entropy, fit

jax.config.update("jax_platforms", "cpu")

SEED, EPOCHS, BATCH, LR = 0, 100, 64, 3e-3


def init_params(key: jax.Array) -> Params:
    """He-normal weights ``[out, in]``, zero biases."""
    params: Params = {}
    for name, out, inp in LAYERS:
        key, sub = jax.random.split(key)
        params[f"{name}.weight"] = jax.random.normal(sub, (out, inp), jnp.float32) * jnp.sqrt(2.0 / inp)
        params[f"{name}.bias"] = jnp.zeros((out,), jnp.float32)
    return params


def loss(params: Params, key: jax.Array, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Cross-entropy on images shifted by up to one pixel."""
    return cross_entropy(forward(params, flat(shift(key, x.reshape(-1, 1, 8, 8)))), y)


def main() -> None:
    """Train, report held-out accuracy, write the weights."""
    splits = load_splits()
    with np.load(DIGITS / "calib.npz") as calib, np.load(DIGITS / "eval.npz") as held_out:
        same = (np.array_equal(calib["input"], splits["calib"][0])
                and np.array_equal(held_out["input"], splits["eval"][0]))
    if not same:
        raise SystemExit("the digits splits differ from models/digits_cnn's committed calib.npz / eval.npz")
    (x_train, y_train), (x_eval, y_eval) = splits["train"], splits["eval"]
    init_key, train_key = jax.random.split(jax.random.PRNGKey(SEED))
    params, seconds = fit(adam_step(loss, LR), init_params(init_key), flat(x_train), y_train, train_key,
                          EPOCHS, BATCH, log_every=10)
    correct = int((np.asarray(jax.jit(forward)(params, flat(x_eval))).argmax(1) == y_eval).sum())
    n_params = sum(v.size for v in params.values())
    print(f"{n_params} parameters, trained on {len(x_train)} images in {seconds:.1f} s")
    print(f"held-out accuracy {correct / len(y_eval):.2%} ({correct}/{len(y_eval)})")
    write_atomic(HERE / "digits_mlp.npz", npz_bytes(**params))


if __name__ == "__main__":
    main()
