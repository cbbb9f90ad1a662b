"""AdaRound (Nagel et al., 2020): learn whether each low-bit weight rounds up or down.

Round-to-nearest is optimal per weight but not for the layer's output. AdaRound keeps each weight's
grid cell (``floor(W / s)``) and learns the rounding ``h(V) ∈ [0, 1]``, a rectified sigmoid
``clip(sigmoid(V)·(ζ − γ) + γ, 0, 1)`` with ζ = 1.1, γ = −0.1, minimising, layer by layer on
calibration data (through the JAX backend), the layer-output reconstruction error plus a regulariser
``λ Σ 1 − |2h − 1|^β`` that pushes every h to 0 or 1 as β is annealed from 20 to 2 (after a warm-up
of 20% of the iterations without it). The result is hard rounding: codes ``floor(W / s) + [h ≥ ½]``.

The rewrite writes each rounded weight back as float values that lie exactly on the quantization
grid (``(codes − z) · s``), with each channel's smallest and largest weight keeping their nearest
codes, so the channel's range, hence its scale and zero point, is unchanged and the Q/DQ rewrite at
the same width reproduces exactly the learned codes. The grid is that of ``InsertQDQ`` (min/max of
the weight, per channel or per tensor as the plan says, symmetric or not). The float weight it
replaced stays in the node's meta (``FLOAT_WEIGHT``): bias correction measures the shift of the
rounded weight against it.

Which nodes (``rounding_nodes``, shared with bias correction): those the plan runs in ``static``
mode with per-channel weights of at most ``max_bits`` (4) bits or per-tensor weights of at most
``per_tensor_max_bits`` (8) bits. A per-tensor scale is set by the widest channel, so at 8 bits the
narrow channels get as few codes as at 4 bits per channel, and rounding them well pays. ``dynamic``
and ``weight-only`` nodes are left alone with a note: the learned codes are codes of the static
grid, and a weight-only node's blocks along the reduction axis each have their own scale, so the
codes would not survive its rewrite. When none of the plan's weighted nodes qualifies, the pass
refuses (the flag would change nothing), unless a search chose the plan: its widths are the search's.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from qinject.passes.sensitivity.base import AnalysisData
from tqdm.auto import tqdm

from qinject.backends.jax_backend import Program
from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.core.search_result import chosen_plan, search_result
from qinject.runtime.layer_data import layer_inputs, node_function

ZETA, GAMMA = 1.1, -0.1
NOTES = "qinject.adaround.notes"
APPLIED = "qinject.adaround.applied"  # node meta: (bits, reconstruction MSE before, after)
FLOAT_WEIGHT = "qinject.adaround.float_weight"  # node meta: the float weight the rounded one replaced


class AdaRound(Pass):
    """Replace the weights of the plan's low-bit static nodes by AdaRound-rounded grid values.

    Options:
        data: calibration inputs (as ``qinject.analyze`` takes them).
        plan: the plan (None: the search result in the model's meta).
        max_bits: per-channel weights of at most this many bits are rounded (default 4);
        per_tensor_max_bits: per-tensor ones of at most this many (default 8).
        iterations: optimisation steps per layer; batch: samples per step (positions, for a MatMul
            or Gemm over sequences: it acts on each row alone; fewer samples for a convolution whose
            input exceeds ``max_elements`` per step);
        lr: Adam's learning rate; reg: the regulariser's weight λ; samples: calibration samples used.
    """

    name = "adaround"

    def __init__(self, data: object, plan: Plan | None = None, *, max_bits: int = 4,
                 per_tensor_max_bits: int = 8, iterations: int = 500, batch: int = 32, lr: float = 1e-2,
                 reg: float = 0.01, samples: int = 256, seed: int = 0, progress: bool = True,
                 max_elements: int = 1 << 21) -> None:
        self.data, self.plan, self.max_bits, self.iterations = data, plan, max_bits, iterations
        self.per_tensor_max_bits = per_tensor_max_bits
        self.batch, self.lr, self.reg, self.samples, self.seed, self.progress = batch, lr, reg, samples, seed, progress
        self.max_elements = max_elements

    def call(self, model: ir.Model) -> PassResult:
        plan, nodes = rounding_nodes(model, self.plan, self.max_bits, self.per_tensor_max_bits,
                                     "AdaRound (--adaround)", NOTES)
        nodes = [n for n in nodes if _own_weight(n)]
        if not nodes:
            return PassResult(model, False)
        data = AnalysisData.load(self.data, model, self.samples)
        inputs = layer_inputs(model, data.inputs, nodes)
        program = Program(model)
        bar = tqdm(nodes, desc="adaround", unit="layer", disable=None if self.progress else True, leave=False)
        for i, node in enumerate(bar):
            weight = op_facts.weight_of(node)
            choice = plan.choice(node.name)
            codes, g, before, after = self.round_layer(program, node, inputs[node.name], choice,
                                                       self.seed + i)
            rounded = numerics.dequantize(codes, g.scale, g.zero_point, g.axis).astype(np.float32)
            # the first float weight stays the reference, should the pass run twice
            node.meta.setdefault(FLOAT_WEIGHT, weight.const_value.numpy())
            weight.const_value = ir.tensor(rounded, name=weight.name)
            program.constants[weight.name] = rounded
            node.meta[APPLIED] = (choice.weights, before, after)
        return PassResult(model, True)

    def round_layer(self, program: Program, node: ir.Node, x: np.ndarray, choice: NodeQuant, seed: int
                    ) -> tuple[np.ndarray, Grid, float, float]:
        """(codes, grid, reconstruction MSE of round-to-nearest, of AdaRound)."""
        w = np.asarray(op_facts.weight_of(node).const_value.numpy(), dtype=np.float32)
        g = weight_grid(node, w, choice)
        s = numerics._broadcastable(g.scale, w.ndim, g.axis).astype(np.float32)
        z = numerics._broadcastable(g.zero_point, w.ndim, g.axis).astype(np.float32)
        base = np.floor(w / s + z)  # the code below each weight
        rest = np.clip(w / s + z - base, 1e-4, 1 - 1e-4)
        v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)  # h(v0) = rest: start at the float weight
        f = node_function(program, node)
        lo, hi = float(g.qtype.qmin), float(g.qtype.qmax)

        def weight_of(v: jax.Array) -> jax.Array:
            return s * (jnp.clip(base + rectified_sigmoid(v), lo, hi) - z)

        def loss(v: jax.Array, xb: jax.Array, target: jax.Array, beta: jax.Array, reg: jax.Array) -> jax.Array:
            h = rectified_sigmoid(v)
            recon = jnp.mean((f(xb, weight_of(v)) - target) ** 2)
            return recon + reg * jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)

        import optax  # slow to import (about a second); only AdaRound's optimisation uses it

        optimiser = optax.adam(self.lr)

        @jax.jit
        def step(v: jax.Array, state: optax.OptState, xb: jax.Array, beta: jax.Array, reg: jax.Array):
            target = f(xb, w)
            grads = jax.grad(loss)(v, xb, target, beta, reg)
            updates, state = optimiser.update(grads, state, v)
            return optax.apply_updates(v, updates), state

        v, state = jnp.asarray(v0, jnp.float32), optimiser.init(jnp.asarray(v0, jnp.float32))
        rng = np.random.default_rng(seed)
        warm = int(0.2 * self.iterations)
        if op_facts.fact(node).dense and x.ndim > 2:
            x = x.reshape(-1, x.shape[-1])  # a dense layer acts on each row (position) alone
            rows = 8 * self.batch
        else:
            rows = max(1, min(self.batch, self.max_elements // max(int(np.prod(x.shape[1:])), 1)))
        for it in range(self.iterations):
            xb = x[rng.integers(0, len(x), size=min(rows, len(x)))]
            if it < warm:
                beta, reg = 20.0, 0.0
            else:
                t = (it - warm) / max(self.iterations - warm - 1, 1)
                beta, reg = 20.0 + t * (2.0 - 20.0), self.reg
            v, state = step(v, state, xb, jnp.float32(beta), jnp.float32(reg))
        codes = np.clip(base + (np.asarray(rectified_sigmoid(v)) >= 0.5), lo, hi)
        nearest = numerics.quantize(w, g.scale, g.zero_point, g.qtype, g.axis).astype(np.float32)
        keep_extremes(codes, nearest, w, g.axis)
        evaluate = jax.jit(lambda xb, ww: jnp.mean((f(xb, ww) - f(xb, w)) ** 2))
        probe = x[: min(len(x), 256)]
        before = float(evaluate(probe, (nearest - z) * s))
        after = float(evaluate(probe, (codes - z) * s))
        if after > before:  # the learned rounding did worse on these samples: keep round-to-nearest
            codes, after = nearest, before
        return codes.astype(g.qtype.numpy_dtype), g, before, after


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@dataclass(frozen=True)
class Grid:
    """A weight's quantization grid: channel axis (None: per tensor), scale, zero point, type."""

    axis: int | None
    scale: np.ndarray
    zero_point: np.ndarray
    qtype: numerics.QType


def weight_grid(node: ir.Node, w: np.ndarray, choice: NodeQuant) -> Grid:
    """The weight's grid exactly as ``InsertQDQ`` computes it."""
    qtype = choice.weight_qtype
    axis = op_facts.channel_axis(node) if choice.per_channel and w.ndim > 1 else None
    lo, hi = numerics.weight_range(w, axis)
    scale, zero_point = numerics.scale_zero_point(lo, hi, qtype, choice.weight_symmetric)
    return Grid(axis, scale, zero_point, qtype)


def grid(node: ir.Node, w: np.ndarray, choice: NodeQuant) -> tuple[int | None, np.ndarray, numerics.QType]:
    """The weight's channel axis, scale and type (``weight_grid`` without the zero point, which is 0
    for symmetric weights)."""
    g = weight_grid(node, w, choice)
    return g.axis, g.scale, g.qtype


def skip_reason(choice: NodeQuant, max_bits: int, per_tensor_max_bits: int) -> str | None:
    """Why a node with this plan choice keeps its round-to-nearest weights (None: it is rounded)."""
    if choice.mode != STATIC:
        blocks = f" (its blocks of {choice.block_size} weights have their own scales)" \
            if choice.mode == WEIGHT_ONLY else ""
        return f"mode {choice.mode!r} has another weight grid than the static one this pass models{blocks}"
    limit, kind = (max_bits, "per-channel") if choice.per_channel else (per_tensor_max_bits, "per-tensor")
    if choice.weights > limit:
        return f"{choice.weights}-bit {kind} weights, above the {limit}-bit limit for {kind} weights"
    return None


def rounding_nodes(model: ir.Model, plan: Plan | None, max_bits: int, per_tensor_max_bits: int, flag: str,
                   notes: str) -> tuple[Plan, list[ir.Node]]:
    """The plan (``plan``, else the one chosen before the pass) and its weighted nodes that AdaRound /
    bias correction act on; the others get a note in ``notes``.

    Raises when the plan quantizes weighted nodes but none qualifies, since the user's ``flag`` would
    then change nothing; except for a search's plan, whose widths are the search's to choose.
    """
    chosen_by_search = plan is None and search_result(model) is not None
    plan = chosen_plan(model, plan)
    chosen = [n for n in qir.quantizable_nodes(model)
              if plan.choice(n.name) is not None and op_facts.weight_of(n) is not None]
    nodes, reasons = [], {}
    for node in chosen:
        reason = skip_reason(plan.choice(node.name), max_bits, per_tensor_max_bits)
        if reason is None and plan.choice(node.name).mode not in op_facts.modes(node):
            reason = f"the node stays float (this {node.op_type} has no {plan.choice(node.name).mode} form)"
        if reason is None:
            nodes.append(node)
        else:
            node.meta.setdefault(notes, []).append(f"{flag} skipped: {reason}")
            reasons.setdefault(reason, node.name)
    if chosen and not nodes and not chosen_by_search:
        reason, name = next(iter(reasons.items()))
        raise QinjectError(f"{flag} changes nothing: no node of the plan qualifies (node {name!r}: {reason}); "
                           f"use static weights of at most {max_bits} bits per channel or {per_tensor_max_bits} per "
                           "tensor, or drop the flag")
    return plan, nodes


def keep_extremes(codes: np.ndarray, nearest: np.ndarray, w: np.ndarray, axis: int | None) -> None:
    """Give each channel's smallest and largest weight their nearest codes (in place), so the rounded
    weight's range, hence its scale and zero point, is the original's."""
    by_channel = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    rest = w.shape if axis is None else w.shape[:axis] + w.shape[axis + 1:]
    channels = np.arange(len(by_channel))
    for flat in (by_channel.argmin(axis=1), by_channel.argmax(axis=1)):
        others = list(np.unravel_index(flat, rest))
        index = tuple(others if axis is None else others[:axis] + [channels] + others[axis:])
        codes[index] = nearest[index]


def _own_weight(node: ir.Node) -> bool:
    """Whether the node's weight is read by this node alone (a shared weight cannot be re-rounded
    for one reader), noting it on the node otherwise."""
    readers = {use.node for use in op_facts.weight_of(node).uses()}
    if len(readers) > 1:
        node.meta.setdefault(NOTES, []).append("weight shared with other nodes: AdaRound skipped")
        return False
    return True
