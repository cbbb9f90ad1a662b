"""How far a variant's outputs are from the float model's: the one scalar every sensitivity signal
(and the oracle that checks them) reports.

- with labels, for a classifier: the increase of the mean cross-entropy loss;
- without labels, for a classifier: the mean KL divergence from the float model's output
  distribution to the variant's;
- otherwise (a regression, an embedding): the output's normalised MSE against the float output.

A classifier is a model whose output is ``[samples, classes]`` with at least two classes; outputs
that are already probabilities (non-negative rows summing to 1, e.g. magika's) are used as they are,
logits go through a softmax.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def is_classifier(outputs: np.ndarray) -> bool:
    return outputs.ndim == 2 and outputs.shape[1] >= 2


def probabilities(outputs: np.ndarray) -> np.ndarray:
    x = np.asarray(outputs, dtype=np.float64)
    if np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return x
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(outputs: np.ndarray, labels: np.ndarray) -> float:
    p = probabilities(outputs)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(labels)), labels], EPS))))


def kl_divergence(reference: np.ndarray, outputs: np.ndarray) -> float:
    p, q = probabilities(reference), probabilities(outputs)
    return float(np.mean(np.sum(p * (np.log(np.maximum(p, EPS)) - np.log(np.maximum(q, EPS))), axis=1)))


def nmse(reference: np.ndarray, outputs: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    return float(np.mean((ref - outputs) ** 2) / max(np.mean(ref**2), EPS))


def damage(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None) -> float:
    """The damage of ``outputs`` relative to the float model's ``reference`` (0: none)."""
    if is_classifier(reference):
        if labels is not None:
            return cross_entropy(outputs, labels) - cross_entropy(reference, labels)
        return kl_divergence(reference, outputs)
    return nmse(reference, outputs)


def damage_name(reference: np.ndarray, labels: np.ndarray | None) -> str:
    if is_classifier(reference):
        return "loss increase" if labels is not None else "KL to float"
    return "output NMSE"
