"""A standard op made quantizable by a plugin: ONNX ``Einsum`` of an activation and a constant weight.

It takes what any new quantizable op takes: one op-facts entry (``FACTS``, through the
``qinject.op_facts`` entry point) and how it runs in JAX. The JAX backend already runs Einsum in float
and simulated mode (``qinject.backends.jax_ops``); the entry's ``integer_kernel`` names the builder
below, which maps a two-operand einsum onto an int8 ``dot_general`` (registered when the compiler
loads this module for its facts). Equations a dot cannot express (ellipses, traces, a letter summed
within one operand) run in float on dequantized operands instead.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from qinject.backends import jax_integer
from qinject.core.op_facts import OpFact


def _letters(node: ir.Node) -> tuple[str, str, str] | None:
    """(activation letters, weight letters, output letters), or None for equations a dot cannot run."""
    equation = node.attributes["equation"].value.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    a, b = operands
    if any(len(set(s)) != len(s) for s in (a, b, out)) or set(out) - set(a) - set(b):
        return None
    if (set(a) ^ set(b)) - set(out):  # a letter of one operand alone summed away: not a dot
        return None
    return a, b, out


def _channel_axis(node: ir.Node) -> int | None:
    """The weight's last letter that reaches the output and is not the activation's: an output channel."""
    letters = _letters(node)
    if letters is None:
        return None
    a, b, out = letters
    free = [i for i, c in enumerate(b) if c in out and c not in a]
    return free[-1] if free else None


def _macs(node: ir.Node) -> int | None:
    letters = _letters(node)
    shapes = [v.shape for v in node.inputs]
    if letters is None or any(s is None or not all(isinstance(d, int) for d in s) for s in shapes):
        return None
    size = {c: d for s, dims in zip(letters[:2], shapes) for c, d in zip(s, dims)}
    return math.prod(size.values())  # one product per combination of every letter


@jax_integer.integer_kernel("demo-einsum")
def einsum_kernel(node: ir.Node, lhs: jax_integer.Operand, rhs: jax_integer.Operand) -> jax_integer.Kernel | None:
    """The einsum as dot_general(a, b) (contracting the shared letters the output lacks, batching those it
    keeps), its result transposed to the equation's output order."""
    letters = _letters(node)
    if letters is None:
        return None
    a, b, out = letters
    contract = [c for c in a if c in b and c not in out]
    batch = [c for c in a if c in b and c in out]
    dims = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    produced = batch + [c for c in a if c not in b] + [c for c in b if c not in a]  # dot_general's order
    perms = (tuple(range(len(a))), tuple(range(len(b))), tuple(produced.index(c) for c in out))
    return jax_integer.dot_kernel(node, lhs, rhs, dims, perms=perms)


FACTS = {("", "Einsum"): OpFact(quantizable=True, activation_inputs=(0,), weight_input=1, channel_axis=_channel_axis,
                                macs=_macs, integer_kernel="demo-einsum")}
