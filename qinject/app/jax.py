"""``qinject.jax.quantize``: a decorator that turns a JAX function into its quantized version.

    @qinject.jax.quantize(plan, params=params, calib=x_calib)
    def forward(params, x):
        ...

    logits = forward(x)                      # quantized; params are baked in as quantized weights
    logits = jax.jit(forward)(x)             # jittable
    per_example = jax.vmap(forward)(x)       # vmappable (each example traced at its own shape)

The decorated name is a ``QuantizedFunction`` of the remaining arguments; the original function is
kept, untouched, as ``.float_fn``. The first call for an input shape traces the function at that
shape (tracing needs only shapes, so it works on tracers under ``jit`` and ``vmap``), applies the
plan with the Q/DQ rewrite and compiles the graph through the JAX backend; later calls reuse it.
Calibration happens once, on the calibration data traced at ``calib_batch``; each shape's graph
takes the activation statistics of the same *point*: input i of the quantizable node of the same
name, or the output point of that node (quantizable nodes are named after their weights, which do
not depend on the shape, while other equations may: a per-example trace broadcasts a bias
differently). So every shape uses the very same scales.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import onnx_ir as ir

from qinject.backends.jax_backend import to_jax
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import QinjectError
from qinject.core.plan import Plan
from qinject.core.quant_points import output_point
from qinject.core.rules import Rules
from qinject.frontends.jax_frontend import trace_jax
from qinject.passes.transforms.calibrate import Calibrate
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.passes.transforms.upgrade_opset import UpgradeOpset


def quantize(plan_or_rules: Any = None, *, params: Any, calib: Any, method: str = "minmax",
             mode: str = "simulated", calib_batch: int = 64) -> Callable[[Callable], QuantizedFunction]:
    """Decorator: ``fn(params, *inputs)`` → a jittable quantized function of ``inputs``.

    Args:
        plan_or_rules: a ``Plan``, ``qinject.rules.Rules``, or None (W8A8 everywhere).
        params: the parameter pytree (its values become the quantized weights).
        calib: calibration inputs: an array (one input) or a tuple of arrays (one per input),
            first axis = samples.
        method: activation range method (minmax, percentile, mse, entropy).
        mode: the JAX backend's mode: "simulated" (float Q/DQ, differentiable) or "integer".
        calib_batch: the batch the calibration graph is traced at.
    """
    def wrap(fn: Callable) -> QuantizedFunction:
        return QuantizedFunction(fn, params, plan_or_rules, calib, method, mode, calib_batch)
    return wrap


class QuantizedFunction:
    """The quantized version of ``float_fn`` with its parameters bound (see the module docstring)."""

    def __init__(self, fn: Callable, params: Any, plan_or_rules: Any, calib: Any, method: str, mode: str,
                 calib_batch: int) -> None:
        self.float_fn, self.params, self.method, self.mode = fn, params, method, mode
        self.plan_or_rules = plan_or_rules if plan_or_rules is not None else Plan()
        self.calib = tuple(np.asarray(c) for c in (calib if isinstance(calib, (tuple, list)) else (calib,)))
        self.calib_batch = calib_batch
        self._stats: dict[str, Any] | None = None
        self._compiled: dict[tuple, tuple[ir.Model, Callable]] = {}
        self.__name__ = getattr(fn, "__name__", "quantized")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *inputs: Any) -> Any:
        return self._entry(inputs)[1](*inputs)

    def model_for(self, *inputs: Any) -> ir.Model:
        """The quantized IR model used for inputs shaped like these."""
        return self._entry(inputs)[0]

    def _entry(self, inputs: tuple) -> tuple[ir.Model, Callable]:
        key = tuple((tuple(np.shape(x)), str(jax.numpy.result_type(x))) for x in inputs)
        if key not in self._compiled:
            # Under jit every operation is staged, even on concrete data; calibration must run now.
            with jax.ensure_compile_time_eval():
                self._compiled[key] = self._build(inputs)
        return self._compiled[key]

    # -- building ---------------------------------------------------------------------------------
    def _trace(self, shapes: tuple) -> ir.Model:

        return trace_jax(self.float_fn, self.params, *shapes)

    def _calibration_stats(self) -> dict[str, Any]:
        if self._stats is None:

            n = len(self.calib[0])
            batch = min(self.calib_batch, n)
            examples = tuple(jax.ShapeDtypeStruct((batch, *c.shape[1:]), c.dtype) for c in self.calib)
            model = self._trace(examples)
            names = [v.name for v in model.graph.inputs]
            usable = n - n % batch
            Calibrate({k: c[:usable] for k, c in zip(names, self.calib)}, method=self.method, batch_size=batch,
                      progress=False)(model)
            self._stats = {key: v.meta[qir.ACT_STATS] for key, v in _points(model).items()
                           if qir.ACT_STATS in v.meta}
        return self._stats

    def _build(self, inputs: tuple) -> tuple[ir.Model, Callable]:

        stats = self._calibration_stats()
        shapes = tuple(jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in inputs)
        model = self._trace(shapes)
        plan = self.plan_or_rules
        if isinstance(plan, Rules):
            plan, _ = plan.plan(model)
        UpgradeOpset(plan.min_opset())(model)
        missing = []
        for key, value in _points(model).items():
            if key in stats:
                value.meta[qir.ACT_STATS] = stats[key]
            else:
                missing.append(key)
        if missing:
            raise QinjectError(f"{self.__name__} traced at shapes {[s.shape for s in shapes]} has quantization "
                               f"points {missing[:3]} the calibration trace lacks")
        InsertQDQ(plan, method=self.method)(model)
        return model, to_jax(model, self.mode)


def _points(model: ir.Model) -> dict[tuple, ir.Value]:
    """Every activation point by a shape-independent key: ("in", node, input index) for the
    activation inputs of quantizable nodes, ("out", node) for their output points, except those
    that are graph outputs (never quantized, so calibration does not observe them either)."""

    points: dict[tuple, ir.Value] = {}
    for node in qir.quantizable_nodes(model):
        for i in op_facts.activation_inputs(node):
            points[("in", node.name, i)] = node.inputs[i]
        out = output_point(node)
        if out is not None and not out.is_graph_output():
            points[("out", node.name)] = out
    return points
