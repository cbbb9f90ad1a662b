"""Sensitivity analysis: what the signal passes (``passes/sensitivity/*.py``) share.

Each signal is an analysis pass that annotates every quantizable node, never changing the graph:
``node.meta["qinject.sensitivity.<signal>"]`` is a ``NodeSignal``: ``score[bits]`` (higher: more
sensitive; what a search ranks by), and the signal's own ``details`` (e.g. a weight's SQNR). The
passes run on a *calibrated* float model (``prepare``), measure through one ``Executor`` each (its
evaluation count is recorded in the model's meta), and are deterministic for a given seed.

The signal passes themselves, ``SIGNALS``, ``signal_pass``, ``report`` and ``format_table`` are in the
package (``qinject.passes.sensitivity``), which imports every signal module.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.calib_data import QinjectWarning, largest_uniform_group, rows, take
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import NodeQuant, Plan
from qinject.runtime.executor import Executor

BITS = (16, 8, 4)
# A bit width b quantizes weights to b bits and activations to max(b, 8): W16A16, W8A8, W4A8, the
# usual low-bit deployment. (4-bit activations now run on onnxruntime, written as Clip -> 8-bit Q/DQ
# by the ONNX backend, but the signals keep measuring the deployed widths; their error is still
# reported analytically by the quant-error signal.)
MIN_ACTIVATION_BITS = 8


def choice_for(bits: int) -> NodeQuant:
    """The node choice a sensitivity bit width stands for."""
    return NodeQuant(weights=bits, activations=max(bits, MIN_ACTIVATION_BITS))


def width_label(bits: int | None) -> str:
    """How a sensitivity bit width reads in reports: "W4A8", "W16A16", or "float" for None."""
    if bits is None:
        return "float"
    choice = choice_for(bits)
    return f"W{choice.weights}A{choice.activations}"


def alone(node: str, bits: int) -> Plan:
    """The plan quantizing only ``node``, at sensitivity width ``bits``."""
    return Plan(None, {node: choice_for(bits)})
PREFIX = "qinject.sensitivity."
EVALUATIONS = "qinject.sensitivity.evaluations"  # model meta: {signal: (count, seconds)}
FORMAT, VERSION = "qinject-sensitivity", 1



@dataclass
class AnalysisData:
    """What the signals measure on: inputs keyed by graph input name, and labels if there are any
    (then damage is a loss increase; without, a divergence from the float model's outputs)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @classmethod
    def load(cls, source: object, model: ir.Model, limit: int | None = None) -> AnalysisData:
        """From an ``.npz`` path (inputs keyed by name, optional ``labels``), a dict, or a bare array
        (single-input models); at most ``limit`` samples."""

        if isinstance(source, AnalysisData):
            data = source
        else:
            if isinstance(source, (str, Path)) and Path(source).is_dir():
                arrays = _read_folder(Path(source))
            elif isinstance(source, (str, Path)):
                path = Path(source)
                if not path.is_file():
                    raise QinjectError(f"evaluation data {str(path)!r} does not exist")
                arrays = _read_npz(path)
            elif isinstance(source, np.ndarray):
                names = [v.name for v in model.graph.inputs]
                if len(names) != 1:
                    raise QinjectError(f"a bare array feeds a single-input model; this one has inputs {names}")
                arrays = {names[0]: source}
            elif isinstance(source, dict):
                arrays = dict(source)
            else:
                raise QinjectError(f"cannot use a {type(source).__name__} as evaluation data")
            labels = arrays.pop("labels", None)
            data = cls(arrays, None if labels is None else np.asarray(labels).astype(np.int64))
        missing = [v.name for v in model.graph.inputs if v.name not in data.inputs]
        if missing:
            raise QinjectError(f"evaluation data lacks model input(s) {missing} (it has {sorted(data.inputs)})")
        counts = {len(v) for v in data.inputs.values() if np.ndim(v)} | (
            {len(data.labels)} if data.labels is not None else set())
        if len(counts) != 1:
            raise QinjectError(f"evaluation data: inputs and labels have different sample counts {sorted(counts)}")
        data = _one_value_per_scalar_input(data, model)
        if limit is not None:
            data = AnalysisData(take(data.inputs, slice(None, limit)),
                                None if data.labels is None else data.labels[:limit])
        return data


def _one_value_per_scalar_input(data: AnalysisData, model: ir.Model) -> AnalysisData:
    """A scalar model input (an If's mode, a Loop's count) given one value per sample: the samples of
    its most common value, that value as a 0-d array (a model run takes one value; warned when the
    data had several)."""
    scalars = [v.name for v in model.graph.inputs
               if v.shape is not None and len(v.shape) == 0 and np.ndim(data.inputs[v.name]) == 1]
    if not scalars:
        return data
    keys = np.stack([np.asarray(data.inputs[n]) for n in scalars], axis=1)
    values, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    keep = np.flatnonzero(inverse.reshape(-1) == int(np.argmax(counts)))
    if len(values) > 1:
        warnings.warn(f"evaluation data gives scalar input(s) {scalars} {len(values)} different values; the search "
                      f"measures on the {len(keep)} samples of the most common one", QinjectWarning, stacklevel=4)
    inputs = take({k: v for k, v in data.inputs.items() if k not in scalars}, keep)
    inputs.update({n: np.asarray(data.inputs[n])[keep[0]] for n in scalars})
    return AnalysisData(inputs, None if data.labels is None else data.labels[keep])


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as archive:
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise QinjectError(f"cannot read evaluation data {str(path)!r}: {exc}") from None


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
    """A folder of .npz files (shapes may differ between files): the files of the most common shape,
    concatenated, labels included; a warning when there were several shapes."""
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise QinjectError(f"evaluation folder {str(folder)!r} has no .npz files")
    arrays, groups = largest_uniform_group([_read_npz(f) for f in files])
    if groups > 1:
        warnings.warn(f"evaluation folder {str(folder)!r} has {groups} input shapes; the search measures on the "
                      f"{rows(arrays)} samples of the most common one", QinjectWarning, stacklevel=4)
    return arrays


@dataclass
class NodeSignal:
    """One node's value of one signal: ``score`` per bit width, plus what the signal measured."""

    score: dict[int, float]
    details: dict[str, Any] = field(default_factory=dict)


class SensitivityPass(Pass):
    """Base of the signal passes: an analysis, with the evaluation data, bit widths and seed.

    Subclasses set ``name`` and ``signal`` and implement ``measure(model, executor)``, returning
    ``{node name: NodeSignal}``.
    """

    analysis = True
    signal = "signal"
    cost_unit = "model evaluations"  # what the recorded count counts

    def __init__(self, data: AnalysisData | object,
                 bits: tuple[int, ...] | Callable[[ir.Model], tuple[int, ...]] = BITS, *, seed: int = 0,
                 workers: int | None = None, progress: bool = True, method: str = "minmax",
                 limit: int | None = None, executor: str | None = None,
                 skip: Collection[str] | Callable[[ir.Model], Collection[str]] = ()) -> None:
        # the widths measured, or what decides them per model (a search's ``SearchWidths.measured``)
        self.widths = bits if callable(bits) else None
        # nodes not measured, or what decides them per model (``SearchWidths.floated``: no width pays)
        self.skip, self.skipped = skip, frozenset(() if callable(skip) else skip)
        self.data, self.bits, self.seed = data, BITS if callable(bits) else tuple(bits), seed
        self.workers, self.progress, self.method, self.limit = workers, progress, method, limit
        self.executor = executor  # where evaluations run: None/"process", "ray", "ray://HOST:PORT"

    def call(self, model: ir.Model) -> PassResult:
        data = AnalysisData.load(self.data, model, self.limit)
        self.settle(model)
        start = time.perf_counter()
        with Executor(model, data.inputs, workers=self.workers, method=self.method, executor=self.executor,
                      progress=self.signal.replace("_", " ") if self.progress else None) as executor:
            signals = self.measure(model, executor, data)
            count = executor.count
        for node in qir.searchable_nodes(model):
            if node.name in signals:
                node.meta[PREFIX + self.signal] = signals[node.name]
        model.meta.setdefault(EVALUATIONS, {})[self.signal] = (count, time.perf_counter() - start)
        return PassResult(model, False)

    def measure(self, model: ir.Model, executor: Executor, data: AnalysisData) -> dict[str, NodeSignal]:
        raise NotImplementedError

    def settle(self, model: ir.Model) -> None:
        """The widths and the skipped nodes, where callables decide them per model."""
        if self.widths is not None:
            self.bits = tuple(self.widths(model))
        if callable(self.skip):
            self.skipped = frozenset(self.skip(model))

    def targets(self, model: ir.Model) -> list[ir.Node]:
        """The nodes this pass measures: every quantizable node (``iter_quantizable``) but the skipped."""
        return [n for n in iter_quantizable(model) if n.name not in self.skipped]


def signal_of(model: ir.Model, signal: str) -> dict[str, NodeSignal]:
    """Node name -> its value of ``signal`` (the nodes the pass annotated)."""
    return {n.name: n.meta[PREFIX + signal] for n in qir.searchable_nodes(model) if PREFIX + signal in n.meta}


def signals_present(model: ir.Model) -> list[str]:
    found = {k[len(PREFIX):] for n in model.graph for k in n.meta if k.startswith(PREFIX)}
    return sorted(found)


def ranking(model: ir.Model, signal: str, bits: int) -> list[str]:
    """Quantizable nodes from most to least sensitive by ``signal`` at ``bits``."""
    values = signal_of(model, signal)
    return sorted(values, key=lambda name: -values[name].score[bits])


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def iter_quantizable(model: ir.Model) -> Iterator[ir.Node]:
    """The nodes every signal covers: the quantizable nodes, in graph order, then those in bodies."""
    return iter(qir.searchable_nodes(model))

