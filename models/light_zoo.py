"""The light model zoo shipped inside the ``onnx`` package, made into real float models.

``onnx/backend/test/data/light/light_*.onnx`` are the structures of classic ImageNet nets (ResNet-50,
DenseNet-121, Inception v1/v2, SqueezeNet, ShuffleNet, VGG-19, AlexNet, ZFNet-512) with every weight
replaced by a ``ConstantOfShape`` fill. A constant weight makes a degenerate network (every output
equal), useless for measuring quantization fidelity. ``materialize`` keeps the structure and gives
every Conv/Gemm weight deterministic He-normal values, biases small random values, and
BatchNormalization an identity (scale 1, mean 0, var 1, small bias); it drops the final Softmax so
fidelity is measured on logits. Other constants keep their original fill.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

NAMES = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512")


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def materialize(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light zoo model ``name`` with deterministic random weights and its Softmax removed."""
    model = onnx.load(str(light_dir() / f"light_{name}.onnx"))
    graph = model.graph
    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in graph.initializer}
    roles = _roles(graph)
    folded, kept = [], []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            fill = numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0] if node.attribute else 0.0
            folded.append(numpy_helper.from_array(_value(roles.get(node.output[0]), shape, fill, rng),
                                                  node.output[0]))
        else:
            kept.append(node)
    for name_, init in list(inits.items()):
        role = roles.get(name_)
        if role is not None and role[0] == "bn":
            init.CopyFrom(numpy_helper.from_array(_value(role, tuple(init.dims), 0.0, rng), name_))
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(folded)
    _drop_trailing_softmax(graph)
    input_names = {i.name for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in input_names]
    del graph.input[:]
    graph.input.extend(real_inputs)
    model.ir_version = max(model.ir_version, 4)
    _set_output_shape(model)
    return model


def _roles(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """What each constant feeds: ('weight', fan_in_axis_hint), ('bias', 0) or ('bn', input index)."""
    roles: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            roles[node.input[1]] = ("weight", 1 if (node.op_type == "Conv" or trans_b) else 0)
            if len(node.input) > 2:
                roles[node.input[2]] = ("bias", 0)
        elif node.op_type == "BatchNormalization":
            for i in range(1, 5):
                roles[node.input[i]] = ("bn", i)
    return roles


def _value(role: tuple[str, int] | None, shape: tuple[int, ...], fill: float,
           rng: np.random.Generator) -> np.ndarray:
    if role is None:
        return np.full(shape, fill, dtype=np.float32)
    kind, hint = role
    if kind == "weight":
        # He-normal: fan-in is everything but the output-channel axis.
        fan_in = int(np.prod(shape[1:])) if hint == 1 else shape[0]
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if kind == "bias" or (kind == "bn" and hint == 2):
        return (rng.standard_normal(shape) * 0.01).astype(np.float32)
    return np.full(shape, 1.0 if hint in (1, 4) else 0.0, dtype=np.float32)


def _drop_trailing_softmax(graph: onnx.GraphProto) -> None:
    last = graph.node[-1]
    if last.op_type == "Softmax" and last.output[0] == graph.output[0].name:
        producer_out = last.input[0]
        graph.node.remove(last)
        graph.output[0].name = producer_out


def _set_output_shape(model: onnx.ModelProto) -> None:
    """Give the (new) graph output the shape inference finds for it."""
    out = model.graph.output[0]
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in inferred.graph.value_info:
        if vi.name == out.name:
            out.type.CopyFrom(vi.type)


def save_all(folder: Path, names: tuple[str, ...] = NAMES, seed: int = 0) -> dict[str, Path]:
    """Write materialised models to ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        paths[name] = folder / f"{name}.onnx"
        onnx.save(materialize(name, seed), str(paths[name]))
    return paths
