"""The reference models shipped inside the ``onnx`` package (``onnx/backend/test/data``), each with its
inputs and expected outputs, run through ``qinject quantize``'s pipeline at a given plan.

``simple/``, ``pytorch-operator/`` and ``pytorch-converted/`` hold a folder per model with
``test_data_set_0/{input,output}_N.pb``. ``light/`` holds ``light_NAME.onnx`` beside
``light_NAME_output_0.pb`` only: onnx's backend runner feeds each float input
``arange(n).reshape(shape) / n`` (symbolic dims as 1), and so does ``_light_set``.

``run_case`` classifies each model:

- ``ok``: a checker-valid quantized model that onnxruntime runs, whose outputs match the shipped
  reference outputs within the bound (SQNR over all outputs, in dB);
- ``refused``: a ``QinjectError`` naming the reason (no quantizable op; an op onnxruntime cannot
  run; an opset the version converter cannot lift);
- ``mismatch``: it ran but missed the bound;
- ``crash``: any other exception (a bug).
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qinject.core.numerics import sqnr_db

SUITES = ("light", "simple", "pytorch-operator", "pytorch-converted")


def data_dir() -> Path:
    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


def cases(suites: tuple[str, ...] = SUITES) -> list[Path]:
    """Each model's folder, or for ``light/`` the model file itself."""
    found = []
    for suite in suites:
        for p in (data_dir() / suite).iterdir():
            if (p / "model.onnx").is_file() or (p.suffix == ".onnx" and p.name.startswith("light_")):
                found.append(p)
    return sorted(found)


def model_path(case: Path) -> Path:
    return case if case.suffix == ".onnx" else case / "model.onnx"


@dataclass
class Outcome:
    name: str
    status: str  # ok | refused | mismatch | crash
    detail: str = ""
    sqnr_db: float = float("nan")


def _load_set(case: Path, model: onnx.ModelProto) -> tuple[dict, list]:
    if case.suffix == ".onnx":
        return _light_set(case, model)
    sets = sorted(glob.glob(str(case / "test_data_set_*")))
    inputs, outputs = {}, []
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    folder = Path(sets[0])
    for i, name in enumerate(names):
        f = folder / f"input_{i}.pb"
        if f.exists():
            inputs[name] = _read(f)
    j = 0
    while (folder / f"output_{j}.pb").exists():
        outputs.append(_read(folder / f"output_{j}.pb"))
        j += 1
    return inputs, outputs


def _light_set(path: Path, model: onnx.ModelProto) -> tuple[dict, list]:
    """The inputs onnx's backend runner generates for a light model, and its shipped outputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {}
    for x in model.graph.input:
        if x.name in initializers:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        inputs[x.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    outputs = [_read(path.with_name(f"{path.stem}_output_{i}.pb")) for i in range(len(model.graph.output))]
    return inputs, outputs


def _read(path: Path) -> object:
    data = path.read_bytes()
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(data)
        if tensor.data_type:
            return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001  (sequences are stored as SequenceProto)
        pass
    seq = onnx.SequenceProto()
    seq.ParseFromString(data)
    return [numpy_helper.to_array(t) for t in seq.tensor_values]


def _sqnr(refs: list, outs: list) -> float:
    """SQNR over every float output; positions that are NaN (or the same infinity) in both agree."""
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in refs])
    out = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs])
    same = (np.isnan(ref) & np.isnan(out)) | (np.isinf(ref) & (ref == out))
    if np.any(~same & ~(np.isfinite(ref) & np.isfinite(out))):
        return float("-inf")
    kept = ~same
    return sqnr_db(ref[kept], out[kept]) if kept.any() else float("inf")


def run_case(case: Path, plan: object, bound_db: float) -> Outcome:
    import qinject
    from qinject.backends import onnx_backend
    from qinject.core.errors import QinjectError

    name = f"{case.parent.name}/{case.stem if case.suffix == '.onnx' else case.name}"
    try:
        proto = onnx.load(str(model_path(case)))
        inputs, refs = _load_set(case, proto)
        if any(isinstance(v, list) for v in inputs.values()) or any(isinstance(r, list) for r in refs):
            return Outcome(name, "refused", "sequence inputs or outputs (qinject calibrates tensors only)")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            # force: these check numerics, not speed (grouped convolutions would otherwise stay float)
            qinject.quantize_onnx(model_path(case), out, plan=plan, calib=[inputs], progress=False, force=True)
            onnx.checker.check_model(str(out), full_check=True)
            sess = onnx_backend.session(out)
            got = sess.run(None, inputs)
        if len(got) != len(refs) or any(np.shape(g) != np.shape(r) for g, r in zip(got, refs)):
            return Outcome(name, "mismatch", "output shapes differ")
        floats = [(g, r) for g, r in zip(got, refs) if np.asarray(r).dtype.kind == "f"]
        exact = [(g, r) for g, r in zip(got, refs) if np.asarray(r).dtype.kind != "f"]
        if any(not np.array_equal(g, r) for g, r in exact):
            return Outcome(name, "mismatch", "integer/bool outputs differ")
        if not floats:
            return Outcome(name, "ok", "no float output", float("inf"))
        sqnr = _sqnr([r for _, r in floats], [g for g, _ in floats])
        return Outcome(name, "ok" if sqnr >= bound_db else "mismatch", f"{sqnr:.1f} dB", sqnr)
    except QinjectError as exc:
        return Outcome(name, "refused", str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001  (a crash: reported with its type)
        return Outcome(name, "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
