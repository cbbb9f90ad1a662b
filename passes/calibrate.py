"""Calibration: one streaming pass of the calibration data through the model.

ONNX graphs run in onnxruntime; graphs holding jaxpr equations (from the jaxpr frontend), which
onnxruntime cannot run, run through the JAX backend under ``jax.jit``.

Collects, for every activation the Q/DQ rewrite may quantize (``qinject.quant_points``), running
min/max and a fixed-size histogram (``qinject.stats.TensorStats``), stored in the value's ``meta``.
Memory is one batch of activations plus the histograms, whatever the number of samples. The range
itself is chosen later, by the rewrite, because the best clipping depends on the bit width.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from qinject import ir as qir
from qinject.backends import onnx_backend
from qinject.calib_data import QinjectWarning, input_specs, open_source
from qinject.errors import CalibrationDataError
from qinject.pass_manager import Pass, PassResult
from qinject.quant_points import activation_points
from qinject.stats import METHODS, TensorStats


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
        if not points:
            return PassResult(model, False)
        specs = input_specs(model)
        source = open_source(self.data, specs, self.batch_size)
        inputs = {s.name for s in specs}
        outputs = [p for p in points if p.name not in inputs]  # graph inputs come from the feeds
        fetched = [p.name for p in outputs]
        run = _jax_runner(model, fetched) if qir.has_jax_nodes(model) else _onnx_runner(model, outputs)
        stats = {p.name: TensorStats(with_histogram=self.method != "minmax") for p in points}
        for feeds in tqdm(source, total=source.total, desc="calibrating", unit="batch",
                          disable=None if self.progress else True, leave=False):
            for name, array in zip(fetched, run(feeds)):
                stats[name].update(array)
            for name in inputs & stats.keys():
                stats[name].update(feeds[name])
        for p in points:
            s = stats[p.name]
            if s.nonfinite:
                warnings.warn(f"activation {p.name!r} had {s.nonfinite} NaN/Inf values during calibration; "
                              "they were ignored", QinjectWarning, stacklevel=2)
            p.meta[qir.ACT_STATS] = s
        return PassResult(model, False)


def _onnx_runner(model: ir.Model, outputs: list[ir.Value]) -> Callable[[dict], list[np.ndarray]]:
    fetched = [p.name for p in outputs]
    with qir.weightless(model) as weights:
        proto = _with_outputs(model, outputs)
    sess = onnx_backend.session(proto, weights=weights)
    return lambda feeds: sess.run(fetched, feeds)


def _jax_runner(model: ir.Model, fetched: list[str]) -> Callable[[dict], list[np.ndarray]]:
    import jax

    from qinject.backends import jax_backend

    program = jax_backend.Program(model, "simulated")
    skip = len(program.outputs)
    compiled = jax.jit(lambda *xs: program.run(program.constants, xs, fetch=fetched)[skip:])
    return lambda feeds: [np.asarray(a) for a in compiled(*[feeds[n] for n in program.inputs])]


def _with_outputs(model: ir.Model, values: list[ir.Value]) -> onnx.ModelProto:
    """A proto of ``model`` whose graph also outputs ``values`` (so onnxruntime returns them)."""
    proto = onnx_backend.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for v in values:
        if v.name in present:
            continue
        elem = v.dtype.value if v.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, elem, None))
    return proto
