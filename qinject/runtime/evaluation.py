"""What a search keeps within budget: a metric of a model variant, and the accuracy budget.

Metrics (higher is better):

- ``accuracy``: top-1 accuracy against labels (an evaluation ``.npz`` with a ``labels`` array);
- ``agreement``: without labels, for a classifier (outputs ``[samples, classes]``): top-1
  agreement with the float model's predictions;
- ``fidelity``: without labels, for anything else: ``1 - ||y_q - y|| / ||y||`` over the first output,
  the output's relative RMS error subtracted from 1 (shown with its SQNR: 40 dB is 0.99);
- a user metric: any Python callable taking an ``Executable`` (run it on your own data) and
  returning a float.

Accuracy, agreement and fidelity are fractions shown as percentages. A budget is a drop from the
float model's score:

- ``"1%"``: relative, the score may fall by 1% of the float score (accuracy 0.98 may fall to 0.9702);
- ``"0.5pt"``: absolute, in points: percentage points for the fraction metrics (0.98 → 0.975), the
  metric's own units for a user metric;
- a bare number (``0.005``): absolute, in the metric's own units.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from qinject.backends import jax_backend, onnx_backend
from qinject.core.errors import QinjectError
from qinject.runtime.damage import is_classifier
from qinject.runtime.eval_worker import run_session
from qinject.runtime.executor import as_onnx


class BudgetError(QinjectError):
    """An accuracy budget that cannot be read."""


@dataclass(frozen=True)
class Budget:
    """How far the metric may fall below the float model's score."""

    value: float
    relative: bool
    points: bool = False  # absolute, in percentage points of a fraction metric

    _PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|pt)?\s*$")

    @classmethod
    def parse(cls, text: str | float | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = repr(float(text))
        match = cls._PATTERN.match(str(text))
        if not match:
            raise BudgetError(f"accuracy budget {text!r} is not a drop such as '1%' (relative), '0.5pt' "
                              "(absolute points) or 0.005 (absolute)")
        value, unit = float(match.group(1)), match.group(2)
        if not math.isfinite(value):
            raise BudgetError(f"accuracy budget {text!r} is not finite")
        if unit == "%":
            return cls(value / 100.0, relative=True)
        return cls(value, relative=False, points=unit == "pt")

    def floor(self, float_score: float, metric: Metric) -> float:
        """The lowest score that still meets the budget."""
        if self.relative:
            return float_score - self.value * abs(float_score)
        return float_score - self.value * (0.01 if self.points and metric.fraction else 1.0)

    def __str__(self) -> str:
        if self.relative:
            return f"{self.value * 100:g}% relative drop"
        return f"{self.value:g}{'pt' if self.points else ''} absolute drop"


class Metric:
    """A score of a model variant's outputs (or of the variant itself); higher is better."""

    name = "metric"
    fraction = True  # a fraction in [0, 1], shown as a percentage

    def score(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        raise NotImplementedError

    def format(self, value: float) -> str:
        return f"{value:.2%}" if self.fraction else f"{value:.4g}"


class Accuracy(Metric):
    """Top-1 accuracy against labels."""

    name = "accuracy"

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels).reshape(-1)

    def score(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        if outputs.shape[0] != len(self.labels):
            raise QinjectError(f"{len(self.labels)} labels for {outputs.shape[0]} evaluation samples")
        return float(np.mean(np.asarray(outputs).reshape(len(outputs), -1).argmax(axis=1) == self.labels))


class Agreement(Metric):
    """Top-1 agreement with the float model's predictions."""

    name = "agreement"

    def score(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        return float(np.mean(np.argmax(outputs, axis=-1) == np.argmax(reference, axis=-1)))


class Fidelity(Metric):
    """``1 - ||y_q - y|| / ||y||``: one minus the first output's relative RMS error."""

    name = "fidelity"

    def score(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        ref = np.asarray(reference, dtype=np.float64)
        error = np.sqrt(np.sum((ref - outputs) ** 2) / max(np.sum(ref**2), 1e-30))
        return float(1.0 - error)

    def format(self, value: float) -> str:
        return f"{value:.2%} ({sqnr_from_fidelity(value):.1f} dB)"


def sqnr_from_fidelity(value: float) -> float:
    error = 1.0 - value
    return math.inf if error <= 0 else -20.0 * math.log10(error)


class UserMetric(Metric):
    """A Python callable ``fn(executable) -> float``; higher is better."""

    def __init__(self, fn: Callable[[Executable], float], name: str | None = None, fraction: bool = False) -> None:
        self.fn, self.fraction = fn, fraction
        self.name = name or getattr(fn, "__name__", "metric")

    def __call__(self, executable: Executable) -> float:
        value = self.fn(executable)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise QinjectError(f"metric {self.name!r} returned {type(value).__name__}, not a number") from None
        if not math.isfinite(value):
            raise QinjectError(f"metric {self.name!r} returned {value}")
        return value


def default_metric(reference: np.ndarray, labels: np.ndarray | None) -> Metric:
    """Accuracy with labels; without, agreement for classifiers and fidelity otherwise."""
    if labels is not None:
        return Accuracy(labels)
    return Agreement() if is_classifier(reference) else Fidelity()


class Executable:
    """A model variant a user metric can run: ``exe(feeds)`` or ``exe(array)`` → its outputs.

    Attributes:
        model: the IR model (quantized by the candidate plan; the float model for the reference).
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._session: Any = None

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.model.graph.inputs]

    def session(self) -> Any:
        """The onnxruntime session running this variant (built on first use)."""
        if self._session is None:

            self._session = onnx_backend.session(onnx_backend.to_proto(as_onnx(self.model)))
        return self._session

    def __call__(self, feeds: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if not isinstance(feeds, dict):
            if len(self.input_names) != 1:
                raise QinjectError(f"the model has inputs {self.input_names}: pass a dict of arrays")
            feeds = {self.input_names[0]: feeds}
        return self.session().run(None, feeds)

    def predict(self, inputs: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """The first output over all samples, batched (a fixed batch dimension gets its size, the last
        batch padded), as the search's own evaluations run."""

        if not isinstance(inputs, dict):
            inputs = {self.input_names[0]: inputs}
        return run_session(self.session(), inputs)

    def to_jax(self, mode: str = "simulated") -> Callable[..., Any]:

        return jax_backend.to_jax(self.model, mode)
