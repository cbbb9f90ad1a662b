"""What the zoo's training scripts share: Adam written out, and the deterministic batch loop.

Hand-written rather than optax (not a dependency). The loop is Python over a jitted step, as in
``models/digits_cnn/train.py``: ``lax.scan`` would compile once but runs convolutions far slower on
XLA:CPU, and per-step dispatch costs little at these sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array | np.ndarray]
# loss(params, key, x, y) -> scalar; the key drives augmentation or dropout, if any.
Loss = Callable[[Params, jax.Array, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def adam_step(loss: Loss, lr: Callable[[jnp.ndarray], jnp.ndarray] | float, weight_decay: float = 0.0):
    """A jitted ``step(state, key, x, y) -> (state, loss)`` of Adam (decoupled weight decay if given).

    ``lr`` is a constant or a schedule of the 1-based step number. Weight decay applies to matrices
    only (``ndim >= 2``), not to biases, LayerNorm gains or other vectors.
    """

    @jax.jit
    def step(state: tuple, key: jax.Array, x: jnp.ndarray, y: jnp.ndarray) -> tuple:
        params, m, v, t = state
        value, grads = jax.value_and_grad(loss)(params, key, x, y)
        t = t + 1
        m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
        v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
        rate = lr(t) if callable(lr) else lr
        scale = rate * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)

        def update(p, a, b):
            decay = rate * weight_decay * p if p.ndim >= 2 else 0.0
            return p - scale * a / (jnp.sqrt(b) + 1e-8) - decay

        return (jax.tree.map(update, params, m, v), m, v, t), value

    return step


def shuffled_batches(key: jax.Array, x: np.ndarray, y: np.ndarray, batch: int) -> list[tuple]:
    """One epoch of shuffled mini-batches of ``batch`` samples (the last partial batch dropped)."""
    steps = len(x) // batch
    order = np.asarray(jax.random.permutation(key, len(x)))[: steps * batch].reshape(steps, batch)
    return [(x[idx], y[idx]) for idx in order]


def fit(step, params: Params, x: np.ndarray, y: np.ndarray, key: jax.Array, epochs: int, batch: int,
        batches: Callable[..., list] = shuffled_batches, log_every: int = 5) -> tuple[dict, float]:
    """Train for ``epochs`` passes of ``batches(key, x, y, batch)``; returns the params and seconds taken."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, zeros, zeros, jnp.float32(0))  # Adam: params, first moment, second moment, step
    start = time.perf_counter()
    for epoch, ekey in enumerate(jax.random.split(key, epochs)):
        order_key, step_key = jax.random.split(ekey)
        epoch_batches = batches(order_key, x, y, batch)
        losses = []
        for (xb, yb), skey in zip(epoch_batches, jax.random.split(step_key, len(epoch_batches))):
            state, value = step(state, skey, xb, yb)
            losses.append(value)
        if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
            seconds = time.perf_counter() - start
            print(f"epoch {epoch + 1:3d}  loss {float(np.mean(losses)):.4f}  ({seconds:.1f} s)")
    return {k: np.asarray(v, np.float32) for k, v in state[0].items()}, time.perf_counter() - start


def cross_entropy(logits: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Mean softmax cross-entropy against integer labels."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
