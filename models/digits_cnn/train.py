"""Train the bundled digits CNN with JAX and export it as a hand-built ONNX model.

The model is qinject's default, always-available test subject: scikit-learn ships the digits data
set inside its wheel, so training needs no download. Convolutions dominate its compute, so int8
kernels have something to speed up. Training is deterministic and does not depend on the core
count, so rerunning the script rewrites byte-identical files.

Usage:
    python models/digits_cnn/train.py
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

jax.config.update("jax_platforms", "cpu")

HERE = Path(__file__).resolve().parent
SEED, EPOCHS, BATCH, LR, CALIB_SIZE = 0, 30, 64, 1e-3, 256
# (layer name, output channels/features, input channels/features).
CONVS = [("conv1", 32, 1), ("conv2", 64, 32), ("conv3", 128, 64)]
DENSES = [("fc1", 256, 512), ("fc2", 10, 256)]
Params = dict[str, jax.Array | np.ndarray]


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return stratified, seeded train / calib / eval splits as ([N,1,8,8] float32, [N] int64)."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_rest, x_eval, y_rest, y_eval = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    # Calibration data comes out of the training portion but is not trained on, so it is disjoint
    # from both the weights' training data and the held-out evaluation data.
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=CALIB_SIZE, random_state=SEED, stratify=y_rest
    )
    return {"train": (x_train, y_train), "calib": (x_calib, y_calib), "eval": (x_eval, y_eval)}


def init_params(key: jax.Array) -> Params:
    """He-initialise weights in ONNX layouts (conv OIHW, dense [out, in]) with zero biases."""
    params: Params = {}
    for name, out, inp in CONVS + DENSES:
        key, sub = jax.random.split(key)
        shape = (out, inp, 3, 3) if name.startswith("conv") else (out, inp)
        fan_in = int(np.prod(shape[1:]))
        params[f"{name}.weight"] = jax.random.normal(sub, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)
        params[f"{name}.bias"] = jnp.zeros((out,), jnp.float32)
    return params


@jax.custom_vjp
def add_bias(h: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Add a per-channel bias along axis 1 (NCHW activations or [N, C] features)."""
    return h + b.reshape((1, -1) + (1,) * (h.ndim - 2))


def _add_bias_fwd(h: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, None]:
    return add_bias(h, b), None


