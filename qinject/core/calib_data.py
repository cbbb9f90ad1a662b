"""Calibration data: every accepted source turned into a stream of onnxruntime feed dicts.

Sources: an ``.npz`` keyed by model input names (first axis = samples), a folder of ``.npy``/``.npz``
files, a dict of arrays, one array (single-input models), any iterable of feed dicts, an object with
onnxruntime's ``CalibrationDataReader`` interface (``get_next()`` returning a dict, then None), or
nothing (random inputs of the right shapes, with a warning). Arrays are read lazily (``np.load(mmap_mode='r')`` for
``.npy``) and yielded a batch at a time, so memory is one batch whatever the number of samples.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qinject.core.errors import CalibrationDataError


class QinjectWarning(UserWarning):
    """A warning the CLI prints as one line."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    # Integer inputs that index a table (token ids into an embedding): its row count, for random inputs.
    index_bound: int | None = None

    @property
    def batch_fixed(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for v in model.graph.inputs:
        if v.dtype is None or v.shape is None:
            raise CalibrationDataError(f"model input {v.name!r} has no tensor type and shape")
        shape = tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in v.shape)
        specs.append(InputSpec(v.name, np.dtype(v.dtype.numpy()), shape, _index_bound(v)))
    return specs


def _index_bound(value: ir.Value) -> int | None:
    """Rows of the constant table an integer input gathers from (through Casts), if any."""
    bounds = []
    frontier = [value]
    while frontier:
        for node, index in frontier.pop().uses():
            if node.op_type == "Cast":
                frontier.extend(node.outputs)
            elif node.op_type == "Gather" and index == 1:
                table = node.inputs[0]
                if table is not None and table.shape is not None and isinstance(table.shape[0], int):
                    bounds.append(table.shape[0])
    return min(bounds) if bounds else None


@dataclass
class CalibrationSource:
    """An iterable of feed dicts with an optional known length (for progress bars)."""

    batches: Iterable[dict[str, np.ndarray]]
    total: int | None
    description: str
    synthetic: bool = False  # random inputs: a model that fails on them needs real data, not a fix

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)


def open_source(source: object, specs: list[InputSpec], batch_size: int = 16,
                random_samples: int = 16, seed: int = 0) -> CalibrationSource:
    """Turn any accepted calibration source into a stream of validated feed dicts."""
    if source is None:
        warnings.warn(f"no calibration data given: calibrating on {random_samples} random inputs; "
                      "the scales will not fit real data", QinjectWarning, stacklevel=2)
        source = _from_arrays(random_arrays(specs, random_samples, seed), specs, batch_size, "random inputs")
        source.synthetic = True
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _from_folder(path, specs, batch_size)
        if not path.is_file():
            raise CalibrationDataError(f"calibration data {str(path)!r} does not exist")
        return _from_arrays(_read_npz(path), specs, batch_size, str(path))
    if isinstance(source, np.ndarray):
        if len(specs) != 1:
            raise CalibrationDataError(f"a bare array calibrates a single-input model, but this one has inputs "
                                       f"{[s.name for s in specs]}; pass a dict keyed by input name")
        return _from_arrays({specs[0].name: source}, specs, batch_size, "array")
    if isinstance(source, Mapping):
        return _from_arrays(dict(source), specs, batch_size, "arrays")
    if hasattr(source, "get_next"):
        return CalibrationSource(_validated(_reader_iter(source), specs, "data reader"), None, "data reader")
    if isinstance(source, Iterable):
        total = len(source) if hasattr(source, "__len__") else None
        return CalibrationSource(_validated(iter(source), specs, "feeds"), total, "feeds")
    raise CalibrationDataError(f"cannot use a {type(source).__name__} as calibration data "
                               "(expected a path, a dict of arrays, an iterable of feed dicts or a data reader)")


def _read_npz(path: Path) -> dict[str, np.ndarray | _LazyNpzArray]:
    """Arrays of a calibration file, without reading their data yet (.npy: memory-mapped;
    .npz: streamed from the archive member a batch at a time)."""
    try:
        if path.suffix == ".npy":
            return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".npy")]
        return {m[:-4]: _LazyNpzArray(path, m) for m in members}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"cannot read calibration file {str(path)!r}: {exc}") from None


