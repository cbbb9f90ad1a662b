"""Calibration: one streaming pass of the calibration data through the model.

ONNX graphs run in onnxruntime; graphs holding jaxpr equations (from the jaxpr frontend), which
onnxruntime cannot run, run through the JAX backend under ``jax.jit``.

Collects, for every activation the Q/DQ rewrite may quantize (``qinject.quant_points``), running
min/max and a fixed-size histogram (``qinject.stats.TensorStats``), stored in the value's ``meta``.
Memory is one batch of activations plus the histograms, whatever the number of samples. The range
itself is chosen later, by the rewrite, because the best clipping depends on the bit width.

Tensors inside If/Loop/Scan bodies that feed quantizable nodes there are routed out to extra outputs
of the calibration model (``qinject.passes.transforms._subgraph_taps``); if onnxruntime refuses that model (a Loop body
tensor whose shape varies by iteration), calibration warns and observes the main graph only, and
the rewrite leaves those nodes float with a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import numpy as np
import onnx
import onnx_ir as ir
from qinject.passes.transforms import _subgraph_taps
from tqdm.auto import tqdm

from qinject.backends import jax_backend, onnx_backend
from qinject.core import ir as qir
from qinject.core.calib_data import QinjectWarning, input_specs, open_source
from qinject.core.errors import CalibrationDataError, QinjectError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.quant_points import activation_points, subgraph_activation_points
from qinject.core.stats import METHODS, TensorStats


class Calibrate(Pass):
    """Collect activation statistics on calibration data.

    Options:
        data: a path (.npz, folder), dict of arrays, iterable of feed dicts, a data reader, or None
            for random inputs (with a warning).
        method: minmax | percentile | mse | entropy (histograms are skipped for minmax).
        batch_size: samples per onnxruntime run when the model's batch axis is symbolic.
        progress: show a progress bar.
    """

    name = "calibrate"
    analysis = True

    def __init__(self, data: object = None, method: str = "minmax", batch_size: int = 16,
                 progress: bool = True) -> None:
        if method not in METHODS:
            raise CalibrationDataError(f"unknown calibration method {method!r} (expected one of {', '.join(METHODS)})")
        self.data, self.method, self.batch_size, self.progress = data, method, batch_size, progress

    def call(self, model: ir.Model) -> PassResult:
        points = activation_points(model)
        known = {p.name for p in points}
        points += [p for p in subgraph_activation_points(model) if p.name not in known]
        if not points:
            return PassResult(model, False)
        specs = input_specs(model)
        source = open_source(self.data, specs, self.batch_size)
        inputs = {s.name for s in specs}
        outputs = [p for p in points if p.name not in inputs]  # graph inputs come from the feeds
        if qir.has_jax_nodes(model):
            run = _jax_runner(model, [p.name for p in outputs])
        else:
            run = _tapped_runner(model, outputs)
        stats = {p.name: TensorStats(with_histogram=self.method != "minmax") for p in points}
        for feeds in tqdm(source, total=source.total, desc="calibrating", unit="batch",
                          disable=None if self.progress else True, leave=False):
            if qir.SAMPLE_FEED not in model.meta:
                _record_first_feed(model, feeds, specs)
            for value, array in zip(outputs, _run(run, feeds, source)):
                if array is not None:
                    stats[value.name].update(array)
            for name in inputs & stats.keys():
                stats[name].update(feeds[name])
        for p in points:
            s = stats[p.name]
            if s.nonfinite:
                warnings.warn(f"activation {p.name!r} had {s.nonfinite} NaN/Inf values during calibration; "
                              "they were ignored", QinjectWarning, stacklevel=2)
            if s.count or p.graph is model.graph:
                p.meta[qir.ACT_STATS] = s
        return PassResult(model, False)


def _record_first_feed(model: ir.Model, feeds: dict[str, np.ndarray], specs: list) -> None:
    """Keep the shapes calibration saw (latency estimates price symbolic dims at them) and one sample
    to run the written model on."""
    if not model.meta.get(qir.SHAPES_GIVEN):
        model.meta[qir.INPUT_SHAPES] = {name: tuple(a.shape) for name, a in feeds.items()}
    symbolic_batch = {s.name for s in specs if s.shape and s.batch_fixed is None}
    model.meta[qir.SAMPLE_FEED] = {name: np.array(a[:1] if name in symbolic_batch else a)
                                   for name, a in feeds.items()}


def _run(run: Callable[[dict], list], feeds: dict[str, np.ndarray], source: object) -> list:
    """One calibration batch; random inputs the model cannot run on are the data's fault, said as such."""
    if not getattr(source, "synthetic", False):
        return run(feeds)
    try:
        return run(feeds)
    except QinjectError:
        raise
    except Exception as exc:  # noqa: BLE001  (onnxruntime's and JAX's own exception types)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
        raise CalibrationDataError(f"the model does not run on random inputs ({shapes}): {first}; give real "
                                   "calibration data with --calib") from None


