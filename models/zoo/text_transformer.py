"""A small transformer encoder classifying which standard-library package a line of source is from.

Task: a line of Python source (stripped, at most ``SEQ`` characters) from one of the ``CLASSES``
packages of CPython's standard library; predict the package. ``train_text_transformer.py`` builds
the data set from the running interpreter's stdlib and trains; the splits are committed as token
arrays (``text_transformer_data.npz``) since other Python versions ship other source.

Input int32 token ids ``[batch, SEQ]``: ``PAD`` (0) after the end of the line, ``UNK`` (1) for
characters outside printable ASCII, and ``ord(c) - 30`` for printable ASCII ``c`` (2..96).

Model (pre-LayerNorm encoder): one-hot @ embedding plus a learned positional embedding; ``LAYERS``
blocks of 4-head self-attention and a GELU MLP, each with a residual; a final LayerNorm; the mean
over the non-padding positions; a linear head. One additive bias on the attention scores does two
jobs: padding keys get -1e4 (BERT's constant), and every key is penalised by ``ALIBI_SLOPES[h] *
|i - j|`` (ALiBi, Press et al. 2022, symmetric for an encoder). The penalty makes head h local from
the first step, so the heads find character n-grams quickly (42% -> 54% held out in a 1,200-step
trial). Everything is plain JAX ops with static shapes: the embedding is a one-hot matmul, not a
gather; the distance penalty a constant; no control flow. Biases, positions and the embedding go
through ``custom_vjp`` functions (``add_rows``, ``embed``) whose gradients sum in an order that does
not depend on the core count; a tracer inlines them, so they cost the exported graph nothing.

Parameter names: ``embed.weight`` ``[VOCAB, D]``, ``pos.weight`` ``[SEQ, D]``,
``layers.{i}.{ln1,ln2}.{weight,bias}``, ``layers.{i}.attn.{q,k,v,o}.{weight,bias}``,
``layers.{i}.mlp.{fc1,fc2}.{weight,bias}``, ``ln_f.{weight,bias}``, ``head.{weight,bias}``; dense
weights ``[out, in]`` as in ONNX Gemm.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.zoo.base import ZooModel

HERE = Path(__file__).resolve().parent
CLASSES = ("asyncio", "email", "http", "logging", "multiprocessing", "tkinter", "unittest", "xml")
SEQ, D, HEADS, FF, LAYERS = 48, 64, 4, 128, 2
PAD, UNK, FIRST_CHAR, LAST_CHAR = 0, 1, 32, 126
VOCAB = LAST_CHAR - FIRST_CHAR + 3  # pad, unknown, then the 95 printable ASCII characters
MASKED = -1e4
ALIBI_SLOPES = (1.0, 0.5, 0.25, 0.125)  # one per head: steep, so the heads start local


def encode(lines: list[str], seq: int = SEQ) -> np.ndarray:
    """Token ids ``[len(lines), seq]`` (int32) of lines, truncated to ``seq`` characters."""
    out = np.full((len(lines), seq), PAD, np.int32)
    for row, line in enumerate(lines):
        codes = [ord(c) for c in line[:seq]]
        out[row, : len(codes)] = [c - FIRST_CHAR + 2 if FIRST_CHAR <= c <= LAST_CHAR else UNK for c in codes]
    return out


def decode(ids: np.ndarray) -> str:
    """The text of one row of token ids (unknown characters as U+FFFD)."""
    return "".join("\ufffd" if i == UNK else chr(i - 2 + FIRST_CHAR) for i in np.asarray(ids) if i != PAD)


@jax.custom_vjp
def add_rows(h: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``h + b`` with ``b`` broadcast over ``h``'s leading axes (a bias ``[D]``, positions ``[S, D]``)."""
    return h + b


