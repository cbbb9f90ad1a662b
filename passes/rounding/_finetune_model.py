"""The model fine-tuning trains: the plan's QDQ graph, run by the JAX backend with learnable Q/DQ.

``Trainable.build`` rewrites a clone of the calibrated float model with ``InsertQDQ`` (the plan, the
calibration method), so what is trained is exactly the graph that will be written: the same
activation points, the same shared pairs. Then, in the JAX backend's simulated mode:

- each activation QuantizeLinear → DequantizeLinear pair is LSQ+ fake quantization with a learnable
  scale and offset (``qinject.backends.lsq``), initialised from the calibrated ones, or by LSQ+'s MSE
  on the values it sees on training batches (``init_activations_mse``); a pair that
  reuses the scale of the tensor upstream of range-preserving ops (MaxPool, Reshape, ...) shares
  its parameters, as the rewrite shares them;
- each static node's weight DequantizeLinear is LSQ+ fake quantization of the float weight (learnable
  when ``train_weights``) with learnable per-channel scales (and offsets for asymmetric weights),
  initialised by MSE or from the weight's min/max;
- an int32 bias becomes its float value (learnable with the weights): its rounding at scale
  ``s_x·s_w`` is far below one output step.

Dynamic and weight-only nodes run as the rewrite writes them, unchanged. ``write_back`` hands the
result to the float model: weights on the learned grid (so the rewrite's codes are the learned ones)
and the learned scales and zero points in the values' meta (``qinject.core.learned``), which
``InsertQDQ`` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import onnx_ir as ir

from qinject.backends import lsq
from qinject.backends.jax_backend import Program
from qinject.backends.jax_qdq import qtype_of
from qinject.core import op_facts
from qinject.core import ir as qir
from qinject.core.learned import set_learned
from qinject.core.numerics import QType
from qinject.core.plan import Plan
from qinject.core.quant_points import output_point, range_source
from qinject.core.search_result import search_result
from qinject.passes.transforms.insert_qdq import InsertQDQ


@dataclass(frozen=True)
class Quantizer:
    """One learnable quantizer: of a weight (``axis`` its channel axis, None per tensor) or of an
    activation tensor, by the name of the float value it quantizes."""

    key: str  # the parameter's name in the pytrees
    value: str
    qtype: QType
    symmetric: bool
    axis: int | None
    is_weight: bool
    elements: int  # values sharing one scale (LSQ's N)

    @property
    def qmin(self) -> int:  # symmetric signed weights use the restricted range, as the rewrite writes them
        return -self.qtype.qmax if self.symmetric and self.qtype.signed else self.qtype.qmin

    @property
    def qmax(self) -> int:
        return self.qtype.qmax

    def broadcast(self, p: Any, ndim: int) -> Any:
        if self.axis is None or jnp.ndim(p) == 0:
            return p
        shape = [1] * ndim
        shape[self.axis] = -1
        return jnp.reshape(p, shape)


class Trainable:
    """The QDQ graph of a plan as ``forward(params, frozen, *inputs)`` with learnable quantizers.

    Attributes:
        quantizers: by parameter key. ``params``: the initial ``{"scale", "offset", "weight",
        "bias"}`` pytree (``weight``/``bias`` empty unless trained). ``biases``: bias name -> the
        quantizer key of its node's weight (for the learning-rate unit).
    """

    def __init__(self, model: ir.Model, plan: Plan, *, method: str = "minmax", percentile: float = 99.99,
                 train_weights: bool = True, init: str = "mse") -> None:
        self.model, self.train_weights = model, train_weights
        self.qdq = model.clone()
        InsertQDQ(plan, method=method, percentile=percentile)(self.qdq)
        self.program = _Program(self.qdq)
        self.quantizers: dict[str, Quantizer] = {}
        self.params: dict[str, dict[str, np.ndarray]] = {"scale": {}, "offset": {}, "weight": {}, "bias": {}}
        self.biases: dict[str, str] = {}
        self._activation_nodes: dict[int, str] = {}  # id of an activation QuantizeLinear -> its key
        self._weights(init)
        self._activations()

    # -- building --------------------------------------------------------------------------------------
    def _weights(self, init: str) -> None:
        floats = {n.name: n for n in qir.searchable_nodes(self.model)}  # inside If/Loop/Scan bodies too
        for node in self.qdq.graph.all_nodes():  # rewritten nodes read a DequantizeLinear, no longer a constant
            choice = node.meta.get(qir.QUANT_APPLIED)
            source = floats.get(node.name)
            if choice is None or not choice.quantizes_activations or source is None:
                continue
            widx = op_facts.weight_index(source)
            if widx is None or op_facts.weight_of(source) is None:
                continue
            dq = node.inputs[widx].producer()
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            w = op_facts.weight_of(source)
            key = f"w:{w.name}:{choice.weight_qtype}"
            if key not in self.quantizers:
                array = np.asarray(self.qdq_initial(w), np.float32)
                axis = _attr_axis(dq) if np.ndim(self.program.constants[dq.inputs[1].name]) else None
                elements = array.size // (array.shape[axis] if axis is not None else 1)
                q = Quantizer(key, w.name, choice.weight_qtype, choice.weight_symmetric, axis, True, elements)
                if init == "mse":
                    scale, offset = lsq.mse_scale(array, q.qmin, q.qmax, q.symmetric, axis)
                else:
                    scale, offset = self._pair_init(dq)
                self._add(q, scale, offset)
                if self.train_weights:
                    self.params["weight"][key] = array
                self.program.overrides[id(dq)] = self._weight_fn(q)
            bidx = op_facts.fact(source).bias_input
            if self.train_weights and bidx is not None and bidx < len(node.inputs) and node.inputs[bidx] is not None:
                bdq, bias = node.inputs[bidx].producer(), source.inputs[bidx]
                if bdq is not None and bdq.op_type == "DequantizeLinear" and bias.const_value is not None:
                    self.params["bias"][bias.name] = np.asarray(bias.const_value.numpy(), np.float32)
                    self.biases[bias.name] = key
                    self.program.overrides[id(bdq)] = self._bias_fn(bias.name)

    def qdq_initial(self, w: ir.Value) -> np.ndarray:
        """The float weight training starts from (a search's AdaRound weight where it replaced it)."""
        found = search_result(self.model)
        if found is not None and w.name in found.weights:
            return found.weights[w.name]
        return w.const_value.numpy()

    def _activations(self) -> None:
        symmetric = self._activation_symmetry()
        by_value: dict[tuple[str, QType], str] = {}
        pairs = []
        for q in self.qdq.graph.all_nodes():
            if q.op_type != "QuantizeLinear" or q.inputs[1] is None or q.inputs[1].name not in self.program.constants:
                continue
            dqs = [u.node for u in q.outputs[0].uses() if u.node.op_type == "DequantizeLinear"]
            qtype = qtype_of(np.asarray(self.program.constants[q.inputs[2].name]).dtype) if len(q.inputs) > 2 \
                else QType(8, False)
            pairs.append((q, dqs, qtype))
            by_value[(q.inputs[0].name, qtype)] = ""
        float_values = {v.name: v for n in self.model.graph.all_nodes() for v in n.outputs}
        float_values.update({v.name: v for g in (self.model.graph, *self.model.graph.subgraphs()) for v in g.inputs})
        for q, dqs, qtype in pairs:
            name = q.inputs[0].name
            scale, offset = self._pair_init(q)
            source = self._shared_source(float_values.get(name), qtype, scale, offset, by_value)
            key = f"a:{source or name}:{qtype}"
            if key not in self.quantizers:
                shape = q.inputs[0].shape
                elements = int(np.prod([d for d in shape[1:] if isinstance(d, int)])) if shape is not None else 1
                quant = Quantizer(key, source or name, qtype, symmetric.get((name, qtype), False), None, False,
                                  elements)
                self._add(quant, scale, offset)
            self.program.overrides[id(q)] = self._activation_fn(self.quantizers[key])
            self._activation_nodes[id(q)] = key
            for dq in dqs:
                self.program.overrides[id(dq)] = _identity

    def init_activations_mse(self, batches: Iterable[list[np.ndarray]], limit: int = 1 << 20) -> None:
        """Re-initialise every activation scale and offset by LSQ+'s MSE (``lsq.mse_scale``) on the values
        its quantizer sees when ``batches`` (positional inputs) run through the graph at the initial
        parameters; at most ``limit`` values per quantizer, drawn evenly."""
        seen: dict[str, list[np.ndarray]] = {key: [] for key in self._activation_nodes.values()}
        kept = dict(self.program.overrides)

        def recording(key: str, run: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], list[Any]]:
            def record(args: list[Any]) -> list[Any]:
                seen[key].append(np.asarray(args[0], np.float32).ravel())
                return run(args)
            return record

        for node, key in self._activation_nodes.items():
            self.program.overrides[node] = recording(key, kept[node])
        try:
            params = {kind: {k: jnp.asarray(v) for k, v in group.items()} for kind, group in self.params.items()}
            for inputs in batches:  # eagerly: the recorded values must be concrete arrays
                self.forward(params, {}, inputs)
        finally:
            self.program.overrides = kept
        for key, parts in seen.items():
            if not parts:
                continue
            values = np.concatenate(parts)
            values = values[np.linspace(0, values.size - 1, min(limit, values.size)).astype(np.int64)]
            q = self.quantizers[key]
            scale, offset = lsq.mse_scale(values, q.qmin, q.qmax, q.symmetric)
            self.params["scale"][key], self.params["offset"][key] = scale, offset

    def _activation_symmetry(self) -> dict[tuple[str, QType], bool]:
        """(value, type) -> whether the plan quantizes it symmetrically (the rewrite's ActKey)."""
        floats = {n.name: n for n in qir.searchable_nodes(self.model)}
        out: dict[tuple[str, QType], bool] = {}
        for node in self.qdq.graph.all_nodes():  # rewritten nodes read a DequantizeLinear, no longer a constant
            choice, source = node.meta.get(qir.QUANT_APPLIED), floats.get(node.name)
            if choice is None or source is None or not choice.quantizes_activations:
                continue
            names = [source.inputs[i].name for i in op_facts.activation_inputs(source)]
            names.append(output_point(source).name)
            for name in names:
                out.setdefault((name, choice.activation_qtype), choice.activation_symmetric)
        return out

    def _shared_source(self, value: ir.Value | None, qtype: QType, scale: np.ndarray, offset: np.ndarray,
                       by_value: dict) -> str | None:
        """The tensor upstream through range-preserving ops whose pair this one reuses (same type and
        the same scale and offset: the rewrite shared them), if any."""
        source = range_source(value) if value is not None else None
        while source is not None:
            if (source.name, qtype) in by_value:
                key = f"a:{source.name}:{qtype}"
                other = self.quantizers.get(key)
                if other is not None and np.array_equal(self.params["scale"][key], scale) and \
                        np.array_equal(self.params["offset"][key], offset):
                    return source.name
            source = range_source(source)
        return None

    def _pair_init(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        scale = np.asarray(self.program.constants[node.inputs[1].name], np.float32)
        zero = np.asarray(self.program.constants[node.inputs[2].name], np.float32) if len(node.inputs) > 2 \
            else np.zeros_like(scale)
        return scale, (-zero * scale).astype(np.float32)

    def _add(self, q: Quantizer, scale: np.ndarray, offset: np.ndarray) -> None:
        self.quantizers[q.key] = q
        self.params["scale"][q.key] = np.asarray(scale, np.float32)
        self.params["offset"][q.key] = np.asarray(offset, np.float32)

    # -- running ---------------------------------------------------------------------------------------
    def _qparams(self, q: Quantizer, ndim: int) -> tuple[Any, Any]:
        p = self.program.params
        g = lsq.grad_factor(q.elements, q.qmax)
        scale = jnp.maximum(lsq.grad_scale(p["scale"][q.key], g), 1e-12)
        offset = lsq.grad_scale(p["offset"][q.key], g) if not q.symmetric else jnp.zeros_like(scale)
        return q.broadcast(scale, ndim), q.broadcast(offset, ndim)

    def _weight_fn(self, q: Quantizer) -> Callable[[list[Any]], list[Any]]:
        fixed = np.asarray(self.qdq_initial(self._float_value(q.value)), np.float32)

        def run(args: list[Any]) -> list[Any]:
            w = self.program.params["weight"].get(q.key, fixed)
            scale, offset = self._qparams(q, np.ndim(fixed))
            out = lsq.fake_quant(w, scale, offset, q.qmin, q.qmax)
            frozen = self.program.frozen.get(q.key)
            if frozen is not None:
                mask, codes = frozen
                out = jnp.where(mask, lsq.fake_quant_frozen(codes, scale, offset, q.qmin, q.qmax), out)
            return [out]

        return run

    def _activation_fn(self, q: Quantizer) -> Callable[[list[Any]], list[Any]]:
        def run(args: list[Any]) -> list[Any]:
            scale, offset = self._qparams(q, 0)
            return [lsq.fake_quant(jnp.asarray(args[0], jnp.float32), scale, offset, q.qmin, q.qmax)]

        return run

    def _bias_fn(self, name: str) -> Callable[[list[Any]], list[Any]]:
        return lambda args: [self.program.params["bias"][name]]

    def forward(self, params: dict, frozen: dict, inputs: list[Any]) -> list[Any]:
        """The graph outputs for positional ``inputs`` under ``params``; ``frozen``: weight key ->
        (mask, codes) of weights held at a code (oscillation control)."""
        self.program.params, self.program.frozen = params, frozen
        try:
            return self.program.run(self.program.constants, inputs)
        finally:
            self.program.params, self.program.frozen = None, {}

    def codes(self, params: dict, key: str) -> Any:
        """A trained weight's integer codes (relative to code 0, held in float) under ``params``."""
        q = self.quantizers[key]
        w = params["weight"][key]
        scale = q.broadcast(params["scale"][key], w.ndim)
        z = lsq.zero_point(scale, q.broadcast(params["offset"][key], w.ndim) if not q.symmetric
                           else jnp.zeros_like(scale), q.qmin, q.qmax)
        return jnp.clip(jnp.rint(w / scale) + z, q.qmin, q.qmax)

    # -- writing back ------------------------------------------------------------------------------------
    def write_back(self, params: dict, frozen: dict) -> None:
        """Learned weights (on their grid), biases, scales and zero points into the float model."""
        found = search_result(self.model)
        for key, q in self.quantizers.items():
            scale = np.maximum(np.asarray(params["scale"][key], np.float32), np.float32(1e-12))
            offset = np.zeros_like(scale) if q.symmetric else np.asarray(params["offset"][key], np.float32)
            zero = np.clip(np.rint(-offset / scale), q.qmin, q.qmax)
            value = self._float_value(q.value)
            set_learned(value, q.qtype, q.symmetric, q.axis, scale, zero)
            if q.is_weight and key in params["weight"]:
                codes = np.asarray(self.codes(params, key))
                if key in frozen:
                    mask, held = frozen[key]
                    codes = np.where(np.asarray(mask), np.asarray(held), codes)
                w = ((codes - q.broadcast(zero, codes.ndim)) * q.broadcast(scale, codes.ndim)).astype(np.float32)
                self._set(value, np.asarray(w), found)
        for name, array in params["bias"].items():
            self._set(self._float_value(name), np.asarray(array, np.float32), found)

    def _set(self, value: ir.Value, array: np.ndarray, found: Any) -> None:
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
        if found is not None:  # the rewrite writes a search's replaced initializers over the model's
            found.weights[value.name] = array

    def _float_value(self, name: str) -> ir.Value:
        graphs = (self.model.graph, *self.model.graph.subgraphs())  # a body node's tensors live in its body
        for g in graphs:
            if name in g.initializers:
                return g.initializers[name]
        for node in self.model.graph.all_nodes():
            for v in node.outputs:
                if v.name == name:
                    return v
        return next(v for g in graphs for v in g.inputs if v.name == name)


class _Program(Program):
    """The backend's interpreter with some nodes replaced by learnable functions of their arguments."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__(model, "simulated")
        self.overrides: dict[int, Callable[[list[Any]], list[Any]]] = {}
        self.params: dict | None = None
        self.frozen: dict = {}

    def _dispatch(self, node: ir.Node, args: list[Any], env: dict[str, Any]) -> list[Any]:
        override = self.overrides.get(id(node))
        if override is not None:
            return override(args)
        return super()._dispatch(node, args, env)


def _identity(args: list[Any]) -> list[Any]:
    return [args[0]]  # the pair's QuantizeLinear already returned the fake-quantized value


def _attr_axis(node: ir.Node) -> int:
    attr = node.attributes.get("axis")
    return 1 if attr is None else int(attr.value)
