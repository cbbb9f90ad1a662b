"""Sensitivity signal 3: the Hessian trace (HAWQ-v2's Ω).

For each quantizable node with a constant weight W (n parameters) and bit width b::

    Ω_b = Tr(H_W) / n · ||Q_b(W) − W||²

where H_W is the Hessian block of the loss with respect to W alone and Q_b the rewrite's weight
quantization (symmetric, per output channel). For a loss at a minimum and a quantization error that
looks like independent noise, ½ Ω_b is the second-order estimate of the loss increase. The loss is
the mean over the evaluation samples of:

- with labels and a classifier output: the cross-entropy;
- without labels: the KL divergence from the float model's output distribution (a constant) to the
  model's; its gradient at the float weights is zero and its Hessian there is the Gauss-Newton
  (Fisher) matrix, positive semi-definite;
- for any other output: the squared error to the float output over its mean square (the NMSE that
  ``qinject.damage`` reports), likewise zero-gradient and PSD at the float weights.

A classifier and "already probabilities" follow ``qinject.damage``. The trace is estimated as in
PyHessian: Hutchinson's ``E[vᵀHv]`` over Rademacher probes v (a ``jax.random`` key per node, from the
seed and the node's name), each Hessian-vector product by forward-over-reverse autodiff through the
JAX backend (so ONNX- and JAX-sourced graphs alike), stopping once the running mean changes by less
than ``tol`` relative between iterations (after ``min_iter``) or after ``max_iter``.

Cost: no executor evaluations. The count recorded in ``model.meta[EVALUATIONS]["hessian"]`` is the
number of Hessian-vector products, each over all evaluation samples (one probe of one node); one
HVP costs about two forward + backward passes, i.e. four to six model evaluations.

Where: in this process, or with ``executor="ray"``/``"ray://..."`` one node per Ray actor at a time
(``TraceWorker``: the model goes to the actors as ONNX bytes with the data, once, and each actor
builds the same JAX function; a graph with jax nodes stays in this process, its equations living in
meta that ONNX does not carry). The actors import qinject and JAX, so a cluster's nodes need qinject.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnx_ir as ir
from qinject.passes.sensitivity.base import (
    BITS,
    EVALUATIONS,
    PREFIX,
    AnalysisData,
    NodeSignal,
    SensitivityPass,
    iter_quantizable,
)
from tqdm.auto import tqdm

from qinject.backends.jax_backend import to_jax_with_weights
from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.calib_data import rows, take
from qinject.core.pass_manager import PassResult
from qinject.runtime import ray_executor
from qinject.runtime.damage import EPS, is_classifier, probabilities
from qinject.runtime.executor import to_onnx_bytes


class Hessian(SensitivityPass):
    """HAWQ's Ω per node and bit width: per-parameter Hessian trace times the weight's quantization
    error. A node without a float constant weight (an attention MatMul) scores 0 at every width,
    with ``details["weight"] = None``: Ω weighs weight error only.

    Options (besides ``SensitivityPass``'s evaluation data, bit widths, seed, progress):
        tol: stop when the running trace estimate changes by less than this, relatively.
        max_iter, min_iter: bounds on the number of probes (HVPs) per node.
        samples: evaluation samples the loss is averaged over (the first ones).
        batch_size: samples per HVP call when the graph's batch dimension is symbolic (a fixed one,
            as in a traced JAX graph, is used as it is; the last batch is padded and masked).
    """

    name = "sensitivity-hessian"
    signal = "hessian"
    cost_unit = "Hessian-vector products"

    def __init__(self, data: AnalysisData | object, bits: tuple[int, ...] = BITS, *, seed: int = 0,
                 workers: int | None = None, progress: bool = True, method: str = "minmax",
                 tol: float = 1e-3, max_iter: int = 100, min_iter: int = 5, samples: int = 256,
                 batch_size: int = 64, limit: int | None = None, executor: str | None = None,
                 skip: Collection[str] | Callable[[ir.Model], Collection[str]] = ()) -> None:
        super().__init__(data, bits, seed=seed, workers=workers, progress=progress, method=method, limit=limit,
                         executor=executor, skip=skip)
        if not 1 <= min_iter <= max_iter:
            raise ValueError(f"need 1 <= min_iter <= max_iter, got min_iter={min_iter}, max_iter={max_iter}")
        self.tol, self.max_iter, self.min_iter = tol, max_iter, min_iter
        self.samples, self.batch_size = samples, batch_size

    def call(self, model: ir.Model) -> PassResult:
        # Overrides the base: Hessian-vector products through the JAX backend, no executor.
        data = AnalysisData.load(self.data, model, limit=self.samples)
        self.settle(model)
        start = time.perf_counter()
        signals = self.traces(model, data)
        for node in iter_quantizable(model):
            if node.name in signals:
                node.meta[PREFIX + self.signal] = signals[node.name]
        hvps = sum(s.details.get("iterations", 0) for s in signals.values())
        model.meta.setdefault(EVALUATIONS, {})[self.signal] = (hvps, time.perf_counter() - start)
        return PassResult(model, False)

    def traces(self, model: ir.Model, data: AnalysisData) -> dict[str, NodeSignal]:
        """``{node name: NodeSignal}`` for every quantizable node."""
        floats = {name for name, v in model.graph.initializers.items()
                  if v.const_value is not None and v.const_value.numpy().dtype.kind == "f"}
        signals, nodes = {}, []
        for node in self.targets(model):
            w = op_facts.weight_of(node)
            if w is not None and w.name in floats:
                nodes.append((node, w))
            else:  # Ω has no weight error term to weigh (an attention MatMul): 0 at every width
                signals[node.name] = NodeSignal(dict.fromkeys(self.bits, 0.0), {"weight": None})
        jobs = [(w.name, node.name, self.seed, self.tol, self.min_iter, self.max_iter) for node, w in nodes]
        with tqdm(total=len(jobs), desc="hessian trace", unit="node", disable=None if self.progress else True,
                  leave=False) as bar:
            if ray_executor.is_ray(self.executor) and jobs and not qir.has_jax_nodes(model):
                # One node's probes on one actor, each actor holding the JAX function once. A graph with
                # jax nodes keeps its equations in meta, which no ONNX file carries: it stays here.
                pool = ray_executor.RayPool(self.executor, self.workers, (to_onnx_bytes(model), data.inputs,
                                                                          data.labels, self.batch_size), TraceWorker)
                try:
                    found = pool.map(jobs, lambda: bar.update(1))
                finally:
                    pool.close()
            else:
                problem = Problem(model, data.inputs, data.labels, self.batch_size)
                found = []
                for job in jobs:
                    found.append((*problem.trace(*job), problem.loss.kind))
                    bar.update(1)
        for (node, w), (estimates, converged, loss) in zip(nodes, found):
            signals[node.name] = self._signal(node, w, estimates, converged, loss)
        return signals

    def _signal(self, node: ir.Node, weight: ir.Value, estimates: list[float], converged: bool, loss: str
                ) -> NodeSignal:
        size = weight.const_value.numpy().size
        trace = float(np.mean(estimates))
        stderr = float(np.std(estimates, ddof=1) / np.sqrt(len(estimates))) if len(estimates) > 1 else float("nan")
        errors = {b: weight_sq_error(node, weight, b) for b in self.bits}
        return NodeSignal({b: trace / size * e for b, e in errors.items()},
                          {"trace": trace, "trace_per_param": trace / size, "trace_stderr": stderr,
                           "parameters": size, "iterations": len(estimates), "converged": converged,
                           "weight_sq_error": errors, "loss": loss})


def hutchinson(probe: Any, tol: float, min_iter: int, max_iter: int) -> tuple[list[float], bool]:
    """``probe(i)`` (the i-th sample vᵀHv) until the running mean changes by less than ``tol``
    relative (PyHessian's rule), after at least ``min_iter`` samples; returns (samples, converged)."""
    estimates: list[float] = []
    previous = None
    for i in range(max_iter):
        estimates.append(probe(i))
        mean = float(np.mean(estimates))
        if previous is not None and i + 1 >= min_iter and abs(mean - previous) <= tol * abs(previous):
            return estimates, True
        previous = mean
    return estimates, False


class Problem:
    """One model's loss on the evaluation samples and its jitted ``vᵀHv``: built once per process
    that computes traces (this one, or a Ray actor)."""

    def __init__(self, model: ir.Model, inputs: dict[str, np.ndarray], labels: np.ndarray | None,
                 batch_size: int) -> None:
        fn, floats = to_jax_with_weights(model, "simulated")
        self.weights = {k: jnp.asarray(v) for k, v in floats.items()}
        self.batches = _batches(model, AnalysisData(inputs, labels), batch_size)
        forward = jax.jit(lambda w, *xs: _first(fn(w, *xs)))
        reference = np.concatenate([np.asarray(forward(self.weights, *xs))[: int(m.sum())]
                                    for _, xs, m in self.batches])
        loss = self.loss = _Loss(reference, labels)
        self.targets = [loss.targets(start, len(m)) for start, _, m in self.batches]

        @partial(jax.jit, static_argnums=0)  # one compilation per weight
        def vhv(name: str, weights: dict, key: jax.Array, xs: tuple, target: tuple, mask: jax.Array) -> jax.Array:
            # The probe is drawn inside, the same in every batch, so nothing else compiles per shape.
            w = weights[name]
            v = jax.random.rademacher(key, w.shape, w.dtype)

            def of(a: jax.Array) -> jax.Array:
                return loss(_first(fn({**weights, name: a}, *xs)), target, mask)

            _, hv = jax.jvp(jax.grad(of), (w,), (v,))  # forward-over-reverse: H v
            return jnp.vdot(v, hv)

        self.vhv = vhv

    def trace(self, weight: str, node: str, seed: int, tol: float, min_iter: int, max_iter: int
              ) -> tuple[list[float], bool]:
        """Hutchinson's samples of ``Tr(H_weight)`` (a key per node, from the seed and its name)."""
        node_key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(node.encode()))

        def probe(i: int) -> float:
            key = jax.random.fold_in(node_key, i)
            return sum(float(self.vhv(weight, self.weights, key, xs, t, m))
                       for (_, xs, m), t in zip(self.batches, self.targets))

        return hutchinson(probe, tol, min_iter, max_iter)


