"""ONNX If, Loop and Scan in the JAX backend: their bodies run by the same interpreter, in the same mode.

A body is an IR graph whose nodes may read outer-scope values by name; the interpreter runs it with
``run_body(graph, outer_env, inputs)`` (``Program.run_body``), so body nodes see every value of the
enclosing scopes, are quantized as the rewrite wrote them and use the same integer kernels.

What is known at trace time decides the lowering, so that the common cases stay differentiable:

- If: a condition known at trace time (a constant, a scalar input bound as a constant) takes its
  branch; a traced one becomes ``jax.lax.cond``, whose branches must return the same shapes and
  dtypes (else a one-line error naming the node).
- Loop: a trip count and first condition known at trace time run as ``jax.lax.scan`` over the
  iterations when the body keeps its condition true without computing it (PyTorch's ``for`` loops),
  and otherwise unrolled while each iteration's condition is known at trace time (a counter
  compared with a constant: PyTorch's dynamo ``while`` loops); both are reverse-differentiable and
  jittable, and scan outputs are the per-iteration values stacked. A trip count or condition that
  depends on the data becomes ``jax.lax.while_loop``: forward only (JAX cannot reverse-differentiate
  it), without scan outputs (their length would be data-dependent), and its node is recorded in
  ``forward_only`` so that training refuses it in one line.
- Scan (opset 9 and later): ``jax.lax.scan`` over the scanned axis, directions and axes as ONNX says.

When nothing a body reads is traced (eager runs on concrete arrays) a Loop or Scan is simply iterated
in Python: the values each node sees stay concrete (calibration hooks record them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir

from qinject.backends.jax_ops import attr, opset
from qinject.core import ir as qir
from qinject.core.errors import UnsupportedModelError

BodyRunner = Callable[[ir.Graph, dict[str, Any], Sequence[Any]], list[Any]]
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


class _NotStatic(Exception):
    """A Loop body computed its condition from traced values: lax.scan cannot stop early."""


def run(node: ir.Node, args: list[Any], env: dict[str, Any], run_body: BodyRunner,
        forward_only: list[str]) -> list[Any]:
    """The outputs of an If, Loop or Scan ``node``; ``forward_only`` collects the names of Loops lowered
    to ``lax.while_loop``."""
    if node.op_type == "If":
        return _if(node, args, env, run_body)
    if node.op_type == "Loop":
        return _loop(node, args, env, run_body, forward_only)
    return _scan(node, args, env, run_body)


def outer_reads(graph: ir.Graph) -> set[str]:
    """Names a body (and the bodies nested in it) reads from enclosing scopes."""
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    reads: set[str] = set()
    for node in graph:
        reads.update(v.name for v in node.inputs if v is not None and v.name not in defined)
        for body in qir.bodies(node):
            reads.update(outer_reads(body) - defined)
        defined.update(v.name for v in node.outputs)
    return reads


def _traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _concrete(graph: ir.Graph, env: dict[str, Any], values: Sequence[Any]) -> bool:
    return not any(_traced(v) for v in values) and not any(_traced(env.get(n)) for n in outer_reads(graph))


def _truth(x: Any) -> bool:
    return bool(np.asarray(x).reshape(-1)[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- If --------------------------------------------------------------------------------------------------
def _if(node: ir.Node, args: list[Any], env: dict[str, Any], run_body: BodyRunner) -> list[Any]:
    then_g, else_g = node.attributes["then_branch"].value, node.attributes["else_branch"].value
    cond = args[0]
    if not _traced(cond):
        return run_body(then_g if _truth(cond) else else_g, env, [])
    pred = jnp.reshape(cond, (-1,))[0].astype(bool)
    try:
        return list(jax.lax.cond(pred, lambda: tuple(run_body(then_g, env, [])),
                                 lambda: tuple(run_body(else_g, env, []))))
    except TypeError as exc:
        raise UnsupportedModelError(
            f"If node {node.name!r}: its branches return different shapes or dtypes ({_first_line(exc)}); under a "
            "condition computed at run time JAX needs equal ones: bind the condition's input to a constant") from None


# -- Loop ------------------------------------------------------------------------------------------------
def _loop(node: ir.Node, args: list[Any], env: dict[str, Any], run_body: BodyRunner,
          forward_only: list[str]) -> list[Any]:
    body = node.attributes["body"].value
    trip = args[0] if args else None
    cond = args[1] if len(args) > 1 else None
    states = list(args[2:])
    n_scan = len(body.outputs) - 1 - len(states)
    if _traced(trip) or _traced(cond):
        return _while(node, body, env, run_body, trip, cond, 0, states, n_scan, forward_only)
    limit = None if trip is None else int(np.asarray(trip).reshape(-1)[0])
    if cond is not None and not _truth(cond) or limit == 0:
        return states + [_empty_scan_output(node, body, i) for i in range(n_scan)]
    if limit is not None and not _concrete(body, env, states):
        try:
            return _loop_scan(node, body, env, run_body, limit, states, n_scan)
        except (_NotStatic, UnsupportedModelError):
            pass  # a condition or shape computed in the body: unrolled, where it is known at each step
    return _unrolled(node, body, env, run_body, limit, states, n_scan, forward_only)


def _loop_scan(node: ir.Node, body: ir.Graph, env: dict[str, Any], run_body: BodyRunner, limit: int,
               states: list[Any], n_scan: int) -> list[Any]:
    init = tuple(jnp.asarray(s) for s in states)

    def step(carry: tuple, i: Any) -> tuple[tuple, tuple]:
        outs = run_body(body, env, [i, np.asarray(True), *carry])
        if _traced(outs[0]) or not _truth(outs[0]):
            raise _NotStatic
        new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outs[1:1 + len(carry)], carry))
        return new, tuple(outs[1 + len(carry):])

    try:
        final, stacked = jax.lax.scan(step, init, jnp.arange(limit))
    except TypeError as exc:
        raise UnsupportedModelError(f"Loop node {node.name!r}: a loop-carried value changes shape or dtype across "
                                    f"iterations ({_first_line(exc)}); JAX traces loops with fixed shapes") from None
    return list(final) + list(stacked)


def _unrolled(node: ir.Node, body: ir.Graph, env: dict[str, Any], run_body: BodyRunner, limit: int | None,
              states: list[Any], n_scan: int, forward_only: list[str]) -> list[Any]:
    scans: list[list[Any]] = [[] for _ in range(n_scan)]
    i, go = 0, np.asarray(True)
    while limit is None or i < limit:
        outs = run_body(body, env, [np.asarray(i, np.int64), go, *states])
        states = list(outs[1:1 + len(states)])
        for part, value in zip(scans, outs[1 + len(states):]):
            part.append(value)
        i, go = i + 1, outs[0]
        if _traced(go):  # from here on the condition is data: the rest runs as a while loop
            if n_scan:
                raise _data_dependent_scan_outputs(node)
            return _while(node, body, env, run_body, None if limit is None else np.asarray(limit), go, i, states,
                          0, forward_only)
        if not _truth(go):
            break
    stacked = [(jnp.stack(part) if any(_traced(p) or isinstance(p, jax.Array) for p in part) else np.stack(part))
               if part else _empty_scan_output(node, body, k) for k, part in enumerate(scans)]
    return states + stacked


def _while(node: ir.Node, body: ir.Graph, env: dict[str, Any], run_body: BodyRunner, trip: Any, cond: Any,
           start: int, states: list[Any], n_scan: int, forward_only: list[str]) -> list[Any]:
    """The Loop as ``lax.while_loop`` from iteration ``start``: forward only, no scan outputs."""
    if n_scan:
        raise _data_dependent_scan_outputs(node)
    forward_only.append(node.name)
    if trip is not None and not _traced(trip) and int(np.asarray(trip).reshape(-1)[0]) > np.iinfo(np.int32).max:
        trip = None  # "no limit", as exporters write a while loop's trip count
    go = jnp.asarray(True) if cond is None else jnp.reshape(jnp.asarray(cond), (-1,))[0].astype(bool)
    init = (jnp.asarray(start), go, tuple(jnp.asarray(s) for s in states))

    def keep_going(carry: tuple) -> Any:
        i, go, _ = carry
        return go if trip is None else go & (i < jnp.reshape(jnp.asarray(trip), (-1,))[0])

    def step(carry: tuple) -> tuple:
        i, go, values = carry
        outs = run_body(body, env, [i, go, *values])
        new = tuple(jnp.asarray(o).astype(v.dtype) for o, v in zip(outs[1:], values))
        return i + 1, jnp.reshape(jnp.asarray(outs[0]), (-1,))[0].astype(bool), new

    try:
        return list(jax.lax.while_loop(keep_going, step, init)[2])
    except TypeError as exc:
        raise UnsupportedModelError(f"Loop node {node.name!r}: a loop-carried value changes shape or dtype across "
                                    f"iterations ({_first_line(exc)}); JAX traces loops with fixed shapes") from None


def _data_dependent_scan_outputs(node: ir.Node) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Loop node {node.name!r} has scan outputs and a trip count or condition computed at run time: their "
        "length is not known when JAX traces it; bind the trip count's input to a constant")


def _empty_scan_output(node: ir.Node, body: ir.Graph, k: int) -> np.ndarray:
    value = body.outputs[1 + len(body.inputs) - 2 + k]
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape) or value.dtype is None:
        raise UnsupportedModelError(f"Loop node {node.name!r} ran no iteration and the shape of its scan output "
                                    f"{value.name!r} is not declared; JAX needs it")
    return np.zeros((0, *shape), value.dtype.numpy())


# -- Scan ------------------------------------------------------------------------------------------------
def _scan(node: ir.Node, args: list[Any], env: dict[str, Any], run_body: BodyRunner) -> list[Any]:
    if opset(node) < 9:
        raise UnsupportedModelError(f"Scan node {node.name!r} is opset {opset(node)} (batched Scan with sequence "
                                    "lengths); the JAX backend runs Scan from opset 9: run upgrade-opset first")
    body = node.attributes["body"].value
    n_in = attr(node, "num_scan_inputs")
    states, seqs = list(args[:len(args) - n_in]), list(args[len(args) - n_in:])
    n_out = len(body.outputs) - len(states)
    in_axes = attr(node, "scan_input_axes", [0] * n_in)
    in_dirs = attr(node, "scan_input_directions", [0] * n_in)
    out_axes = attr(node, "scan_output_axes", [0] * n_out)
    out_dirs = attr(node, "scan_output_directions", [0] * n_out)
    xp = np if _concrete(body, env, states + seqs) else jnp
    xs = []
    for x, axis, reverse in zip(seqs, in_axes, in_dirs):
        x = xp.moveaxis(xp.asarray(x), axis % np.ndim(x), 0)
        xs.append(x[::-1] if reverse else x)
    if xp is np:  # concrete: iterated in Python, every value stays concrete
        ys: list[list[Any]] = [[] for _ in range(n_out)]
        for t in range(xs[0].shape[0] if xs else 0):
            outs = run_body(body, env, [*states, *(x[t] for x in xs)])
            states = list(outs[:len(states)])
            for part, y in zip(ys, outs[len(states):]):
                part.append(y)
        stacked = [np.stack([np.asarray(y) for y in part]) for part in ys]
    else:
        def step(carry: tuple, sl: tuple) -> tuple[tuple, tuple]:
            outs = run_body(body, env, [*carry, *sl])
            new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outs[:len(carry)], carry))
            return new, tuple(outs[len(carry):])

        try:
            final, stacked = jax.lax.scan(step, tuple(jnp.asarray(s) for s in states), tuple(xs))
        except TypeError as exc:
            raise UnsupportedModelError(f"Scan node {node.name!r}: a state changes shape or dtype across iterations "
                                        f"({_first_line(exc)}); JAX traces loops with fixed shapes") from None
        states, stacked = list(final), list(stacked)
    out = []
    for y, axis, reverse in zip(stacked, out_axes, out_dirs):
        y = y[::-1] if reverse else y
        out.append(xp.moveaxis(y, 0, axis % np.ndim(y)))
    return states + out
