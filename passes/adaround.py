"""AdaRound (Nagel et al., 2020): learn whether each low-bit weight rounds up or down.

Round-to-nearest is optimal per weight but not for the layer's output. AdaRound keeps each weight's
grid cell (``floor(W / s)``) and learns the rounding ``h(V) ∈ [0, 1]``, a rectified sigmoid
``clip(sigmoid(V)·(ζ − γ) + γ, 0, 1)`` with ζ = 1.1, γ = −0.1, minimising, layer by layer on
calibration data (through the JAX backend), the layer-output reconstruction error plus a regulariser
``λ Σ 1 − |2h − 1|^β`` that pushes every h to 0 or 1 as β is annealed from 20 to 2 (after a warm-up
of 20% of the iterations without it). The result is hard rounding: codes ``floor(W / s) + [h ≥ ½]``.

The rewrite writes each rounded weight back as float values that lie exactly on the quantization
grid (``codes · s``), with each channel's largest-magnitude weight keeping its nearest code, so the
channel's scale is unchanged and the Q/DQ rewrite at the same width reproduces exactly the learned
codes. The scale and channel axis are those of ``InsertQDQ`` (min/max of the weight, per channel
when the plan says so).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
import optax
from tqdm.auto import tqdm

from qinject import numerics, op_facts
from qinject import ir as qir
from qinject.backends.jax_backend import Program
from qinject.layer_data import layer_inputs, node_function
from qinject.pass_manager import Pass, PassResult
from qinject.plan import NodeQuant, Plan
from qinject.search import chosen_plan
from qinject.sensitivity import AnalysisData

ZETA, GAMMA = 1.1, -0.1
NOTES = "qinject.adaround.notes"
APPLIED = "qinject.adaround.applied"  # node meta: (bits, reconstruction MSE before, after)


class AdaRound(Pass):
    """Replace the weights of the plan's low-bit nodes by AdaRound-rounded grid values.

    Options:
        data: calibration inputs (as ``qinject.analyze`` takes them).
        plan: the plan (None: the search result in the model's meta).
        max_bits: nodes whose weights get at most this many bits are rounded (default 4).
        iterations: optimisation steps per layer; batch: samples per step (positions, for a MatMul
            or Gemm over sequences: it acts on each row alone; fewer samples for a convolution whose
            input exceeds ``max_elements`` per step);
        lr: Adam's learning rate; reg: the regulariser's weight λ; samples: calibration samples used.
    """

    name = "adaround"

    def __init__(self, data: object, plan: Plan | None = None, *, max_bits: int = 4, iterations: int = 500,
                 batch: int = 32, lr: float = 1e-2, reg: float = 0.01, samples: int = 256, seed: int = 0,
                 progress: bool = True, max_elements: int = 1 << 21) -> None:
        self.data, self.plan, self.max_bits, self.iterations = data, plan, max_bits, iterations
        self.batch, self.lr, self.reg, self.samples, self.seed, self.progress = batch, lr, reg, samples, seed, progress
        self.max_elements = max_elements

    def call(self, model: ir.Model) -> PassResult:
        plan = chosen_plan(model, self.plan)
        nodes = [n for n in qir.quantizable_nodes(model)
                 if (c := plan.choice(n.name)) is not None and c.weights <= self.max_bits and op_facts.weight_of(n)]
        nodes = [n for n in nodes if _own_weight(n)]
        if not nodes:
            return PassResult(model, False)
        data = AnalysisData.load(self.data, model, self.samples)
        inputs = layer_inputs(model, data.inputs, nodes)
        program = Program(model)
        bar = tqdm(nodes, desc="adaround", unit="layer", disable=None if self.progress else True, leave=False)
        for i, node in enumerate(bar):
            weight = op_facts.weight_of(node)
            codes, scale, axis, before, after = self.round_layer(program, node, inputs[node.name],
                                                                  plan.choice(node.name), self.seed + i)
            rounded = numerics.dequantize(codes, scale, np.zeros_like(scale), axis).astype(np.float32)
            weight.const_value = ir.tensor(rounded, name=weight.name)
            program.constants[weight.name] = rounded
            node.meta[APPLIED] = (plan.choice(node.name).weights, before, after)
        return PassResult(model, True)

    def round_layer(self, program: Program, node: ir.Node, x: np.ndarray, choice: NodeQuant, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, int | None, float, float]:
        """(codes, scale, axis, reconstruction MSE of round-to-nearest, of AdaRound)."""
        w = np.asarray(op_facts.weight_of(node).const_value.numpy(), dtype=np.float32)
        axis, scale, qtype = grid(node, w, choice)
        s = numerics._broadcastable(scale, w.ndim, axis).astype(np.float32)
        base = np.floor(w / s)
        rest = np.clip(w / s - base, 1e-4, 1 - 1e-4)
        v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)  # h(v0) = rest: start at the float weight
        f = node_function(program, node)
        lo, hi = float(qtype.qmin), float(qtype.qmax)

        def weight_of(v: jax.Array) -> jax.Array:
            return s * jnp.clip(base + rectified_sigmoid(v), lo, hi)

        def loss(v: jax.Array, xb: jax.Array, target: jax.Array, beta: jax.Array, reg: jax.Array) -> jax.Array:
            h = rectified_sigmoid(v)
            recon = jnp.mean((f(xb, weight_of(v)) - target) ** 2)
            return recon + reg * jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)

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
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and x.ndim > 2:
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
        nearest = numerics.quantize(w, scale, np.zeros_like(scale), qtype, axis).astype(np.float32)
        keep_max(codes, nearest, w, axis)
        evaluate = jax.jit(lambda xb, ww: jnp.mean((f(xb, ww) - f(xb, w)) ** 2))
        probe = x[: min(len(x), 256)]
        before = float(evaluate(probe, nearest * s))
        after = float(evaluate(probe, codes * s))
        if after > before:  # the learned rounding did worse on these samples: keep round-to-nearest
            codes, after = nearest, before
        return codes.astype(qtype.numpy_dtype), scale, axis, before, after


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def grid(node: ir.Node, w: np.ndarray, choice: NodeQuant) -> tuple[int | None, np.ndarray, numerics.QType]:
    """The weight's channel axis, scale and type exactly as ``InsertQDQ`` computes them."""
    qtype = choice.weight_qtype
    axis = op_facts.channel_axis(node) if choice.per_channel and w.ndim > 1 else None
    lo, hi = numerics.weight_range(w, axis)
    scale, _ = numerics.scale_zero_point(lo, hi, qtype, choice.weight_symmetric)
    return axis, scale, qtype


def keep_max(codes: np.ndarray, nearest: np.ndarray, w: np.ndarray, axis: int | None) -> None:
    """Give each channel's largest-magnitude weight its nearest code (in place), so the rounded
    weight's range, hence its scale, is the original's."""
    moved = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1) if axis is not None else np.abs(w).reshape(1, -1)
    flat_idx = moved.argmax(axis=1)
    view_codes = np.moveaxis(codes, axis, 0).reshape(len(flat_idx), -1) if axis is not None else codes.reshape(1, -1)
    view_near = np.moveaxis(nearest, axis, 0).reshape(len(flat_idx), -1) if axis is not None else nearest.reshape(1, -1)
    rows = np.arange(len(flat_idx))
    view_codes[rows, flat_idx] = view_near[rows, flat_idx]
    if axis is not None:
        codes[...] = np.moveaxis(view_codes.reshape(np.moveaxis(codes, axis, 0).shape), 0, axis)
    else:
        codes[...] = view_codes.reshape(codes.shape)


def _own_weight(node: ir.Node) -> bool:
    """Whether the node's weight is read by this node alone (a shared weight cannot be re-rounded
    for one reader), noting it on the node otherwise."""
    readers = {use.node for use in op_facts.weight_of(node).uses()}
    if len(readers) > 1:
        node.meta.setdefault(NOTES, []).append("weight shared with other nodes: AdaRound skipped")
        return False
    return True

