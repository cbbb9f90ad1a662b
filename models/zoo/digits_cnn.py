"""The bundled digits CNN (``models/digits_cnn``) as a JAX model.

No new weights: the parameters are the initializers of ``models/digits_cnn/model.onnx`` (already in
the layouts ``forward`` expects, conv OIHW and dense ``[out, in]``), the forward is the training
script's own, and the splits are the committed ``calib.npz`` / ``eval.npz``. Input float32
``[batch, 1, 8, 8]`` (NCHW, pixels in [0, 1]). The forward adds biases through a ``custom_vjp``,
which a tracer has to inline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.zoo.base import ZooModel

DATA = Path(__file__).resolve().parents[1] / "digits_cnn"


def load() -> ZooModel:
    """Read the weights from the ONNX file and the splits from the committed .npz files."""
    import onnx
    from onnx import numpy_helper

    # Imported here: the training script pulls in scikit-learn and onnxruntime (about 1 s, once).
    from models.digits_cnn.train import forward

    graph = onnx.load(str(DATA / "model.onnx")).graph
    params = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    with np.load(DATA / "calib.npz") as calib, np.load(DATA / "eval.npz") as held_out:
        return ZooModel("digits_cnn", forward, params, calib["input"], held_out["input"], held_out["labels"])
