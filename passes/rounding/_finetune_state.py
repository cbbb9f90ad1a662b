"""What fine-tuning carries between steps besides the optimiser: oscillation tracking of low-bit
weights (Nagel et al., 2022), and checkpoints of everything so a killed run resumes.

Oscillations: with rounding passed straight through, a latent weight near the midpoint between two
grid points flips between them step after step, and at the end its code is whichever it happened to
hold. Per weight: its code ``c_t``, the direction of its last change, and an exponential moving
average (momentum ``m``) of *reversals* (a change opposite to the previous one): the oscillation
frequency ``f``. A weight whose ``f`` exceeds the threshold is frozen at the moving average of its
codes, rounded, for the rest of the run (iterative freezing). Dampening, the other remedy of the
paper, is a loss term ``λ·mean((⌊v⌉ − clip(v, n, p))²)``, ``v = w/s + z``, pulling latent weights to
their grid points (``dampening``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qinject.core.errors import QinjectError


def init_oscillation(codes: Any) -> dict[str, Any]:
    codes = jnp.asarray(codes, jnp.float32)
    zeros = jnp.zeros_like(codes)
    return {"prev": codes, "dir": zeros, "freq": zeros, "ema": codes, "mask": jnp.zeros(codes.shape, bool),
            "held": codes}


def update_oscillation(state: dict[str, Any], codes: Any, momentum: float, threshold: float) -> dict[str, Any]:
    """The state after a step that left the weight at integer ``codes``."""
    delta = codes - state["prev"]
    changed = delta != 0
    sign = jnp.sign(delta)
    reversed_ = changed & (state["dir"] != 0) & (sign == -state["dir"])
    freq = momentum * reversed_ + (1 - momentum) * state["freq"]
    ema = momentum * codes + (1 - momentum) * state["ema"]
    newly = (freq > threshold) & ~state["mask"]
    return {"prev": codes, "dir": jnp.where(changed, sign, state["dir"]), "freq": freq, "ema": ema,
            "mask": state["mask"] | newly, "held": jnp.where(newly, jnp.rint(ema), state["held"])}


def frozen(states: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """Weight key -> (mask, codes) of the weights held at a code."""
    return {k: (s["mask"], s["held"]) for k, s in states.items()}


def dampening(w: Any, scale: Any, zero: Any, qmin: int, qmax: int) -> Any:
    """The mean squared distance (in steps) of latent weights from their grid points; the scale is
    held (the term moves weights, not the grid)."""
    v = w / lax.stop_gradient(scale) + lax.stop_gradient(zero)
    return jnp.mean((lax.stop_gradient(jnp.clip(jnp.rint(v), qmin, qmax)) - jnp.clip(v, qmin, qmax)) ** 2)


# -- checkpoints -----------------------------------------------------------------------------------------
def fingerprint(params: dict) -> str:
    """What a checkpoint must match to resume: every parameter's path and shape."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return ";".join(f"{jax.tree_util.keystr(path)}{list(np.shape(leaf))}" for path, leaf in leaves)


def save_checkpoint(path: str | os.PathLike, step: int, print_: str, trees: dict[str, Any]) -> None:
    """``trees`` (params, optimiser state, oscillation state, ...) at ``step``, written atomically."""
    path = Path(path)
    arrays = {"step": np.asarray(step), "fingerprint": np.asarray(print_)}
    for name, tree in trees.items():
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, print_: str, trees: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``(step, trees)`` from a checkpoint, with the structure of ``trees``.

    Raises:
        QinjectError: when the checkpoint belongs to another model, plan or option set.
    """
    with np.load(path) as data:
        if str(data["fingerprint"]) != print_:
            raise QinjectError(f"checkpoint {str(path)!r} holds the parameters of another model or plan (expected "
                               f"{len(print_.split(';'))} parameters of this one); delete it or pass another path")
        out = {}
        for name, tree in trees.items():
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            out[name] = jax.tree_util.tree_unflatten(
                treedef, [jnp.asarray(data[f"{name}/{i}"], dtype=jnp.asarray(leaf).dtype) for i, leaf in enumerate(leaves)])
        return int(data["step"]), out
