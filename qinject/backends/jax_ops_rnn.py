"""Recurrent ops for the JAX backend: ONNX LSTM, and onnxruntime's ``com.microsoft::DynamicQuantizeLSTM``
(the dynamic form the Q/DQ rewrite writes for an LSTM, ``passes/transforms/_insert_qdq_lstm.py``).

Registered into ``jax_ops.ONNX_OPS`` / ``jax_ops.CONTRIB_OPS`` on import (``jax_backend`` imports this
module). One ``lax.scan`` per direction; ``sequence_lens`` freezes a sequence's state after its length
and zeroes its outputs there, and the reverse direction runs each sequence backwards within its
length, as onnxruntime does. Activations: Sigmoid, Tanh and Relu (others are refused by name).

DynamicQuantizeLSTM is simulated: the int8 weights are dequantized, and what the kernel quantizes at
run time is quantized here the same way (uint8, DynamicQuantizeLinear's range rule): each direction's
X, all steps at once (up to the longest sequence; reversed, each sequence's own steps), then each
step's hidden state over the whole batch. onnxruntime splits the batch between its
threads for the recurrent step (at batch >= 2 with hidden <= 256, or batch > 4) and quantizes each
thread's rows from their own range; on one thread, or at batch 1, the two agree exactly up to float
rounding, otherwise within the rounding of one quantization step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import onnx_ir as ir
from jax import lax

from qinject.backends.jax_ops import HIGHEST, attr, contrib_op, onnx_op, what
from qinject.backends.jax_qdq import dynamic_quantize
from qinject.core.errors import UnsupportedModelError

MS_DOMAIN = "com.microsoft"
_ACTIVATIONS: dict[str, Callable[[Any], Any]] = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh,
                                                  "relu": jax.nn.relu}


@onnx_op("LSTM")
def _lstm(node: ir.Node, x: Any, w: Any, r: Any, b: Any = None, lengths: Any = None, h0: Any = None,
          c0: Any = None, p: Any = None) -> tuple[Any, ...]:
    return _run(node, x, w, r, b, lengths, h0, c0, p, attr(node, "layout", 0), quantize=False)


@contrib_op(MS_DOMAIN, "DynamicQuantizeLSTM")
def _dynamic_quantize_lstm(node: ir.Node, x: Any, w: Any, r: Any, b: Any = None, lengths: Any = None,
                           h0: Any = None, c0: Any = None, p: Any = None, w_scale: Any = None,
                           w_zero: Any = None, r_scale: Any = None, r_zero: Any = None) -> tuple[Any, ...]:
    if w_scale is None or r_scale is None:
        raise UnsupportedModelError(f"{what(node, 'W_scale / R_scale')} are missing (inputs 8 and 10 are "
                                    "required)")
    w = _dequantized(w, w_scale, w_zero)
    r = _dequantized(r, r_scale, r_zero)
    return _run(node, x, w, r, b, lengths, h0, c0, p, 0, quantize=True)


def _dequantized(codes: Any, scale: Any, zero: Any) -> Any:
    """[dirs, K, 4 * hidden] int8 codes with a scale per direction or per gate row, as float
    [dirs, 4 * hidden, K] (LSTM's own layout)."""
    codes = jnp.asarray(codes, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    zero = jnp.zeros_like(scale) if zero is None else jnp.asarray(zero, jnp.float32)
    if scale.ndim == 1:  # one per direction
        scale, zero = scale[:, None, None], zero[:, None, None]
    else:  # [dirs, 4 * hidden]: one per gate row, the GEMM's output column
        scale, zero = scale[:, None, :], zero[:, None, :]
    return jnp.swapaxes((codes - zero) * scale, 1, 2)


def _run(node: ir.Node, x: Any, w: Any, r: Any, b: Any, lengths: Any, h0: Any, c0: Any, p: Any, layout: int,
         quantize: bool) -> tuple[Any, ...]:
    x = jnp.asarray(x, jnp.float32)
    if layout:  # [batch, seq, ...] -> [seq, batch, ...]; states [batch, dirs, H] -> [dirs, batch, H]
        x = jnp.swapaxes(x, 0, 1)
        h0 = None if h0 is None else jnp.swapaxes(jnp.asarray(h0), 0, 1)
        c0 = None if c0 is None else jnp.swapaxes(jnp.asarray(c0), 0, 1)
    seq, batch = x.shape[0], x.shape[1]
    dirs, gates = w.shape[0], w.shape[1]
    hidden = gates // 4
    direction = attr(node, "direction", "forward")
    names = [a.lower() for a in attr(node, "activations", None) or ["Sigmoid", "Tanh", "Tanh"] * dirs]
    unknown = sorted({a for a in names if a not in _ACTIVATIONS})
    if unknown or attr(node, "activation_alpha") is not None:
        raise UnsupportedModelError(f"{what(node, 'activations')}: the JAX backend runs Sigmoid, Tanh and "
                                    f"Relu without alpha/beta, found {unknown or 'activation_alpha'}")
    lengths = jnp.full((batch,), seq, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    zeros = jnp.zeros((dirs, batch, hidden), jnp.float32)
    h0 = zeros if h0 is None else jnp.asarray(h0, jnp.float32)
    c0 = zeros if c0 is None else jnp.asarray(c0, jnp.float32)
    b = jnp.zeros((dirs, 2 * gates), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    p = jnp.zeros((dirs, 3 * hidden), jnp.float32) if p is None else jnp.asarray(p, jnp.float32)
    # onnxruntime's recurrent GEMM reads the previous step's row of Y, zero once a sequence has ended,
    # or without Y its final state buffer (frozen there): what the hidden state's range is taken over
    zero_ended = bool(node.outputs and node.outputs[0].name)
    cell = _Cell(attr(node, "clip"), bool(attr(node, "input_forget", 0)), quantize, zero_ended)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        acts = [_ACTIVATIONS[a] for a in names[3 * d:3 * d + 3]]
        xs = _reversed(x, lengths) if reverse else x
        if quantize:  # the kernel quantizes this direction's X once, every step together (module doc)
            xs = _through_int8(_steps_read(xs, lengths, reverse))
        projected = jnp.einsum("tbk,gk->tbg", xs, w[d], precision=HIGHEST) + b[d, :gates] + b[d, gates:]
        y, h, c = cell.scan(projected, jnp.asarray(r[d]), p[d], h0[d], c0[d], lengths, acts)
        ys.append(_reversed(y, lengths) if reverse else y)
        hs.append(h)
        cs.append(c)
    y, y_h, y_c = jnp.stack(ys, 1), jnp.stack(hs), jnp.stack(cs)  # [seq, dirs, batch, H], [dirs, batch, H]
    if layout:
        y, y_h, y_c = jnp.transpose(y, (2, 0, 1, 3)), jnp.swapaxes(y_h, 0, 1), jnp.swapaxes(y_c, 0, 1)
    return (y, y_h, y_c)[:len(node.outputs)]


class _Cell:
    """One direction's recurrence, the gates in ONNX's order (i, o, f, c)."""

    def __init__(self, clip: float | None, input_forget: bool, quantize: bool, zero_ended: bool) -> None:
        self.clip, self.input_forget = clip, input_forget
        self.quantize, self.zero_ended = quantize, zero_ended

    def scan(self, projected: Any, r: Any, p: Any, h0: Any, c0: Any, lengths: Any,
             acts: list[Callable[[Any], Any]]) -> tuple[Any, Any, Any]:
        f, g, h_act = acts
        pi, po, pf = jnp.split(p, 3)

        def step(carry: tuple[Any, Any], inputs: tuple[Any, Any]) -> tuple[tuple[Any, Any], Any]:
            h, c = carry
            t, xw = inputs
            h_in = h
            if self.quantize:  # the kernel quantizes H_{t-1} per step (an ended row: see zero_ended)
                h_in = _through_int8(jnp.where((t > lengths)[:, None], 0.0, h) if self.zero_ended else h)
            z = xw + jnp.einsum("bh,gh->bg", h_in, r, precision=HIGHEST)
            zi, zo, zf, zc = jnp.split(z, 4, axis=-1)
            i = f(self._clip(zi + pi * c))
            forget = 1.0 - i if self.input_forget else f(self._clip(zf + pf * c))
            c_new = forget * c + i * g(self._clip(zc))
            o = f(self._clip(zo + po * c_new))
            h_new = o * h_act(c_new)
            live = (t < lengths)[:, None]
            return (jnp.where(live, h_new, h), jnp.where(live, c_new, c)), jnp.where(live, h_new, 0.0)

        steps = jnp.arange(projected.shape[0], dtype=jnp.int32)
        (h, c), y = lax.scan(step, (h0, c0), (steps, projected))
        empty = (lengths == 0)[:, None]  # onnxruntime's final states of an empty sequence are zero
        return y, jnp.where(empty, 0.0, h), jnp.where(empty, 0.0, c)

    def _clip(self, z: Any) -> Any:
        return z if self.clip is None else jnp.clip(z, -self.clip, self.clip)


def _through_int8(x: Any) -> Any:
    """``x`` quantized to uint8 from its own range and dequantized (DynamicQuantizeLinear's rule)."""
    codes, scale, zero = dynamic_quantize(x, xp=jnp)
    return (codes - zero) * scale


def _steps_read(xs: Any, lengths: Any, reverse: bool) -> Any:
    """The rows of X the kernel quantizes, zero elsewhere (a zero leaves the range, which holds 0, as
    it is): steps up to the longest sequence; reversed, each sequence's own steps (onnxruntime's
    reversed copy of X holds zeros past a sequence's length)."""
    t = jnp.arange(xs.shape[0], dtype=jnp.int32)[:, None]
    read = t < (lengths[None, :] if reverse else jnp.max(lengths))
    return jnp.where(read.reshape(read.shape + (1,) * (xs.ndim - 2)), xs, 0.0)


def _reversed(x: Any, lengths: Any) -> Any:
    """Each sequence (axis 1) reversed within its length along time (axis 0); steps past it stay."""
    t = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
    index = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=0)

