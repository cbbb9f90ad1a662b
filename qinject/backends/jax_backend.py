"""The JAX backend: an IR graph in, a Python callable that ``jax.jit`` accepts out.

The graph is interpreted node by node at trace time, so under ``jax.jit`` the result is one XLA
program: ``jax``-domain nodes re-bind their primitive with the recorded parameters; ONNX nodes go
through the op table (``qinject.backends.jax_ops``); QuantizeLinear/DequantizeLinear go through the
numerics module shared with the ONNX path. Two modes:

- ``simulated``: quantize-dequantize in float. Quantization codes are held in float32 and rounded
  with a straight-through estimator (identity gradient inside the clipping range, zero outside), so
  ``jax.grad`` works through a quantized graph.
- ``integer``: QuantizeLinear produces real int8/uint8 arrays, and every quantized dot or
  convolution whose operands are 8-bit (or 4-bit weights) runs as an int8 x int8 -> int32
  ``dot_general`` / ``conv_general_dilated`` followed by one rescale (``qinject.backends.jax_integer``).
  Other nodes run as in simulated mode.

The plan's execution modes (``qinject.plan``) are shapes of the rewritten graph, run the same way
(``qinject.backends.jax_modes`` checks each node's applied mode against its graph first):

- dynamic: DynamicQuantizeLinear computes uint8 codes, scale and zero point from the tensor's own
  range inside the program, per call; simulated holds the codes in float, integer mode runs the
  dot on int8 (a DequantizeLinear-fed dot through ``jax_integer``, or MatMulInteger) and rescales
  by the run-time scale.
- weight-only: a block-wise DequantizeLinear of int4/int8 weight codes. Simulated mode folds it into
  a float constant at trace time (fake-quantized weight); integer mode keeps the codes and block
  scales in the program and dequantizes there, then runs the float op.

If, Loop and Scan run their bodies through this interpreter, in the same mode
(``qinject.backends.jax_control_flow``: a known branch or ``lax.cond``, ``lax.scan`` or an unrolled loop,
and ``lax.while_loop`` only for a data-dependent loop, which has no reverse-mode gradient).

A node whose inputs are all concrete (weights, shapes) is evaluated once at trace time
(``jax.ensure_compile_time_eval``), so shape arithmetic stays static under ``jit`` and dequantized
weights become constants of the compiled program (except integer mode's weight-only weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir

from qinject.backends import (
    jax_control_flow,
    jax_integer,
    jax_modes,
    jax_ops_nn,  # noqa: F401  (registers the neural-network ops into ONNX_OPS)
    jax_ops_rnn,  # noqa: F401  (registers LSTM into ONNX_OPS, DynamicQuantizeLSTM into CONTRIB_OPS)
)
from qinject.backends.jax_ops import CONTRIB_OPS, ONNX_OPS, attr
from qinject.backends.jax_qdq import dynamic_quantize, expand_blocks, param_axis, qparams
from qinject.core import numerics, op_facts
from qinject.core.errors import UnsupportedModelError

MODES = ("simulated", "integer")
_ONNX_DOMAINS = ("", "ai.onnx")


@jax.custom_jvp
def _rint_ste(x: jax.Array) -> jax.Array:
    """Round half to even, with the straight-through gradient 1."""
    return jnp.rint(x)


_rint_ste.defjvp(lambda primals, tangents: (jnp.rint(primals[0]), tangents[0]))


def to_jax(model: ir.Model, mode: str = "simulated") -> Callable[..., Any]:
    """A jittable ``fn(*inputs)`` computing the graph, its weights closed over as constants.

    Inputs are positional, in the order of the graph's inputs; a single output is returned as an
    array, several as a tuple.
    """
    program = Program(model, mode)
    weights = program.constants

    def fn(*inputs: Any) -> Any:
        outs = program.run(weights, inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    fn.__name__ = f"{model.graph.name or 'graph'}_{mode}"
    return fn


def to_jax_with_weights(model: ir.Model, mode: str = "simulated"
                        ) -> tuple[Callable[..., Any], dict[str, np.ndarray]]:
    """``(fn(weights, *inputs), weights)``: the float initializers as an argument, for ``jax.grad``
    with respect to them (Hessians of later passes). Integer initializers stay closed over."""
    program = Program(model, mode)
    floats = {k: v for k, v in program.constants.items() if np.asarray(v).dtype.kind == "f"}
    fixed = {k: v for k, v in program.constants.items() if k not in floats}

    def fn(weights: dict[str, Any], *inputs: Any) -> Any:
        outs = program.run({**fixed, **weights}, inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return fn, floats


class Program:
    """A graph prepared for interpretation: nodes in order, constants as numpy arrays."""

    def __init__(self, model: ir.Model, mode: str = "simulated") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown JAX backend mode {mode!r} (expected one of {', '.join(MODES)})")
        self.model, self.mode, self.graph = model, mode, model.graph
        self.inputs = [v.name for v in self.graph.inputs]
        self.outputs = list(self.graph.outputs)
        # Bodies' own initializers too: they are read by name like the main graph's (``run_body``).
        self.constants = {name: v.const_value.numpy() for g in (self.graph, *self.graph.subgraphs())
                          for name, v in g.initializers.items() if v.const_value is not None}
        self.nodes = list(self.graph)
        every = list(self.graph.all_nodes())  # with those of If/Loop/Scan bodies, at any depth
        missing = sorted({n.op_type for n in every if n.domain in _ONNX_DOMAINS and n.op_type not in ONNX_OPS
                          and n.op_type not in _BUILTIN and n.op_type not in jax_control_flow.CONTROL_FLOW_OPS})
        if missing:
            raise UnsupportedModelError(f"the JAX backend has no lowering for ONNX op(s) {missing}")
        other = sorted({f"{n.domain}::{n.op_type}" for n in every
                        if n.domain not in (*_ONNX_DOMAINS, op_facts.JAX)
                        and (n.domain, n.op_type) not in CONTRIB_OPS})
        if other:
            raise UnsupportedModelError(f"the JAX backend has no lowering for op(s) {other} of other domains")
        for node in every:
            jax_modes.check(node)
        self.kernels = {}  # node name -> its integer kernel (integer mode)
        self.run_time_dequantize: set[int] = set()  # ids of weight-only DequantizeLinear nodes (integer mode)
        # Loops the last trace lowered to lax.while_loop (a data-dependent trip count or condition): no
        # reverse-mode gradient through them (qinject.backends.jax_control_flow).
        self.forward_only: list[str] = []
        if mode == "integer":
            self.kernels = {n.name: k for n in every if (k := jax_integer.plan_for(n)) is not None}
            self.run_time_dequantize = {id(n) for n in every if jax_modes.dequantizes_at_run_time(n)}

    def run(self, constants: dict[str, Any], inputs: Sequence[Any], fetch: Sequence[str] = ()) -> list[Any]:
        """Compute the graph outputs (then the values named in ``fetch``) for positional ``inputs``."""
        if len(inputs) != len(self.inputs):
            raise TypeError(f"the graph takes {len(self.inputs)} input(s) {self.inputs}, got {len(inputs)}")
        env: dict[str, Any] = dict(constants)
        for value, array in zip(self.graph.inputs, inputs):
            _check_shape(value, array)
            env[value.name] = array
        self.forward_only = []
        self._execute(self.nodes, env)
        results = [_as_declared(env[v.name], v) for v in self.outputs]
        return results + [env[name] for name in fetch]

    def run_body(self, graph: ir.Graph, outer: dict[str, Any], inputs: Sequence[Any]) -> list[Any]:
        """The outputs of an If/Loop/Scan body for its positional ``inputs``; its nodes read the values of
        the enclosing scopes (``outer``) by name, as ONNX bodies do."""
        env = dict(outer)
        for value, array in zip(graph.inputs, inputs):
            env[value.name] = array
        self._execute(list(graph), env)
        return [env[v.name] for v in graph.outputs]

    def _execute(self, nodes: list[ir.Node], env: dict[str, Any]) -> None:
        for node in nodes:
            args = [None if v is None else env[v.name] for v in node.inputs]
            outs = self._evaluate(node, args, env)
            for value, out in zip(node.outputs, outs):
                env[value.name] = out

    # -- nodes -----------------------------------------------------------------------------------------
    def _evaluate(self, node: ir.Node, args: list[Any], env: dict[str, Any]) -> list[Any]:
        if node.op_type in jax_control_flow.CONTROL_FLOW_OPS and node.domain in _ONNX_DOMAINS:
            # Not evaluated whole at trace time: its bodies may read traced outer values; their
            # nodes are, one by one, where their own inputs are concrete.
            return jax_control_flow.run(node, args, env, self.run_body, self.forward_only)
        if all(not isinstance(a, jax.core.Tracer) for a in args) and id(node) not in self.run_time_dequantize:
            with jax.ensure_compile_time_eval():
                return self._dispatch(node, args, env)
        return self._dispatch(node, args, env)

    def _dispatch(self, node: ir.Node, args: list[Any], env: dict[str, Any]) -> list[Any]:
        kernel = self.kernels.get(node.name)
        if kernel is not None:
            return [jax_integer.run(kernel, node, args, env, self.constants)]
        if node.domain == op_facts.JAX:
            eqn = node.meta.get(op_facts.JAX_EQN)
            if eqn is None:
                raise UnsupportedModelError(f"jax node {node.name!r} ({node.op_type}) has lost its equation; "
                                            "it cannot be re-bound")
            out = eqn.primitive.bind(*args, **eqn.params)
            return list(out) if eqn.primitive.multiple_results else [out]
        contrib = CONTRIB_OPS.get((node.domain, node.op_type))
        if contrib is not None:
            out = contrib(node, *args)
            return list(out) if isinstance(out, (tuple, list)) else [out]
        builtin = _BUILTIN.get(node.op_type) if node.domain in _ONNX_DOMAINS else None
        if builtin is not None:
            out = builtin(self, node, args)
            return list(out) if isinstance(out, tuple) else [out]
        out = ONNX_OPS[node.op_type](node, *args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def _quantize(self, node: ir.Node, args: list[Any]) -> Any:
        q = qparams(node, self.constants)
        scale, zero, axis = _per_element(q.scale, q.zero_point, q.axis, q.block_size, np.shape(args[0]))
        if self.mode == "integer":
            return numerics.quantize(args[0], scale, zero, q.qtype, axis, xp=jnp)
        # Codes held in float32 so gradients can flow (straight-through rounding).
        return numerics.quantize_codes(args[0], scale, zero, q.qtype, axis, xp=jnp, rint=_rint_ste)

    def _dequantize(self, node: ir.Node, args: list[Any]) -> Any:
        # Scale and zero point from the arguments: constants, or values of the program where
        # DynamicQuantizeLinear computed them.
        codes, scale = jnp.asarray(args[0]), args[1]
        zero = args[2] if len(args) > 2 and args[2] is not None else np.zeros((), np.uint8)
        axis = param_axis(node, np.ndim(scale), np.size(scale))
        scale, zero, axis = _per_element(scale, zero, axis, attr(node, "block_size", 0), codes.shape)
        return numerics.dequantize(codes, scale, zero, axis, xp=jnp)

    def _dynamic_quantize(self, node: ir.Node, args: list[Any]) -> tuple[Any, Any, Any]:
        if self.mode == "integer":
            codes, scale, zero = dynamic_quantize(args[0], xp=jnp)
            return codes.astype(jnp.uint8), scale, zero.astype(jnp.uint8)
        # Codes and zero point held in float32 so gradients can flow (straight-through rounding).
        return dynamic_quantize(args[0], xp=jnp, rint=_rint_ste)

    def _constant(self, node: ir.Node, args: list[Any]) -> Any:
        value = node.attributes.get("value")
        if value is not None:
            return value.value.numpy()
        for key in ("value_float", "value_int"):
            if key in node.attributes:
                return np.asarray(attr(node, key), np.float32 if key == "value_float" else np.int64)
        for key in ("value_floats", "value_ints"):
            if key in node.attributes:
                return np.asarray(attr(node, key), np.float32 if key == "value_floats" else np.int64)
        raise UnsupportedModelError(f"Constant node {node.name!r} has no supported value attribute")


_BUILTIN: dict[str, Callable[[Program, ir.Node, list[Any]], Any]] = {
    "QuantizeLinear": Program._quantize,
    "DequantizeLinear": Program._dequantize,
    "DynamicQuantizeLinear": Program._dynamic_quantize,
    "Constant": Program._constant,
}


def _per_element(scale: Any, zero: Any, axis: int | None, block_size: int,
                 shape: tuple[int, ...]) -> tuple[Any, Any, int | None]:
    """Block-wise scale and zero point repeated to the quantized tensor's shape (then applied
    elementwise, axis None); per-tensor and per-axis parameters unchanged. Repeated with jax.numpy,
    so a program that dequantizes at run time holds the block scales, not one scale per weight."""
    if not block_size or axis is None:
        return scale, zero, axis
    length = shape[axis]
    zero = jnp.broadcast_to(jnp.asarray(zero), np.shape(scale))  # an omitted zero point is one scalar 0
    return (expand_blocks(scale, axis, block_size, length, xp=jnp),
            expand_blocks(zero, axis, block_size, length, xp=jnp), None)


def _check_shape(value: ir.Value, array: Any) -> None:
    if value.shape is None:
        return
    want = [d if isinstance(d, int) else None for d in value.shape]
    got = list(np.shape(array))
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        raise UnsupportedModelError(f"graph input {value.name!r} expects shape {value.shape}, got {tuple(got)}"
                                    " (a traced JAX graph is specialised to its example shapes)")


def _as_declared(array: Any, value: ir.Value) -> Any:
    """Simulated-mode codes are float; an integer-typed graph output gets its declared dtype."""
    if value.dtype is None:
        return array
    want = value.dtype.numpy()
    return array.astype(want) if np.dtype(want).kind in "iub" and jnp.asarray(array).dtype != want else array
