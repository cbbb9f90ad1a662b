"""Error types. Every error a user can cause is a QinjectError whose message is one clear line."""

from __future__ import annotations


class QinjectError(Exception):
    """An error caused by the user's input: the CLI prints its message as one line and exits non-zero."""


class ModelLoadError(QinjectError):
    """The model file or proto could not be read or is not valid ONNX."""


class UnsupportedModelError(QinjectError):
    """The model is valid but uses something qinject refuses (an op, an opset, a dynamic weight)."""


class CalibrationDataError(QinjectError):
    """Calibration data is missing, empty, or does not match the model's inputs."""


class PlanError(QinjectError):
    """A plan file is malformed or names nodes that do not exist."""


class VerificationError(QinjectError):
    """The IR broke an invariant (use before definition, a cycle, a dangling value)."""


class PassContractError(RuntimeError):
    """A pass broke the contract it declares (a bug in the pass, not in the user's input)."""
