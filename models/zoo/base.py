"""``ZooModel``: a JAX model of the zoo with its weights and data splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import numpy as np

Forward = Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]


# eq=False: the generated __eq__ would compare arrays elementwise; identity is what callers want.
@dataclass(frozen=True, eq=False)
class ZooModel:
    """A trained JAX model, ready to trace, quantize and evaluate.

    Attributes:
        name: the zoo name (``models.zoo.NAMES``).
        forward: ``forward(params, x) -> logits [batch, classes]``; plain JAX ops whose shapes
            depend only on ``x.shape``, no control flow, so it traces for any fixed batch size.
        params: flat ``name -> float32 array`` (``"fc1.weight"``, ...), numpy arrays.
        calib_inputs: the calibration split (first axis = samples), disjoint from training and eval.
        eval_inputs: the held-out split, never trained on.
        eval_labels: int64 class labels of ``eval_inputs``.
    """

    name: str
    forward: Forward
    params: dict[str, np.ndarray]
    calib_inputs: np.ndarray
    eval_inputs: np.ndarray
    eval_labels: np.ndarray

    def example_input(self, batch: int) -> np.ndarray:
        """The first ``batch`` eval inputs; beyond the eval split's size they repeat cyclically."""
        return self.eval_inputs[np.arange(batch) % len(self.eval_inputs)]

    def evaluate(self, predict: Callable[[np.ndarray], np.ndarray], batch: int = 64) -> float:
        """Top-1 accuracy of ``predict`` on the eval split.

        Args:
            predict: ``x_batch -> logits``. It always receives exactly ``batch`` samples, since a
                traced or exported model is specialised to one batch size: the last partial batch is
                padded by repeating its last sample, and the padded predictions are dropped.
            batch: the batch size ``predict`` is called with.

        Returns:
            The fraction of eval samples whose argmax logit is the label.
        """
        n = len(self.eval_inputs)
        predicted = []
        for start in range(0, n, batch):
            idx = np.minimum(np.arange(start, start + batch), n - 1)
            logits = np.asarray(predict(self.eval_inputs[idx]))
            if logits.shape[0] != batch:
                raise ValueError(f"{self.name}: predict returned {logits.shape[0]} rows for a batch of "
                                 f"{batch} (expected one row of logits per sample)")
            predicted.append(logits.argmax(axis=-1)[: min(batch, n - start)])
        return float(np.mean(np.concatenate(predicted) == self.eval_labels))

    def accuracy_of_params(self, batch: int = 64) -> float:
        """Top-1 eval accuracy of the float model itself, through ``jax.jit``."""
        return self.evaluate(jax.jit(partial(self.forward, self.params)), batch)