def _tapped_runner(model: ir.Model, outputs: list[ir.Value]) -> Callable[[dict], list[np.ndarray | None]]:
    """An onnxruntime runner for ``outputs``, body tensors included (see ``_TappedRunner``)."""
    if all(v.graph is model.graph for v in outputs):
        return _onnx_runner(model, outputs)
    return _TappedRunner(model, outputs)


class _TappedRunner:
    """Runs the model with its body tensors tapped; if onnxruntime refuses that (at load or on the
    first batch), warns once and runs the main-graph tensors only, giving None for body tensors."""

    def __init__(self, model: ir.Model, outputs: list[ir.Value]) -> None:
        self.model, self.outputs = model, outputs
        self.main = [v for v in outputs if v.graph is model.graph]
        self.fell_back, self.ran = False, False
        try:
            self.run = _onnx_runner(model, outputs)
        except Exception as exc:  # noqa: BLE001  (onnxruntime's own types; the main-graph runner re-raises)
            self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"calibration cannot observe tensors inside control-flow bodies ({first}); "
                      "their quantizable nodes stay float", QinjectWarning, stacklevel=5)
        self.run, self.fell_back = _onnx_runner(self.model, self.main), True

    def __call__(self, feeds: dict) -> list[np.ndarray | None]:
        try:
            got = self.run(feeds)
        except Exception as exc:  # noqa: BLE001
            if self.ran or self.fell_back:
                raise
            self._fall_back(exc)
            got = self.run(feeds)
        self.ran = True
        if not self.fell_back:
            return got
        by_name = dict(zip([v.name for v in self.main], got))
        return [by_name.get(v.name) for v in self.outputs]


def _onnx_runner(model: ir.Model, outputs: list[ir.Value]) -> Callable[[dict], list[np.ndarray]]:
    """A runner returning ``outputs`` in order (body tensors through taps)."""
    with qir.weightless(model) as weights:
        proto, fetched = _with_outputs(model, outputs)
    options = onnx_backend.session_options()
    if fetched != [v.name for v in outputs]:
        options.log_severity_level = 4  # a refused tap is handled (warned) by _tapped_runner: no error log
    sess = onnx_backend.session(proto, options, weights=weights)
    return lambda feeds: sess.run(fetched, feeds)


def _jax_runner(model: ir.Model, fetched: list[str]) -> Callable[[dict], list[np.ndarray]]:


    program = jax_backend.Program(model, "simulated")
    skip = len(program.outputs)
    compiled = jax.jit(lambda *xs: program.run(program.constants, xs, fetch=fetched)[skip:])
    return lambda feeds: [np.asarray(a) for a in compiled(*[feeds[n] for n in program.inputs])]


def _with_outputs(model: ir.Model, values: list[ir.Value]) -> tuple[onnx.ModelProto, list[str]]:
    """A proto of ``model`` whose graph also outputs ``values`` (so onnxruntime returns them), and the
    output name carrying each (a tap's for a tensor inside a control-flow body)."""
    proto = onnx_backend.to_proto(model)
    present = {o.name for o in proto.graph.output}
    inner = {v.name: _elem(v) for v in values if v.graph is not model.graph}
    routed = _subgraph_taps.tap(proto, inner) if inner else {}
    missing = sorted(set(inner) - set(routed))
    if missing:
        raise CalibrationDataError(f"cannot route body tensor(s) {missing} out of their control-flow node")
    for v in values:
        if v.name in present or v.name in routed:
            continue
        proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, _elem(v), None))
    return proto, [routed.get(v.name, v.name) for v in values]


def _elem(value: ir.Value) -> int:
    return value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
