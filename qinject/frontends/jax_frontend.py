"""The jaxpr frontend: a JAX function and example arguments in, an IR model out.

It knows JAX and nothing downstream. ``jax.make_jaxpr`` traces the function; every equation
becomes a node of the ``jax`` domain whose op_type is the primitive's name, with the primitive and
its parameters kept in the node's ``meta`` (``op_facts.JAX_EQN``) so the JAX backend re-binds it
exactly. The parameter pytree becomes initializers named by their paths (``conv1.weight``,
``layers.0.w``), the other arguments graph inputs named after the function's parameters.

Sub-jaxprs of ``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call`` and ``remat`` are
inlined (their custom derivative rules do not matter to quantization; gradients through the
quantized graph come from the backend's own rules). Control flow (``cond``, ``while``, ``scan``) is
refused with an error naming the primitive.

Layout and dtype changes of parameters (``W.T``, a reshaped bias) are evaluated at trace time, so
a dot_general or convolution reads a constant it can quantize, as it would in an ONNX file.
Quantizable nodes are named after the parameter they read as weight (``fc1`` for ``fc1.weight``),
so one plan addresses the same layers in a JAX function and in its ONNX export.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import onnx_ir as ir
from jax.extend import core as jcore
from onnx_ir.passes.common import NameFixPass

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import UnsupportedModelError

# The default-domain opset of traced models: int4 and int16 Q/DQ need 21, so no upgrade is needed.
OPSET = 21
# Call-like primitives whose body is inlined, and the parameter holding the body.
INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
CONTROL_FLOW = frozenset({"cond", "while", "scan"})
# Evaluated at trace time when every input is a constant: they only relayout or recast a parameter.
FOLDED_ON_CONSTANTS = frozenset({"transpose", "reshape", "convert_element_type", "squeeze", "expand_dims",
                                 "rev", "copy", "copy_p"})
# Trailing parameter-path parts dropped when a quantizable node is named after its weight.
_WEIGHT_LEAVES = frozenset({"weight", "kernel", "w", "W"})


def trace_jax(fn: Callable, *args: Any, params_argnum: int | None = 0, name: str | None = None) -> ir.Model:
    """Trace ``fn(*args)`` into an IR model.

    Args:
        fn: a JAX-traceable function returning an array or a pytree of arrays.
        *args: example arguments; only their shapes and dtypes matter for inputs, while the
            argument at ``params_argnum`` (a pytree of arrays) supplies the weights' values.
        params_argnum: which argument is the parameter pytree (None: the function has none; arrays
            it closes over still become constants).
        name: the graph's name (default: the function's).

    Raises:
        UnsupportedModelError: for control flow and other primitives the IR cannot hold.
    """
    if params_argnum is not None and not 0 <= params_argnum < len(args):
        raise UnsupportedModelError(f"params_argnum={params_argnum} but {_name(fn)} got {len(args)} argument(s)")
    closed = jax.make_jaxpr(fn)(*args)
    builder = _Builder(name or _name(fn))
    arg_names = _argument_names(fn, len(args))
    env: dict[Any, ir.Value] = {}
    leaves = [jax.tree_util.tree_flatten_with_path(a)[0] for a in args]
    invars = iter(closed.jaxpr.invars)
    for i, arg_leaves in enumerate(leaves):
        for path, leaf in arg_leaves:
            var = next(invars)
            label = _path_name(arg_names[i], path, params=i == params_argnum)
            if i == params_argnum:
                env[var] = builder.constant(label, np.asarray(leaf), parameter=True)
            else:
                env[var] = builder.graph_input(label, var.aval)
    for var, const in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = builder.constant("const", np.asarray(const))
    builder.emit(closed.jaxpr, env)
    outputs = [builder.read(env, v) for v in closed.jaxpr.outvars]
    builder.set_outputs(outputs)
    return builder.finish()


class _Builder:
    def __init__(self, name: str) -> None:
        self.graph = ir.Graph([], [], nodes=[], name=name,
                              opset_imports={"": OPSET, op_facts.JAX: 1})
        self.names: set[str] = set()
        self.counter = itertools.count()
        self.origin: dict[str, str] = {}  # folded constant -> the parameter it came from
        self.parameters: set[str] = set()
        self.literals: dict[tuple, ir.Value] = {}

    # -- values --------------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        return qir.fresh_name(base, self.names)

    def graph_input(self, label: str, aval: Any) -> ir.Value:
        value = ir.Value(name=self.unique(label), shape=ir.Shape(aval.shape), type=_tensor_type(aval.dtype))
        self.graph.inputs.append(value)
        return value

    def constant(self, label: str, array: np.ndarray, parameter: bool = False, origin: str | None = None
                 ) -> ir.Value:
        # np.ascontiguousarray makes a rank-0 literal rank 1, which changes broadcasting.
        value = qir.add_initializer(self.graph, self.unique(label), np.require(array, requirements="C"))
        self.names.add(value.name)
        if parameter:
            self.parameters.add(value.name)
        if origin is not None:
            self.origin[value.name] = origin
        return value

    def read(self, env: dict, atom: Any) -> ir.Value:
        if isinstance(atom, jcore.Literal):
            array = np.asarray(atom.val, dtype=atom.aval.dtype)
            key = (array.dtype.str, array.shape, array.tobytes())
            if key not in self.literals:
                self.literals[key] = self.constant("literal", array)
            return self.literals[key]
        try:
            return env[atom]
        except KeyError:
            raise UnsupportedModelError(f"jaxpr variable {atom} is read before it is defined") from None

    # -- equations -----------------------------------------------------------------------------------
    def emit(self, jaxpr: Any, env: dict) -> None:
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            if prim in INLINED and INLINED[prim] in eqn.params:
                self.inline(eqn, env)
                continue
            if prim in CONTROL_FLOW:
                raise UnsupportedModelError(
                    f"the function uses control flow ({prim!r}), which qinject cannot quantize yet; "
                    "unroll it (a Python loop, jnp.where for cond) or trace the branch you deploy")
            if eqn.effects:
                raise UnsupportedModelError(f"primitive {prim!r} has side effects ({eqn.effects}); "
                                            "qinject traces pure functions only")
            if any(isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr)) for p in _flat_params(eqn.params)):
                raise UnsupportedModelError(f"primitive {prim!r} carries a sub-jaxpr qinject cannot inline")
            inputs = [self.read(env, v) for v in eqn.invars]
            if prim in FOLDED_ON_CONSTANTS and all(v.const_value is not None for v in inputs):
                self.fold(eqn, inputs, env)
                continue
            self.node(eqn, inputs, env)

    def inline(self, eqn: Any, env: dict) -> None:
        body = eqn.params[INLINED[eqn.primitive.name]]
        jaxpr, consts = (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, [])
        inner = {}
        for var, const in zip(jaxpr.constvars, consts):
            inner[var] = self.constant("const", np.asarray(const))
        for var, atom in zip(jaxpr.invars, eqn.invars):
            inner[var] = self.read(env, atom)
        self.emit(jaxpr, inner)
        for outer, inner_out in zip(eqn.outvars, jaxpr.outvars):
            env[outer] = self.read(inner, inner_out)

    def fold(self, eqn: Any, inputs: list[ir.Value], env: dict) -> None:
        arrays = [v.const_value.numpy() for v in inputs]
        outs = eqn.primitive.bind(*arrays, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        source = self.origin.get(inputs[0].name, inputs[0].name)
        for var, out in zip(eqn.outvars, outs):
            suffix = ".T" if eqn.primitive.name == "transpose" else f".{eqn.primitive.name}"
            env[var] = self.constant(f"{inputs[0].name}{suffix}", np.asarray(out), origin=source)

    def node(self, eqn: Any, inputs: list[ir.Value], env: dict) -> None:
        prim = eqn.primitive.name
        outputs = [ir.Value(shape=ir.Shape(v.aval.shape), type=_tensor_type(v.aval.dtype)) for v in eqn.outvars]
        node = ir.Node(op_facts.JAX, prim, inputs, {"params": ir.AttrString("params", _describe(eqn.params))},
                       outputs=outputs, name=f"{prim}_{next(self.counter)}")
        node.meta[op_facts.JAX_EQN] = op_facts.JaxEqn(eqn.primitive, dict(eqn.params))
        self.graph.append(node)
        for var, value in zip(eqn.outvars, outputs):
            env[var] = value

    # -- finishing -----------------------------------------------------------------------------------
    def set_outputs(self, values: Sequence[ir.Value]) -> None:
        single = len(values) == 1
        for i, value in enumerate(values):
            label = "output" if single else f"output_{i}"
            if value.producer() is None or value.is_graph_output():
                # A graph output must be produced by a node of its own (an input passed through,
                # a constant, or a value returned twice).
                copy = ir.node("Identity", [value], name=f"identity_{label}")
                copy.outputs[0].shape, copy.outputs[0].type = value.shape, value.type
                self.graph.append(copy)
                value = copy.outputs[0]
            value.name = self.unique(label)
            self.graph.outputs.append(value)

    def finish(self) -> ir.Model:
        model = ir.Model(self.graph, ir_version=10, producer_name="qinject-jax-frontend")
        self.name_nodes(model)
        qir.drop_unused_initializers(self.graph)
        NameFixPass()(model)
        return model

    def name_nodes(self, model: ir.Model) -> None:
        """Quantizable nodes take their weight parameter's name; every output value its node's."""
        taken = {v.name for v in self.graph.inputs} | set(self.graph.initializers) | {
            v.name for v in self.graph.outputs}
        used: set[str] = set()
        for node in self.graph:
            base = node.name
            weight = op_facts.weight_of(node) if op_facts.is_quantizable(node) else None
            if weight is not None:
                base = _layer_name(self.origin.get(weight.name, weight.name))
            name, i = base, 1
            while name in used or name in taken:
                name, i = f"{base}_{i}", i + 1
            node.name = name
            used.add(name)
        for node in self.graph:
            for i, out in enumerate(node.outputs):
                if not out.is_graph_output():
                    name = node.name if len(node.outputs) == 1 else f"{node.name}:{i}"
                    while name in taken:
                        name += "_"
                    out.name = name
                    taken.add(name)


def _layer_name(param: str) -> str:
    parts = param.split(".")
    return ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] in _WEIGHT_LEAVES else param


def _tensor_type(dtype: Any) -> ir.TensorType:
    try:
        return ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"dtype {dtype} has no ONNX equivalent") from None


def _argument_names(fn: Callable, count: int) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"arg{i}" for i in range(count)]


def _path_name(arg: str, path: tuple, params: bool) -> str:
    """``conv1.weight`` for params['conv1.weight'], ``x`` for an array argument x, ``x.ids`` for x['ids']."""
    parts = [_key(k) for k in path]
    if params:
        return ".".join(parts) or arg
    return ".".join([arg, *parts])


def _key(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return re.sub(r"\W+", "", str(k))


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _flat_params(params: dict) -> list:
    out = []
    for v in params.values():
        out.extend(v if isinstance(v, (tuple, list)) else [v])
    return out


def _describe(params: dict) -> str:
    """A readable summary of an equation's parameters, for IR dumps (the backend reads ``meta``)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if v is not None and "sharding" not in k)
