"""The JAX model zoo: small trained models with their data splits, for tracing and quantizing.

Each model is a ``ZooModel`` (``models.zoo.base``): ``forward(params, x)``, its float32 weights,
a calibration split and a held-out split with labels. Loading reads committed files only (no
training); see ``models/zoo/README.md`` for the tasks, accuracies and how to retrain.

    from models import zoo
    model = zoo.load("text_transformer")
    print(model.accuracy_of_params())
"""

from __future__ import annotations

import importlib

from models.zoo.base import ZooModel

NAMES = ("digits_mlp", "digits_cnn", "text_transformer")

__all__ = ["NAMES", "ZooModel", "load"]


def load(name: str) -> ZooModel:
    """Load a zoo model by name (one of ``NAMES``)."""
    if name not in NAMES:
        raise ValueError(f"unknown zoo model {name!r} (expected one of {', '.join(NAMES)})")
    return importlib.import_module(f"models.zoo.{name}").load()
