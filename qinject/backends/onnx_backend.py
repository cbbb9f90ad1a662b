"""The ONNX backend: serialise the IR, check it, write it atomically, and run it with onnxruntime."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qinject.backends.onnx_narrow import widen_four_bit_activations
from qinject.core import ir as qir
from qinject.core.errors import QinjectError

# Protobuf cannot hold more than 2 GiB; above this size weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as ONNX, its 4-bit activation Q/DQ pairs in the form onnxruntime loads
    (``onnx_narrow``: Clip -> 8-bit Q/DQ, the same numbers), annotated with no more intermediate
    shapes than its source file was (``qinject.ir.ANNOTATED_VALUES``), so that onnxruntime fuses
    the rewrite as it fuses the float model."""
    proto = ir.serde.serialize_model(model)
    widen_four_bit_activations(proto)
    annotated = model.graph.meta.get(qir.ANNOTATED_VALUES)
    if annotated is not None:
        kept = [info for info in proto.graph.value_info if info.name in annotated]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
    inputs = {i.name for i in proto.graph.input}
    if proto.ir_version < 4 and any(t.name not in inputs for t in proto.graph.initializer):
        # Before IR version 4 every initializer had to be a graph input too; folding constants
        # creates initializers, and version 4 is the same format otherwise.
        proto.ir_version = 4
    return proto


