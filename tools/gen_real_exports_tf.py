#!/usr/bin/env python3
"""The Keras part of the real-exporter corpus: random-init Keras models through tf2onnx.

Runs in its own virtual environment (TensorFlow and tf2onnx pin their own numpy/protobuf/onnx)
and reuses the shared helpers of ``tools/gen_real_exports.py`` (which import only numpy, onnx and
onnxruntime at module level): the same size budget, manifest, loader-based checks.

    python3 -m venv /work/genvenv-tf
    /work/genvenv-tf/bin/pip install -r tools/gen_real_exports_tf.requirements.txt
    /work/genvenv-tf/bin/python tools/gen_real_exports_tf.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_real_exports as common
import numpy as np

VOCAB = 1000


def keras_cnn():
    import tensorflow as tf
    L = tf.keras.layers
    inp = tf.keras.Input(shape=(32, 32, 3), name="input")
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D()(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Conv2D(32, 1, activation="relu")(x)
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(64, activation="relu")(x)
    out = L.Dense(10, name="logits")(x)
    model = tf.keras.Model(inp, out, name="keras_cnn")
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)
    inputs = [{"name": "input", "kind": "image", "range": [-2.0, 2.0], "axes": {0: "batch"}}]
    return {"model": model, "spec": spec, "inputs": inputs, "task": "classifier",
                "defaults": {"batch": 1}, "alternates": {"batch": 2},
                "description": "Keras functional CNN: Conv2D(16,3,no bias)+BatchNormalization+ReLU, "
                            "MaxPool, DepthwiseConv2D(3), Conv2D(32,1)+relu, Conv2D(32,3,stride 2)+relu, "
                            "GlobalAveragePooling2D, Dense(64)+relu, Dense(10); random init (seed 0)",
                "realistic_inputs": "float32 NHWC image [batch, 32, 32, 3] (fixed 32x32, channels last), "
                                 "values roughly in [-2, 2] (or [0, 1] scaled)"}


def keras_text():
    import tensorflow as tf
    L = tf.keras.layers
    inp = tf.keras.Input(shape=(None,), dtype="int32", name="input_ids")
    x = L.Embedding(VOCAB, 32)(inp)
    x = L.Conv1D(32, 3, padding="same", activation="relu")(x)
    x = L.LSTM(32)(x)
    x = L.Dense(32, activation="relu")(x)
    out = L.Dense(4, name="logits")(x)
    model = tf.keras.Model(inp, out, name="keras_text")
    spec = (tf.TensorSpec((None, None), tf.int32, name="input_ids"),)
    inputs = [{"name": "input_ids", "kind": "tokens", "vocab_size": VOCAB,
               "axes": {0: "batch", 1: "sequence"}}]
    return {"model": model, "spec": spec, "inputs": inputs, "task": "classifier",
                "defaults": {"batch": 1, "sequence": 16}, "alternates": {"batch": 2, "sequence": 7},
                "description": f"Keras functional text classifier: Embedding({VOCAB},32), Conv1D(32,3)+relu, "
                            "LSTM(32) (last state), Dense(32)+relu, Dense(4); random init (seed 0)",
                "realistic_inputs": f"int32 token ids [batch, sequence] in [0, {VOCAB}), sequence >= 1"}


def keras_mobilenet_v2():
    import tensorflow as tf
    model = tf.keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None,
                                              classes=1000, classifier_activation=None)
    spec = (tf.TensorSpec((None, 96, 96, 3), tf.float32, name="input"),)
    inputs = [{"name": "input", "kind": "image", "range": [-1.0, 1.0], "axes": {0: "batch"}}]
    return {"model": model, "spec": spec, "inputs": inputs, "task": "classifier",
                "defaults": {"batch": 1}, "alternates": {"batch": 2},
                "description": "tf.keras.applications.MobileNetV2(input 96x96x3, alpha 0.35, weights=None, "
                            "1000 classes, no softmax); random init (seed 0)",
                "realistic_inputs": "float32 NHWC image [batch, 96, 96, 3] (fixed), scaled to [-1, 1] "
                                 "(mobilenet_v2.preprocess_input)"}


BUILDERS = {"cnn": keras_cnn, "text": keras_text, "mobilenet_v2": keras_mobilenet_v2}


def export_one(key: str, out_dir: Path, opset: int | None) -> dict[str, Any]:
    import tensorflow as tf
    import tf2onnx
    tf.keras.utils.set_random_seed(common.GLOBAL_SEED)
    b = BUILDERS[key]()
    name = f"keras_{key}_tf2onnx"
    entry = common.base_entry(name, "keras", "tf2onnx", key, b["task"], b["description"],
                              b["realistic_inputs"], b["defaults"], b["alternates"])
    t0 = time.time()
    try:
        model, _ = tf2onnx.convert.from_keras(b["model"], input_signature=b["spec"], opset=opset,
                                              output_path=None)
    except Exception as exc:  # noqa: BLE001
        entry.update(status="failed", file=None, export_seconds=round(time.time() - t0, 1),
                     **common.error_record(exc))
        print(f"  {name}: EXPORT FAILED: {entry['error']}", flush=True)
        return entry
    entry["export_seconds"] = round(time.time() - t0, 1)
    common.describe_io(model, entry, b["inputs"])
    keras_model = b["model"]

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(keras_model(feeds[b["inputs"][0]["name"]], training=False))]

    try:
        common.finalize(model, entry, out_dir, reference)
    except Exception as exc:  # noqa: BLE001
        entry.update(status="failed", file=None, stage="check", **common.error_record(exc))
        print(f"  {name}: CHECK FAILED: {entry['error']}", flush=True)
        return entry
    print(f"  {name}: {entry['status']} {entry['bytes'] / 1e6:.2f} MB in {entry['export_seconds']} s, "
          f"diff {entry['framework_check']['max_abs_diff']:.2e}", flush=True)
    return entry


def tf_versions() -> dict[str, str]:
    return common.package_versions(["tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy",
                                    "protobuf"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=common.OUT_DIR)
    ap.add_argument("--only", nargs="*", choices=sorted(BUILDERS))
    ap.add_argument("--opset", type=int, default=17, help="tf2onnx target opset (its newest tested: 18)")
    args = ap.parse_args(argv)
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(2)
    t_start = time.time()
    entries = {}
    for key in BUILDERS:
        if args.only and key not in args.only:
            continue
        print(f"keras/{key}", flush=True)
        entry = export_one(key, args.out, args.opset)
        entries[entry["name"]] = entry
    common.update_manifest(args.out, entries, "gen_real_exports_tf.py", tf_versions(), time.time() - t_start)
    failed = [n for n, e in entries.items() if e["status"] == "failed"]
    print(f"done in {time.time() - t_start:.0f} s: {len(entries) - len(failed)} exported, "
          f"{len(failed)} failed {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
