"""Loader for the real-exporter corpus in ``models/realworld/exports`` (numpy and onnx only).

The files were made by ``tools/gen_real_exports.py`` (PyTorch's TorchScript and dynamo exporters,
Hugging Face transformers) and ``tools/gen_real_exports_tf.py`` (Keras through tf2onnx), all from
random-init, seeded models. A file small enough (<= 3 MB) is committed as exported ("full"). A
larger one is "structure-only": every float initializer with more than 1024 elements has had its
data removed (name, dims and data_type kept) and its statistics written into its ``doc_string``
as JSON ``{"qinject_structure_only": {"mean": m, "std": s, "min": lo, "max": hi, "seed": g}}``.
:func:`load` refills such a tensor with ``normal(mean, std)`` clipped to ``[min, max]`` (float32,
numpy's ``default_rng`` seeded by a hash of the global seed and the tensor name), so every load
gives the same model. Integer tensors and small tensors are always kept verbatim.

    names()                              -> the committed models (failed exports excluded)
    manifest(name)                       -> the model's manifest entry (inputs, exporter, ...)
    load(name)                           -> onnx.ModelProto, structure-only tensors refilled
    example_feeds(name, batch, **dims)   -> {input name: numpy array} valid random inputs
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

EXPORTS_DIR = Path(__file__).resolve().parent / "exports"
MANIFEST_PATH = EXPORTS_DIR / "manifest.json"
DOC_KEY = "qinject_structure_only"

_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
                TensorProto.DOUBLE: np.float64}


@lru_cache(maxsize=1)
def _manifest() -> dict[str, Any]:
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return json.load(f)


def names(include_failed: bool = False) -> list[str]:
    """The models in the manifest; failed exports (no file) only when ``include_failed``."""
    models = _manifest()["models"]
    return sorted(n for n, e in models.items() if include_failed or e["status"] != "failed")


def manifest(name: str) -> dict[str, Any]:
    """The manifest entry of ``name`` (a copy): source, exporter, task, inputs, status, ..."""
    try:
        return json.loads(json.dumps(_manifest()["models"][name]))
    except KeyError:
        raise KeyError(f"no model {name!r} in {MANIFEST_PATH}; known: {names(True)}") from None


def path(name: str) -> Path:
    entry = manifest(name)
    if entry["status"] == "failed":
        raise FileNotFoundError(f"{name}: the export failed ({entry.get('error')}); no file")
    return EXPORTS_DIR / entry["file"]


def tensor_seed(tensor_name: str, global_seed: int) -> int:
    """The refill seed of one tensor: a stable hash of the global seed and the tensor's name."""
    digest = hashlib.sha256(f"{global_seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def refill_values(tensor_name: str, dims: list[int], data_type: int, stats: dict[str, float],
                  global_seed: int) -> np.ndarray:
    """The deterministic values of one structure-only tensor."""
    rng = np.random.default_rng(tensor_seed(tensor_name, global_seed))
    values = rng.normal(stats["mean"], stats["std"], size=tuple(dims))
    values = np.clip(values, stats["min"], stats["max"])
    return values.astype(_FLOAT_TYPES[data_type])


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def refill(model: onnx.ModelProto, default_seed: int = 0) -> int:
    """Refill, in place, every structure-only initializer of ``model``; returns how many."""
    count = 0
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            if not tensor.doc_string.startswith("{") or DOC_KEY not in tensor.doc_string:
                continue
            stats = json.loads(tensor.doc_string)[DOC_KEY]
            values = refill_values(tensor.name, list(tensor.dims), tensor.data_type, stats,
                                   int(stats.get("seed", default_seed)))
            tensor.raw_data = values.tobytes()
            tensor.doc_string = ""
            count += 1
    return count


def load(name: str) -> onnx.ModelProto:
    """The model ``name`` as an ``onnx.ModelProto``, with structure-only tensors refilled."""
    model = onnx.load(str(path(name)))
    refill(model, int(_manifest().get("global_seed", 0)))
    return model


def example_feeds(name: str, batch: int = 1, seed: int = 0, **dims: Any) -> dict[str, np.ndarray]:
    """Valid random inputs for ``name``: ``batch`` for the batch axis, ``dims`` for the others.

    A named axis that ``dims`` leaves out takes the manifest's default (``defaults``). Images are
    uniform in [-2, 2], token ids uniform in [0, vocab), attention masks ones, token type ids
    zeros, log-mel features normal(0, 1). Scalar control inputs (``mode``, ``steps``) take
    ``dims[input name]`` or their default.
    """
    return feeds_for_entry(manifest(name), batch, seed, **dims)


def feeds_for_entry(entry: dict[str, Any], batch: int = 1, seed: int = 0,
                    **dims: Any) -> dict[str, np.ndarray]:
    """:func:`example_feeds` for a manifest entry given as a dict."""
    name = entry.get("name", "?")
    sizes = dict(entry.get("defaults", {}))
    sizes.update(dims)
    sizes["batch"] = batch
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in entry["inputs"]:
        dtype = np.dtype(spec["dtype"])
        axes = {int(k): v for k, v in spec.get("axes", {}).items()}
        shape = []
        for i, d in enumerate(spec["dims"]):
            if i in axes:
                shape.append(int(sizes[axes[i]]))
            elif isinstance(d, int):
                shape.append(d)
            else:
                raise ValueError(f"{name}: input {spec['name']} axis {i} ({d!r}) has no size")
        kind = spec["kind"]
        if kind == "image":
            lo, hi = spec.get("range", [-2.0, 2.0])
            value = rng.uniform(lo, hi, size=shape)
        elif kind == "tokens":
            value = rng.integers(0, int(spec["vocab_size"]), size=shape)
        elif kind == "mask":
            value = np.ones(shape)
        elif kind == "token_type":
            value = np.zeros(shape)
        elif kind == "scalar":
            value = np.full(shape, sizes.get(spec["name"], spec["default"]))
        else:  # "features", "float"
            value = rng.standard_normal(size=shape)
        feeds[spec["name"]] = np.asarray(value).astype(dtype)
    return feeds


def cases_for_entry(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's ``defaults``, then each named axis / scalar input moved to each alternate."""
    base = dict(entry.get("defaults", {}))
    cases = [dict(base)]
    for axis, alt in entry.get("alternates", {}).items():
        for value in alt if isinstance(alt, list) else [alt]:
            case = dict(base)
            case[axis] = value
            cases.append(case)
    return cases


def check_cases(name: str) -> list[dict[str, Any]]:
    """The size cases the generator ran the model on: dicts of ``batch`` plus the other sizes,
    ready for ``example_feeds(name, case.pop("batch"), **case)``."""
    return cases_for_entry(manifest(name))