def check(proto_or_path: onnx.ModelProto | str | os.PathLike) -> None:
    """onnx.checker's full check (types and shapes included); one-line QinjectError on failure."""
    try:
        target = str(proto_or_path) if isinstance(proto_or_path, (str, os.PathLike)) else proto_or_path
        onnx.checker.check_model(target, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QinjectError(f"the quantized model fails onnx.checker: {first}") from None


def save(model: ir.Model, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
         external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically and check it; never overwrite ``input_path``.

    The file is written next to its destination under a temporary name, checked, run once by
    onnxruntime on the sample feed calibration kept (``qinject.ir.SAMPLE_FEED``), then renamed, so a
    failure leaves no half-written output, an existing file at ``path`` is untouched, and no file
    onnxruntime cannot run is ever written.
    """
    feed = model.meta.get(qir.SAMPLE_FEED)
    path = Path(path)
    check_output_path(path, input_path)
    proto = to_proto(model)
    if external_data is None:
        external_data = _byte_size(proto) > EXTERNAL_DATA_THRESHOLD
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{path.name}.data"
    tmp_data = path.parent / f".{data_name}.tmp"
    try:
        if external_data:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            check(tmp)  # while its references still name the temporary data file
            run_once(tmp, feed)
            _relocate_external_data(tmp, data_name)
        else:
            onnx.save_model(proto, str(tmp))
            check(tmp)
            run_once(tmp, feed)
        if external_data and tmp_data.exists():  # no data file when every tensor is under the threshold
            os.replace(tmp_data, path.parent / data_name)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    return path


def run_once(path: Path, feed: dict[str, np.ndarray] | None) -> None:
    """Load the written model in onnxruntime (all optimisations, as users run it) and, given a feed,
    run it once; a one-line QinjectError if it cannot."""
    try:
        sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        if feed is not None:
            names = {i.name for i in sess.get_inputs()}
            sess.run(None, {k: v for k, v in feed.items() if k in names})
    except Exception as exc:  # noqa: BLE001  (onnxruntime's own exception types)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QinjectError(f"onnxruntime cannot run the quantized model, so it was not written: {first}") from None


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file keeps any tensor in external data (then its output does too)."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(proto))


def _write_mapping_external_data(proto: onnx.ModelProto, weights: dict[str, ir.TensorProtocol]
                                 ) -> tuple[Path, dict[str, ir.TensorProtocol]] | None:
    """A temporary model file from which onnxruntime maps the external-data weights itself, and the
    weights still to hand over as buffers; or None.

    onnxruntime copies initializers handed over as buffers (measured: a 0.77 GB model took 0.7 GB
    more), but maps external data it loads itself. So when every stubbed weight of ``proto`` lives in
    external data of one folder, the proto is written there under a hidden temporary name with the
    stubs pointing at that data (the caller removes it). None when there is no such data or the
    folder is not writable (the caller hands every weight over as a buffer).
    """
    external = {n: t for n, t in weights.items() if isinstance(t, ir.ExternalTensor) and t.base_dir}
    folders = {str(t.base_dir) for t in external.values()}
    if not external or len(folders) != 1:
        return None
    try:
        fd, name = tempfile.mkstemp(prefix=".qinject-session-", suffix=".onnx", dir=folders.pop())
    except OSError:
        return None
    mapped = onnx.ModelProto()
    mapped.CopyFrom(proto)
    for init in mapped.graph.initializer:
        tensor = external.get(init.name)
        if tensor is None:
            continue
        del init.external_data[:]
        for key, value in (("location", tensor.location), ("offset", str(tensor.offset or 0)),
                           ("length", str(tensor.length if tensor.length is not None else tensor.nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    with os.fdopen(fd, "wb") as f:
        f.write(mapped.SerializeToString())
    return Path(name), {n: t for n, t in weights.items() if n not in external}


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> None:
    """Refuse an output in a missing folder or on top of the input model."""
    path = Path(path)
    if not path.parent.is_dir():
        raise QinjectError(f"output folder {str(path.parent)!r} does not exist")
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise QinjectError(f"output path {str(path)!r} is the input model; choose another name")


def _byte_size(proto: onnx.ModelProto) -> float:
    try:
        return proto.ByteSize()
    except ValueError:  # protobuf refuses to size a message over 2 GiB
        return float("inf")


def _relocate_external_data(model_path: Path, final_location: str) -> None:
    """Point the external-data references at the final file name before the rename."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = final_location
    onnx.save_model(proto, str(model_path))


def session_options(threads: int | None = None, optimized_path: str | None = None,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False`` for timing: idle worker threads that spin fight for the cores with
    whatever else runs on the machine, the next session timed included."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return opts


def session(model: ir.Model | onnx.ModelProto | str | os.PathLike,
            options: ort.SessionOptions | None = None,
            weights: dict[str, ir.TensorProtocol] | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for an IR model, a proto or a file.

    ``weights`` supplies the tensors of a weightless proto (see ``weightless``) without copying them.
    """
    if isinstance(model, ir.Model):
        with qir.weightless(model, numpy_only=True) as stubbed:
            return session(to_proto(model), options, stubbed)
    options = options or session_options()
    mapped = _write_mapping_external_data(model, weights) if weights and isinstance(model, onnx.ModelProto) else None
    if mapped is not None:
        source, weights = str(mapped[0]), mapped[1]
    else:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    arrays = [np.ascontiguousarray(t.numpy()) for t in (weights or {}).values()]  # no copy: arrays since load
    if arrays:
        options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        sess._qinject_weights = arrays  # read in place by onnxruntime: keep alive
    except Exception as exc:  # onnxruntime raises its own exception types for unsupported models
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QinjectError(f"onnxruntime cannot run the model: {first}") from None
    finally:
        if mapped is not None:
            mapped[0].unlink(missing_ok=True)
    return sess


def all_values(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor one float run of the main graph computes, by name (the feeds included), with
    graph optimisations off so that every value keeps its name."""
    proto = to_proto(model)
    known = {v.name for v in proto.graph.output}
    for node in model.graph:
        for value in node.outputs:
            if value.name and value.name not in known and value.dtype is not None:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None))
    sess = session(proto, session_options(level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
    names = [o.name for o in sess.get_outputs()]
    try:
        outputs = sess.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QinjectError(f"onnxruntime cannot run the model: {first}") from None
    return {**feeds, **dict(zip(names, outputs))}