class TraceWorker:
    """A Ray actor computing node traces (``ray_executor.RayPool``): the model, as ONNX bytes, and
    its data arrive with a task, become a ``Problem`` once, and serve every node sent after."""

    failure = "a Hessian trace failed"

    def __init__(self) -> None:
        self.problem, self.source = None, None

    def run(self, index: int, job: tuple, stored: list) -> tuple[int, str, object]:
        try:
            if stored[0] != self.source:
                import ray  # deferred: only a Ray actor gets here, and it has imported ray already

                blob, inputs, labels, batch_size = ray.get(stored[0])
                self.problem = Problem(ir.from_proto(onnx.ModelProto.FromString(blob)), inputs, labels, batch_size)
                self.source = stored[0]
            return index, "ok", (*self.problem.trace(*job), self.problem.loss.kind)
        except Exception as exc:  # noqa: BLE001  (reported to the driver as one line)
            return index, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def forget(self) -> None:
        self.problem = self.source = None

    def pid(self) -> int:
        return os.getpid()


def weight_sq_error(node: ir.Node, weight: ir.Value, bits: int) -> float:
    """``||Q_b(W) − W||²`` with the rewrite's weight quantization (symmetric, per output channel)."""
    w = weight.const_value.numpy().astype(np.float32)
    axis = op_facts.channel_axis(node) if w.ndim > 1 else None
    qtype = numerics.QType(bits, True)
    scale, zero = numerics.scale_zero_point(*numerics.weight_range(w, axis), qtype, symmetric=True)
    approx = numerics.fake_quantize(w, scale, zero, qtype, axis)
    return float(np.sum((w.astype(np.float64) - approx) ** 2))