class _LazyNpzArray:
    """One array of an .npz, read sequentially in slices of its first axis.

    ``np.load`` on an .npz decompresses a whole array at once; this reads only the rows asked for,
    so calibration memory is one batch however large the file.
    """

    def __init__(self, path: Path, member: str, shape: tuple[int, ...] | None = None) -> None:
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as archive, archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                file_shape, fortran, self.dtype = np.lib.format.read_array_header_1_0(f)
            else:
                file_shape, fortran, self.dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if fortran and len(file_shape) > 1:
            raise CalibrationDataError(f"{path}: array {member[:-4]!r} is Fortran-ordered; save it C-ordered")
        if self.dtype.hasobject:
            raise CalibrationDataError(f"{path}: array {member[:-4]!r} holds Python objects")
        self.shape = tuple(shape or file_shape)
        self._stream = None
        self._row = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read_all(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as archive:
            return archive[self.member[:-4]].reshape(self.shape)

    def reshape(self, *shape: int) -> _LazyNpzArray:
        rows = int(np.prod(self.shape)) // int(np.prod(shape[1:]))
        return _LazyNpzArray(self.path, self.member, (rows, *shape[1:]))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        if self._stream is None or start != self._row:
            self._open_at(start)
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        data = self._stream.read((stop - start) * row_bytes)
        self._row = stop
        if stop >= len(self):
            self._close()
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])

    def _open_at(self, row: int) -> None:
        self._close()
        self._archive = zipfile.ZipFile(self.path)
        self._stream = self._archive.open(self.member)
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._stream.seek(self.offset + row * row_bytes)
        self._row = row

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._archive.close()
            self._stream = None


def rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Samples in a dict of input arrays (first axis); a 0-d array (a scalar input such as an If's
    mode) is one value for every sample."""
    return next((len(a) for a in inputs.values() if np.ndim(a)), 1)


def take(inputs: Mapping[str, np.ndarray], idx: np.ndarray | slice) -> dict[str, np.ndarray]:
    """Rows ``idx`` of every batched input; scalar inputs as they are."""
    return {k: a[idx] if np.ndim(a) else a for k, a in inputs.items()}


def largest_uniform_group(batches: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    """The calibration batches that share one shape (and one value of each scalar input) with the
    most samples, concatenated; and how many groups there were. Analyses and searches measure on
    arrays of one shape; calibration itself takes every batch."""
    groups: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for b in batches:
        key = tuple((k, a.shape[1:] if a.ndim else ("value", a.item())) for k, a in sorted(b.items()))
        groups.setdefault(key, []).append(b)
    best = max(groups.values(), key=lambda g: sum(rows(b) for b in g))
    return {k: np.concatenate([b[k] for b in best]) if best[0][k].ndim else best[0][k] for k in best[0]}, len(groups)


def _from_folder(path: Path, specs: list[InputSpec], batch_size: int) -> CalibrationSource:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise CalibrationDataError(f"calibration folder {str(path)!r} has no .npy or .npz files")
    sources = [_from_arrays(_read_npz(f), specs, batch_size, str(f)) for f in files]
    total = sum(s.total or 0 for s in sources)

    def chain() -> Iterator[dict[str, np.ndarray]]:
        for s in sources:
            yield from s

    return CalibrationSource(chain(), total, str(path))


def _from_arrays(arrays: dict[str, np.ndarray | _LazyNpzArray], specs: list[InputSpec], batch_size: int,
                 label: str) -> CalibrationSource:
    if "" in arrays:  # a bare .npy: only meaningful for a single-input model
        if len(specs) != 1:
            raise CalibrationDataError(f"{label}: a .npy file holds one array but the model has "
                                       f"{len(specs)} inputs; use an .npz keyed by input name")
        arrays = {specs[0].name: arrays.pop("")}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationDataError(f"{label} lacks model input(s) {missing} (it has {sorted(arrays)})")
    samples = {s.name: _as_samples(arrays[s.name], s, label) for s in specs}
    counts = {len(a) for a in samples.values() if a.ndim}
    if len(counts) > 1:
        raise CalibrationDataError(f"{label}: inputs have different sample counts {sorted(counts)}")
    n = counts.pop() if counts else 1
    if n == 0:
        raise CalibrationDataError(f"{label} is empty (0 samples)")
    scalars = {s.name for s in specs if not s.shape}
    for name in scalars:  # one value for every sample, or one per sample
        samples[name] = np.broadcast_to(np.asarray(samples[name]), (n,))
    fixed = [s.batch_fixed for s in specs if s.batch_fixed is not None]
    # A scalar input (an If's mode, a Loop's trip count) is one value per run: one sample per run.
    step = min(fixed) if fixed else 1 if scalars else batch_size
    usable = n - n % step if fixed else n  # a fixed batch cannot take a short last batch
    if usable == 0:
        raise CalibrationDataError(f"{label} has {n} samples, fewer than the model's fixed batch of {step}")

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, usable, step):
            # np.require keeps a scalar input 0-d (np.ascontiguousarray would make it shape [1])
            feed = {s.name: np.require(samples[s.name][start] if s.name in scalars else
                                       samples[s.name][start:start + step], dtype=s.dtype, requirements="C")
                    for s in specs}
            _check_finite(feed, label)
            yield feed

    return CalibrationSource(batches(), math.ceil(usable / step), label)


def _as_samples(array: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """Present ``array`` as [samples, *model input shape] flattened into the batch axis."""
    rank = len(spec.shape)
    if rank == 0 and array.ndim <= 1:  # scalar inputs: broadcast or one value per sample, by the caller
        return array.read_all() if isinstance(array, _LazyNpzArray) else np.asarray(array)
    if array.ndim == rank + 1 and spec.batch_fixed is not None:
        array = array.reshape(-1, *array.shape[2:])  # [samples, batch, ...] -> [samples*batch, ...]
    if array.ndim != rank:
        raise CalibrationDataError(f"{label}: input {spec.name!r} has shape {list(array.shape)} but the model "
                                   f"expects rank {rank} {list(spec.shape)} (first axis = samples)")
    _check_compatible(array, spec, label)
    return array


def _check_compatible(array: np.ndarray, spec: InputSpec, label: str) -> None:
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and got != want:
            raise CalibrationDataError(f"{label}: input {spec.name!r} has shape {list(array.shape)} but the "
                                       f"model expects {list(spec.shape)} (axis {axis}: {got} != {want})")
    if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
        raise CalibrationDataError(f"{label}: input {spec.name!r} has dtype {array.dtype} but the model "
                                   f"expects {spec.dtype}")


def _check_finite(feed: dict[str, np.ndarray], label: str) -> None:
    for name, array in feed.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise CalibrationDataError(f"{label}: input {name!r} contains NaN or Inf")


def _validated(feeds: Iterator[object], specs: list[InputSpec], label: str) -> Iterator[dict[str, np.ndarray]]:
    seen = False
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise CalibrationDataError(f"{label}: item {i} is a {type(feed).__name__}, expected a dict of arrays")
        out = {}
        for s in specs:
            if s.name not in feed:
                raise CalibrationDataError(f"{label}: item {i} lacks model input {s.name!r}")
            array = np.asarray(feed[s.name])
            if array.ndim and array.shape[0] == 0:
                raise CalibrationDataError(f"{label}: item {i} input {s.name!r} has no rows (shape "
                                           f"{list(array.shape)})")
            if array.ndim != len(s.shape):
                raise CalibrationDataError(f"{label}: item {i} input {s.name!r} has shape {list(array.shape)}, "
                                           f"expected {list(s.shape)}")
            _check_compatible(array, s, f"{label}: item {i}")
            out[s.name] = np.require(array, dtype=s.dtype, requirements="C")
        _check_finite(out, f"{label}: item {i}")
        seen = True
        yield out
    if not seen:
        raise CalibrationDataError(f"{label} yielded no calibration batches")


def _reader_iter(reader: object) -> Iterator[object]:
    while (item := reader.get_next()) is not None:
        yield item


# Sizes random inputs give symbolic dims: image-like spatial dims (the last two of a rank-4 float
# input) get a size every common stride divides; any other dim a short sequence.
RANDOM_SPATIAL = 224
RANDOM_LENGTH = 16


def random_arrays(specs: list[InputSpec], n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` random samples per input. Symbolic dims that share a name share one size across inputs
    (``batch``, ``sequence``); token ids stay inside the table they index; masks are ones."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    out = {}
    for s in specs:
        dims = []
        for axis, d in enumerate(s.shape[1:], start=1):
            if isinstance(d, int):
                dims.append(d)
                continue
            guess = RANDOM_SPATIAL if len(s.shape) == 4 and axis >= 2 and s.dtype.kind == "f" else RANDOM_LENGTH
            dims.append(sizes.setdefault(d, guess) if d else guess)
        shape = (n * (s.batch_fixed or 1), *dims) if s.shape else (n,)
        if s.dtype.kind == "f":
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            out[s.name] = rng.integers(0, 2, shape).astype(bool)
        elif "mask" in s.name.lower():
            out[s.name] = np.ones(shape, s.dtype)
        else:
            out[s.name] = rng.integers(0, min(s.index_bound or 256, 256), shape).astype(s.dtype)
    return out
