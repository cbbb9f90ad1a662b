"""Shared fixtures. The full verifier (onnx.checker after every pass) is on for the whole suite, and the
profile cache is a fresh empty folder."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("QINJECT_VERIFY", "1")
# Tables a developer profiled into their cache would shadow the built-in local-cpu and change figures;
# the suite reads and writes an empty cache of its own.
os.environ["QINJECT_TARGETS"] = tempfile.mkdtemp(prefix="qinject-targets-")
# A CLI quantize times its rewrite and keeps float what runs slower (passes/target/fit_measured.py): on a
# shared machine that makes written models vary between runs. Tests of the timing unset it.
os.environ["QINJECT_NO_MEASURE"] = "1"

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

ort.set_default_logger_severity(3)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
