"""Real data for the magika model: its ONNX file, real files, and magika's own features of them.

Magika (Google's file-type detector) ships a small ONNX model inside its wheel. Its input is not
the raw file: magika reads the first and last blocks, strips whitespace, pads, and concatenates
them into one int32 row. ``magika_features`` runs magika's own code for all of that, so the
calibration and test inputs are exactly what magika feeds its model in production.

The files come from places every install of this project has: the Python standard library and
the virtualenv's site-packages. They are picked deterministically and spread over file extensions,
so the sets cover many of magika's content types rather than mostly Python source.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import sysconfig
from collections import defaultdict
from pathlib import Path

import numpy as np

MIN_SIZE = 64
# Per extension at most this many files, so .py (thousands of files) cannot crowd out the rest.
PER_EXTENSION = 24
CALIB_FRACTION = 0.25
# Global site-packages sit inside the stdlib folder on some installs; they are not the stdlib.
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", ".git"})


def magika_model_path() -> Path:
    """The ``model.onnx`` shipped in the installed magika package (whatever its version folder)."""
    models = Path(str(importlib.resources.files("magika"))) / "models"
    found = sorted(models.glob("*/model.onnx"))
    if not found:
        raise FileNotFoundError(f"no models/*/model.onnx in the magika package at {str(models)!r}")
    # Several model folders can ship; the one magika uses by default is the one worth testing.
    default_name = getattr(_magika_class(), "_get_default_model_name", lambda: None)()
    default = models / str(default_name) / "model.onnx"
    return default if default in found else found[-1]


def magika_features(paths: list[Path]) -> np.ndarray:
    """The int32 [N, beg_size + mid_size + end_size] rows magika's model takes, one per path.

    Both steps are magika's own code: per-file feature extraction
    (``_get_result_or_features_from_path``) and the assembly of the model input
    (``_get_raw_predictions``), whose onnxruntime call is intercepted to record its input.

    Raises:
        ValueError: a path that magika labels without its model (empty, too small, or only
            whitespace), so it has no model input.
    """
    if not paths:
        raise ValueError("magika_features needs at least one path")
    magika = _magika()
    features = []
    for path in paths:
        result, feats = magika._get_result_or_features_from_path(Path(path))
        if feats is None:
            status = getattr(result, "status", None)
            raise ValueError(f"magika labels {str(path)!r} without its model (status {status}); "
                             "pick files from real_files(), which keeps only files the model sees")
        features.append((Path(path), feats))
    capture = _CaptureSession(len(magika._target_labels_space))
    original = magika._onnx_session
    magika._onnx_session = capture
    try:
        magika._get_raw_predictions(features)
    finally:
        magika._onnx_session = original
    return np.concatenate(capture.inputs).astype(np.int32, copy=False)


def real_files(seed: int = 0) -> tuple[list[Path], list[Path]]:
    """A calibration list and a disjoint held-out list of real files on this machine.

    Candidates: files of at least ``MIN_SIZE`` bytes under the stdlib and the venv's
    site-packages. They are grouped by extension, each group shuffled by a seeded RNG over sorted
    paths and cut to ``PER_EXTENSION`` files; a quarter of each group calibrates, the rest is held
    out. Files magika labels without its model, and files whose model input duplicates one
    already taken, are skipped, so the two lists never share an input.

    Returns:
        (calibration, held_out), each sorted.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in _candidates():
        groups[_extension(path)].append(path)
    rng = np.random.default_rng(seed)
    magika = _magika()
    seen: set[bytes] = set()
    calib: list[Path] = []
    held_out: list[Path] = []
    for ext in sorted(groups):
        members = sorted(groups[ext])
        taken = []
        for i in rng.permutation(len(members)):
            if len(taken) == PER_EXTENSION:
                break
            key = _model_input_key(magika, members[i])
            if key is not None and key not in seen:
                seen.add(key)
                taken.append(members[i])
        n_calib = round(len(taken) * CALIB_FRACTION)
        calib += taken[:n_calib]
        held_out += taken[n_calib:]
    return sorted(calib), sorted(held_out)


def _candidates() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"]),
             Path(sysconfig.get_paths()["platlib"])}
    found: set[Path] = set()
    for root in sorted(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_size >= MIN_SIZE:
                        found.add(path)
                except OSError:
                    continue
    return sorted(found)


def _extension(path: Path) -> str:
    # Version suffixes (libfoo.so.1.2) say nothing about content; the last other suffix does.
    suffixes = [s.lower() for s in path.suffixes if not s[1:].isdigit()]
    return suffixes[-1] if suffixes else ""


def _model_input_key(magika: object, path: Path) -> bytes | None:
    """A digest of the model input magika builds for ``path``; None if it uses no model."""
    try:
        if not os.access(path, os.R_OK):
            return None
        _, feats = magika._get_result_or_features_from_path(path)
    except OSError:
        return None
    if feats is None:
        return None
    return hashlib.sha256(np.asarray(feats.beg + feats.mid + feats.end, dtype=np.int32).tobytes()).digest()


class _CaptureSession:
    """Stands in for magika's onnxruntime session and records the input rows it is given."""

    def __init__(self, n_labels: int) -> None:
        self.n_labels = n_labels
        self.inputs: list[np.ndarray] = []

    def run(self, output_names: list[str], feeds: dict[str, object]) -> list[np.ndarray]:
        (rows,) = feeds.values()
        batch = np.asarray(rows, dtype=np.int32)
        self.inputs.append(batch)
        return [np.zeros((len(batch), self.n_labels), dtype=np.float32)]


def _magika_class() -> type:
    from magika import Magika

    return Magika


@functools.lru_cache(maxsize=1)
def _magika() -> object:
    return _magika_class()()