class _Loss:
    """The mean loss over all ``n`` evaluation samples, as a sum of per-batch masked terms."""

    def __init__(self, reference: np.ndarray, labels: np.ndarray | None) -> None:
        self.n, self.labels = len(reference), labels
        if is_classifier(reference):
            x = reference.astype(np.float64)
            # qinject.damage.probabilities' rule: rows already on the simplex are used as they are.
            self.probs = bool(np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))
            if labels is not None:
                self.kind = "cross-entropy"
            else:
                self.kind = "kl"
                p = probabilities(x)
                self.p_ref = p.astype(np.float32)
                self.neg_entropy = np.sum(p * np.log(np.maximum(p, EPS)), axis=1).astype(np.float32)
        else:
            self.kind = "nmse"
            self.reference = reference.astype(np.float32)
            self.power = max(float(np.mean(reference.astype(np.float64) ** 2)), EPS)

    def targets(self, start: int, batch_len: int) -> tuple:
        """What the batch starting at sample ``start`` is compared with (padded by its last row)."""
        idx = np.minimum(np.arange(start, start + batch_len), self.n - 1)
        if self.kind == "cross-entropy":
            return (jnp.asarray(self.labels[idx]),)
        if self.kind == "kl":
            return jnp.asarray(self.p_ref[idx]), jnp.asarray(self.neg_entropy[idx])
        return (jnp.asarray(self.reference[idx]),)

    def __call__(self, out: jax.Array, target: tuple, mask: jax.Array) -> jax.Array:
        if self.kind == "nmse":
            per = jnp.mean(jnp.reshape((out - target[0]) ** 2, (out.shape[0], -1)), axis=1) / self.power
        else:
            logq = jnp.log(jnp.maximum(out, EPS)) if self.probs else jax.nn.log_softmax(out, axis=1)
            if self.kind == "cross-entropy":
                per = -jnp.take_along_axis(logq, target[0][:, None], axis=1)[:, 0]
            else:
                per = target[1] - jnp.sum(target[0] * logq, axis=1)
        return jnp.sum(per * mask) / self.n


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _batches(model: ir.Model, data: AnalysisData, batch_size: int) -> list[tuple[int, tuple, jax.Array]]:
    """``[(first sample, inputs in graph order, mask)]``: fixed-size batches (the graph input's fixed
    leading dim, else ``batch_size``), the last padded by repeating its last sample, masked out."""
    names = [v.name for v in model.graph.inputs]
    n = rows(data.inputs)
    shape = model.graph.inputs[0].shape
    lead = shape[0] if shape is not None and len(shape) else None
    step = lead if isinstance(lead, int) else min(batch_size, n)
    out = []
    for start in range(0, n, step):
        idx = np.minimum(np.arange(start, start + step), n - 1)
        mask = (np.arange(start, start + step) < n).astype(np.float32)
        feeds = take(data.inputs, idx)
        out.append((start, tuple(jnp.asarray(feeds[k]) for k in names), jnp.asarray(mask)))
    return out
