"""Shared fixtures. The full verifier (onnx.checker after every pass) is on for the whole suite."""

from __future__ import annotations

import os

os.environ.setdefault("QINJECT_VERIFY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

ort.set_default_logger_severity(3)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