def _add_rows_fwd(h: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return h + b, b


def _add_rows_bwd(b: jnp.ndarray, g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    # b's gradient sums g over the leading axes. XLA:CPU splits such reductions across its threads,
    # so their rounding (and the trained weights) would depend on the core count; a dot with a ones
    # vector is summed in the same order on any machine (as in models/digits_cnn/train.py).
    rows = g.reshape(-1, b.size)
    return g, (jnp.ones((rows.shape[0],), g.dtype) @ rows).reshape(b.shape)


add_rows.defvjp(_add_rows_fwd, _add_rows_bwd)


@jax.custom_vjp
def embed(one_hot: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """``one_hot @ table``: the embedding lookup as a matmul."""
    return one_hot @ table


def _embed_fwd(one_hot: jnp.ndarray, table: jnp.ndarray) -> tuple[jnp.ndarray, tuple]:
    return one_hot @ table, (one_hot, table)


def _embed_bwd(res: tuple, g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    # XLA:CPU fuses the one-hot into the table-gradient dot and then splits its long contraction
    # (batch x sequence) across threads, in a core-count dependent order. Per-sequence gradients
    # (contraction over the sequence only) summed by a ones-vector dot keep a fixed order.
    one_hot, table = res
    per_sequence = one_hot.transpose(0, 2, 1) @ g  # [B, VOCAB, D]
    rows = per_sequence.reshape(per_sequence.shape[0], -1)
    return g @ table.T, (jnp.ones((rows.shape[0],), g.dtype) @ rows).reshape(table.shape)


embed.defvjp(_embed_fwd, _embed_bwd)


def layer_norm(params: dict, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """LayerNorm over the last axis, written out: mean, variance, rsqrt, gain and bias."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return add_rows(centred * jax.lax.rsqrt(var + 1e-5) * params[f"{name}.weight"], params[f"{name}.bias"])


def dense(params: dict, name: str, x: jnp.ndarray) -> jnp.ndarray:
    return add_rows(x @ params[f"{name}.weight"].T, params[f"{name}.bias"])


def attention(params: dict, name: str, x: jnp.ndarray, score_bias: jnp.ndarray) -> jnp.ndarray:
    """Multi-head self-attention of ``x`` ``[B, S, D]``, ``score_bias`` ``[B, H, S, S]`` added to scores."""
    b, s, d = x.shape

    def heads(h: jnp.ndarray) -> jnp.ndarray:  # [B, S, D] -> [B, H, S, D/H]
        return h.reshape(b, s, HEADS, d // HEADS).transpose(0, 2, 1, 3)

    q, k, v = (heads(dense(params, f"{name}.{p}", x)) for p in "qkv")
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(d // HEADS)) + score_bias
    context = jax.nn.softmax(scores, axis=-1) @ v
    return dense(params, f"{name}.o", context.transpose(0, 2, 1, 3).reshape(b, s, d))


def forward(params: dict, ids: jnp.ndarray) -> jnp.ndarray:
    """Logits ``[batch, len(CLASSES)]`` of token ids ``[batch, seq]`` (``seq <= SEQ``)."""
    mask = (ids != PAD).astype(jnp.float32)  # [B, S]
    x = add_rows(embed(jax.nn.one_hot(ids, VOCAB, dtype=jnp.float32), params["embed.weight"]),
                 params["pos.weight"][: ids.shape[1]])
    s = ids.shape[1]
    distance = np.abs(np.arange(s)[:, None] - np.arange(s)[None, :])
    alibi = -np.asarray(ALIBI_SLOPES, np.float32)[:, None, None] * distance  # [H, S, S], a constant
    score_bias = ((1.0 - mask) * MASKED)[:, None, None, :] + alibi
    for i in range(LAYERS):
        x = x + attention(params, f"layers.{i}.attn", layer_norm(params, f"layers.{i}.ln1", x), score_bias)
        h = dense(params, f"layers.{i}.mlp.fc1", layer_norm(params, f"layers.{i}.ln2", x))
        h = jax.nn.gelu(h, approximate=True)
        x = x + dense(params, f"layers.{i}.mlp.fc2", h)
    x = layer_norm(params, "ln_f", x)
    # Mean over the real characters; an all-padding row divides by 1, not 0.
    pooled = jnp.sum(x * mask[:, :, None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    return dense(params, "head", pooled)


def load() -> ZooModel:
    """The committed weights and token splits."""
    with np.load(HERE / "text_transformer.npz") as f:
        params = {k: f[k] for k in f.files}
    with np.load(HERE / "text_transformer_data.npz") as data:
        return ZooModel("text_transformer", forward, params, data["calib_ids"].astype(np.int32),
                        data["eval_ids"].astype(np.int32), data["eval_labels"].astype(np.int64))
