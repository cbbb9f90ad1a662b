"""The light model zoo shipped inside the ``onnx`` package, made into real float models.

``onnx/backend/test/data/light/light_*.onnx`` are the structures of classic ImageNet nets (ResNet-50,
DenseNet-121, Inception v1/v2, SqueezeNet, ShuffleNet, VGG-19, AlexNet, ZFNet-512) with every weight
a ``ConstantOfShape`` fill: a constant weight makes a degenerate network (every output equal),
useless for measuring quantization fidelity. ``materialize`` keeps the structure and gives every
Conv/Gemm weight deterministic He-normal values (followed through Unsqueeze/Reshape), biases zeros,
BatchNormalization and per-channel Mul/Add identities, and drops the trailing Softmax so fidelity is
measured on logits. Used by the tests and by ``tools/bench_vs_ort.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

NAMES = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512")
# Which input of which op is a parameter, and how it is initialised.
INIT_RULES = {"Conv": {1: "he", 2: "zeros"}, "Gemm": {1: "he", 2: "zeros"},
              "BatchNormalization": {1: "ones", 2: "zeros", 3: "zeros", 4: "ones"},
              "Mul": {1: "ones"}, "Add": {1: "zeros"}}


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def materialize(name: str, seed: int = 0, opset: int | None = 13) -> onnx.ModelProto:
    """The light-zoo model ``name`` with deterministic weights, as a plain float model.

    The light models hold their weights as ``ConstantOfShape`` (one value repeated) and their
    BatchNormalization statistics as graph inputs with initializers. Weights become He-normal,
    biases zeros, BN an identity (scale 1, bias 0, mean 0, var 1). A trailing Softmax is dropped:
    on random-weight logits it saturates to one-hot, so an SQNR on probabilities would say little.
    """
    model = onnx.load(str(light_dir() / f"light_{name}.onnx"))
    graph, rng = model.graph, np.random.default_rng(seed)
    fills = {n.output[0]: n for n in graph.node if n.op_type == "ConstantOfShape"}
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    new: dict[str, np.ndarray] = {}
    for node in graph.node:
        for idx, kind in INIT_RULES.get(node.op_type, {}).items():
            name = _parameter(node.input[idx] if idx < len(node.input) else "", fills, inits, producers)
            if name and name not in new:
                new[name] = _init_value(kind, _param_shape(name, fills, inits), node, rng)
    for name in set(new) & set(fills):
        graph.node.remove(fills[name])
    kept = [t for t in graph.initializer if t.name not in new]
    kept += [numpy_helper.from_array(array, name) for name, array in new.items()]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inputs = [i for i in graph.input if i.name not in {t.name for t in kept}]  # constants, not inputs
    graph.ClearField("initializer")
    graph.initializer.extend(t for t in kept if t.name in used)
    graph.ClearField("input")
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)  # IR 3 requires every initializer to be a graph input
    _drop_final_softmax(graph)
    if opset is not None:
        # onnxruntime's quantize_static keeps opset 11 and then writes per-channel DequantizeLinear
        # with an axis, which needs opset 13: benchmarks give both tools the same opset-13 file.
        model = version_converter.convert_version(model, opset)
    onnx.checker.check_model(model, full_check=True)
    return model


def _parameter(name: str, fills: dict, inits: dict, producers: dict) -> str | None:
    """The constant behind an input (directly or through Unsqueeze/Reshape), or None for an activation."""
    if name in fills or name in inits:
        return name
    node = producers.get(name)
    if node is not None and node.op_type in ("Unsqueeze", "Reshape"):
        return _parameter(node.input[0], fills, inits, producers)
    return None


def _param_shape(name: str, fills: dict, inits: dict) -> tuple[int, ...]:
    if name in fills:
        return tuple(int(d) for d in numpy_helper.to_array(inits[fills[name].input[0]]))
    return tuple(inits[name].dims)


def _init_value(kind: str, shape: tuple[int, ...], node: onnx.NodeProto,
                rng: np.random.Generator) -> np.ndarray:
    if kind != "he":
        return np.full(shape, 1.0 if kind == "ones" else 0.0, np.float32)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        fan_in = shape[1] if trans_b else shape[0]
    else:
        fan_in = int(np.prod(shape[1:]))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))


def _drop_final_softmax(graph: onnx.GraphProto) -> None:
    for out in graph.output:
        node = next((n for n in graph.node if out.name in n.output), None)
        if node is None or node.op_type != "Softmax":
            continue
        logits = node.input[0]
        graph.node.remove(node)
        for n in graph.node:  # the logits take the output's name, so the graph output keeps its name
            n.output[:] = [out.name if o == logits else o for o in n.output]
            n.input[:] = [out.name if i == logits else i for i in n.input]