def _add_bias_bwd(_: None, g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    # The bias gradient is a sum over batch and space. XLA:CPU splits reduce ops across however many
    # threads the machine has, so their float rounding (and the trained weights) would depend on the
    # core count; a dot with a ones vector is summed in the same order on any machine.
    flat = jnp.moveaxis(g, 1, -1).reshape(-1, g.shape[1])
    return g, jnp.ones((flat.shape[0],), g.dtype) @ flat


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def forward(params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """Compute logits for NCHW input, mirroring the exported ONNX graph op for op."""

    def conv(h: jnp.ndarray, name: str) -> jnp.ndarray:
        h = jax.lax.conv_general_dilated(
            h, params[f"{name}.weight"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return jax.nn.relu(add_bias(h, params[f"{name}.bias"]))

    def pool(h: jnp.ndarray) -> jnp.ndarray:
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    h = pool(conv(pool(conv(conv(x, "conv1"), "conv2")), "conv3")).reshape(x.shape[0], -1)
    h = jax.nn.relu(add_bias(h @ params["fc1.weight"].T, params["fc1.bias"]))
    return add_bias(h @ params["fc2.weight"].T, params["fc2.bias"])


def loss_fn(params: Params, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Mean softmax cross-entropy."""
    logp = jax.nn.log_softmax(forward(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def shift(key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    """Translate each image by up to one pixel, zero-filling; digits are not always centred."""
    padded = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    offsets = jax.random.randint(key, (x.shape[0], 2), 0, 3)
    crop = jax.vmap(lambda img, off: jax.lax.dynamic_slice(img, (0, off[0], off[1]), (1, 8, 8)))
    return crop(padded, offsets)


@jax.jit
def train_step(state: tuple, key: jax.Array, x: jnp.ndarray, y: jnp.ndarray) -> tuple:
    """Take one Adam step on an augmented batch; returns the new state and the batch loss."""
    params, m, v, t = state
    loss, grads = jax.value_and_grad(loss_fn)(params, shift(key, x), y)
    t = t + 1
    m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
    v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
    scale = LR * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    params = jax.tree.map(lambda p, a, b: p - scale * a / (jnp.sqrt(b) + 1e-8), params, m, v)
    return (params, m, v, t), loss


def train(x: np.ndarray, y: np.ndarray, key: jax.Array) -> tuple[Params, float]:
    """Train from scratch with shuffled mini-batches (last partial batch dropped); returns params, seconds."""
    key, init_key = jax.random.split(key)
    params = init_params(init_key)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, zeros, zeros, jnp.float32(0))  # Adam: params, first moment, second moment, step
    start = time.perf_counter()
    # A Python loop over a jitted step, not lax.scan: XLA:CPU runs convolutions inside a loop body
    # some 25x slower than at top level.
    for epoch, ekey in enumerate(jax.random.split(key, EPOCHS)):
        perm_key, aug_key = jax.random.split(ekey)
        batches = np.asarray(jax.random.permutation(perm_key, len(x)))[: len(x) // BATCH * BATCH]
        losses = []
        for bidx, bkey in zip(batches.reshape(-1, BATCH), jax.random.split(aug_key, len(x) // BATCH)):
            state, loss = train_step(state, bkey, x[bidx], y[bidx])
            losses.append(loss)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}  loss {float(np.mean(losses)):.4f}")
    return jax.tree.map(np.asarray, state[0]), time.perf_counter() - start


def to_onnx(params: Params) -> onnx.ModelProto:
    """Build the ONNX graph by hand: Conv/Relu/MaxPool blocks, Flatten, then Gemm layers."""
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    # (node name, op, inputs, attributes); each node's output tensor is named after the node.
    layers = [
        ("conv1", "Conv", ["input", "conv1.weight", "conv1.bias"], conv),
        ("relu1", "Relu", ["conv1"], {}),
        ("conv2", "Conv", ["relu1", "conv2.weight", "conv2.bias"], conv),
        ("relu2", "Relu", ["conv2"], {}),
        ("pool1", "MaxPool", ["relu2"], pool),
        ("conv3", "Conv", ["pool1", "conv3.weight", "conv3.bias"], conv),
        ("relu3", "Relu", ["conv3"], {}),
        ("pool2", "MaxPool", ["relu3"], pool),
        ("flatten", "Flatten", ["pool2"], {"axis": 1}),
        ("fc1", "Gemm", ["flatten", "fc1.weight", "fc1.bias"], {"transB": 1}),
        ("relu4", "Relu", ["fc1"], {}),
        ("fc2", "Gemm", ["relu4", "fc2.weight", "fc2.bias"], {"transB": 1}),
    ]
    nodes = [helper.make_node(op, inputs, [name], name=name, **attrs) for name, op, inputs, attrs in layers]
    nodes[-1].output[0] = "logits"
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in sorted(params.items())]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="qinject-digits-train", producer_version="1")
    onnx.checker.check_model(model, full_check=True)
    return model


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are shared repository files
    os.replace(tmp, path)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Serialise arrays as .npz with a fixed zip timestamp (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def main() -> None:
    """Train, verify the ONNX export against JAX, and write the model, data and README."""
    splits = load_splits()
    (x_train, y_train), (x_calib, _), (x_eval, y_eval) = splits["train"], splits["calib"], splits["eval"]
    params, train_s = train(x_train, y_train, jax.random.PRNGKey(SEED))

    jax_logits = np.asarray(jax.jit(forward)(params, x_eval))
    acc = float((jax_logits.argmax(1) == y_eval).mean())
    model = to_onnx(params)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_eval})[0]
    diff = float(np.abs(ort_logits - jax_logits).max())
    ort_acc = float((ort_logits.argmax(1) == y_eval).mean())
    if not (diff < 1e-4 and ort_acc == acc):
        raise SystemExit(f"ONNX export mismatch: max|diff| {diff:.2e}, accuracy {ort_acc:.4f} vs {acc:.4f}")
    print(f"train {len(x_train)}  calib {len(x_calib)}  eval {len(x_eval)}  training {train_s:.1f} s")
    print(f"held-out accuracy {acc:.2%} ({int(round(acc * len(y_eval)))}/{len(y_eval)}); "
          f"onnxruntime max|diff| {diff:.1e}")

    write_atomic(HERE / "model.onnx", model.SerializeToString())
    write_atomic(HERE / "eval.npz", npz_bytes(input=x_eval, labels=y_eval))
    write_atomic(HERE / "calib.npz", npz_bytes(input=x_calib))
    readme = README.format(n_train=len(x_train), n_calib=len(x_calib), n_eval=len(x_eval), acc=acc,
                           n_correct=int(round(acc * len(y_eval))), epochs=EPOCHS, batch=BATCH, lr=LR)
    write_atomic(HERE / "README.md", readme.encode())


README = """\
# digits_cnn

qinject's bundled default model: a small CNN classifying the 8x8 handwritten digits of
scikit-learn's `load_digits` (1797 images, 10 classes, shipped inside scikit-learn, so no download).
This file is generated by `train.py`; edit the template there.

## Architecture

Input `input` float32 `[batch, 1, 8, 8]` (NCHW, pixels scaled to [0, 1] by dividing by 16);
output `logits` float32 `[batch, 10]`. ONNX opset 13, IR version 8, built by hand with `onnx.helper`.

| node | op | shape out |
|------|----|-----------|
| conv1, relu1 | Conv 1->32, 3x3, pad 1 + Relu | 32x8x8 |
| conv2, relu2 | Conv 32->64, 3x3, pad 1 + Relu | 64x8x8 |
| pool1 | MaxPool 2x2 | 64x4x4 |
| conv3, relu3 | Conv 64->128, 3x3, pad 1 + Relu | 128x4x4 |
| pool2 | MaxPool 2x2 | 128x2x2 |
| flatten | Flatten | 512 |
| fc1, relu4 | Gemm 512->256 (transB=1) + Relu | 256 |
| fc2 | Gemm 256->10 (transB=1) | 10 |

The convolutions hold about 95% of the 2.5M multiply-adds per image, so int8 convolution kernels can
show a speedup.

## Data splits

Stratified `train_test_split` with `random_state=0`:

- `eval.npz` (`input` float32 `[{n_eval}, 1, 8, 8]`, `labels` int64 `[{n_eval}]`): 25% held out,
  never trained on.
- `calib.npz` (`input` float32 `[{n_calib}, 1, 8, 8]`): taken from the training portion, not trained on.
- training: the remaining {n_train} images, with random one-pixel shifts as augmentation.

## Accuracy

Held-out accuracy: **{acc:.2%}** ({n_correct}/{n_eval}), identical for JAX and onnxruntime
(logits agree to better than 1e-4).

## Retraining

    python models/digits_cnn/train.py

Trains with JAX on CPU ({epochs} epochs, batch {batch}, Adam, lr {lr}, fixed PRNG key) in well under
a minute, checks the export (`onnx.checker` full check, onnxruntime logits against JAX), and atomically
rewrites `model.onnx`, `eval.npz`, `calib.npz` and this README. Training is deterministic and does not
depend on the core count, so a rerun reproduces byte-identical files (a CPU with a different
instruction set could still change the last bits of the weights).
"""

if __name__ == "__main__":
    main()
