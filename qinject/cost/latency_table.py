"""Hardware latency tables: what each op costs at each bit width on a target.

File format (version 1, JSON)::

    {"format": "qinject-latency-table", "version": 1,
     "target": "nvidia-a100", "kind": "analytic",            # or "measured"
     "description": "...", "source": "where the numbers come from (datasheet, profiler run)",
     "roofline": {"peak_ops_per_s": {"fp32": 1.95e13, "fp16": 3.12e14, "int8": 6.24e14, "int4": 1.248e15},
                  "memory_bytes_per_s": 2.039e12, "op_overhead_us": 4.0, "sixteen_bit": "fp16"},
     "entries": [{"op": "Conv", "shape": "1x64x56x56;64x64x3x3->1x64x56x56",
                  "weight_bits": 8, "activation_bits": 8, "latency_us": 41.5}]}

``entries`` are measurements keyed by (op type, shape signature, weight bits, activation bits,
execution mode); bits 32 mean float32. ``mode`` (``qinject.plan.MODES``) is written only where it is
not ``static``, so tables from before modes load unchanged; a weight-only entry has activation bits 32. Conversions between precision regions are entries too, with op
``QuantizeLinear`` / ``DequantizeLinear`` and shape ``x<elements>`` (weight bits 0). The
``roofline`` prices whatever the entries lack: a node takes ``max(2 * MACs / peak, bytes /
bandwidth) + overhead``, where one multiply-accumulate counts as two operations (the spec-sheet
convention). Precisions: ``fp32``, ``fp16`` (fp16 or bf16 units), ``int16``, ``int8``, ``int4``;
``sixteen_bit`` says whether a 16-bit layer runs as ``fp16`` or ``int16``; the optional
``run_overhead_us`` is paid once per inference (a runtime's dispatch and thread wake-up).

Tables are selected by name (a built-in target in ``qinject/cost/targets``, or one saved by
``qinject profile`` under the user's cache) or by path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qinject.core.errors import QinjectError
from qinject.core.jsonfile import read_json
from qinject.core.plan import MODES, STATIC

FORMAT = "qinject-latency-table"
VERSION = 1
KINDS = ("measured", "analytic")
PRECISIONS = ("fp32", "fp16", "int16", "int8", "int4")
FLOAT_BITS = 32
BUILTIN_DIR = Path(__file__).resolve().parent / "targets"
# (m, k, n) of the MatMul a measured table's roofline peaks are timed on (``qinject.profiler.fit_roofline``):
# the cost module's fallback knows that size as a measurement of the table's own kernels.
PEAK_MATMUL = (256, 1024, 1024)


class LatencyTableError(QinjectError):
    """A latency table is missing, malformed, or of an unsupported version."""


@dataclass(frozen=True)
class Roofline:
    """The analytic model of a target: peaks per precision, bandwidth, a fixed cost per op."""

    peak_ops_per_s: dict[str, float]
    memory_bytes_per_s: float
    op_overhead_us: float = 0.0
    sixteen_bit: str = "fp16"
    notes: str = ""
    run_overhead_us: float = 0.0  # paid once per inference, whatever the graph (a runtime's dispatch)

    def precision(self, weight_bits: int, activation_bits: int) -> str:
        """The compute precision a node of these bit widths runs at on this target.

        Float (32) if either side is float; 16 bits as the target's ``sixteen_bit``; int4 only when
        both sides are 4-bit; otherwise int8. A precision the target lacks falls back to the next
        wider one it has (int4 -> int8 -> fp16 -> fp32).
        """
        widest = max(weight_bits, activation_bits)
        if widest >= FLOAT_BITS:
            wanted = "fp32"
        elif widest == 16:
            wanted = self.sixteen_bit
        elif widest <= 4:
            wanted = "int4"
        else:
            wanted = "int8"
        order = ["int4", "int8", "int16", "fp16", "fp32"]
        for candidate in order[order.index(wanted):]:
            if candidate in self.peak_ops_per_s:
                return candidate
        return max(self.peak_ops_per_s, key=lambda p: order.index(p))

    def node_us(self, macs: int, bytes_moved: float, precision: str) -> float:
        """Roofline time of one op: compute- or memory-bound, plus the fixed overhead."""
        compute = 2.0 * macs / self.peak_ops_per_s[precision] if macs else 0.0
        memory = bytes_moved / self.memory_bytes_per_s
        return max(compute, memory) * 1e6 + self.op_overhead_us

    def to_dict(self) -> dict:
        out = {"peak_ops_per_s": dict(sorted(self.peak_ops_per_s.items())),
               "memory_bytes_per_s": self.memory_bytes_per_s, "op_overhead_us": self.op_overhead_us,
               "sixteen_bit": self.sixteen_bit}
        if self.run_overhead_us:
            out["run_overhead_us"] = self.run_overhead_us
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass(frozen=True)
class Entry:
    """One measured latency."""

    op: str
    shape: str
    weight_bits: int
    activation_bits: int
    latency_us: float
    mode: str = STATIC

    @property
    def key(self) -> tuple[str, str, int, int, str]:
        return (self.op, self.shape, self.weight_bits, self.activation_bits, self.mode)


@dataclass
class LatencyTable:
    """A target's latency table: measured entries plus the roofline for everything else."""

    target: str
    kind: str
    roofline: Roofline
    description: str = ""
    source: str = ""
    entries: dict[tuple[str, str, int, int, str], Entry] = field(default_factory=dict)

    def lookup(self, op: str, shape: str, weight_bits: int, activation_bits: int, mode: str = STATIC
               ) -> float | None:
        entry = self.entries.get((op, shape, weight_bits, activation_bits, mode))
        return None if entry is None else entry.latency_us

    def add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "target": self.target, "kind": self.kind,
                "description": self.description, "source": self.source, "roofline": self.roofline.to_dict(),
                "entries": [{"op": e.op, "shape": e.shape, "weight_bits": e.weight_bits,
                             "activation_bits": e.activation_bits, "latency_us": e.latency_us,
                             **({"mode": e.mode} if e.mode != STATIC else {})}
                            for e in sorted(self.entries.values(), key=lambda e: e.key)]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise LatencyTableError(f"output folder {str(path.parent)!r} does not exist")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: object, source: str = "latency table") -> LatencyTable:
        if not isinstance(data, dict):
            raise LatencyTableError(f"{source}: expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise LatencyTableError(f"{source}: 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise LatencyTableError(f"{source}: version {data.get('version')!r} is not supported (expected {VERSION})")
        unknown = set(data) - {"format", "version", "target", "kind", "description", "source", "roofline", "entries"}
        if unknown:
            raise LatencyTableError(f"{source}: unknown key(s) {sorted(unknown)}")
        target = _text(data, "target", source, required=True)
        kind = _text(data, "kind", source, required=True)
        if kind not in KINDS:
            raise LatencyTableError(f"{source}: 'kind' must be one of {list(KINDS)}, got {kind!r}")
        table = cls(target, kind, _roofline(data.get("roofline"), source),
                    _text(data, "description", source), _text(data, "source", source))
        entries = data.get("entries", [])
        if not isinstance(entries, list):
            raise LatencyTableError(f"{source}: 'entries' must be a list")
        for i, raw in enumerate(entries):
            table.add(_entry(raw, f"{source}: entry {i}"))
        return table

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        data = read_json(path, "latency table", LatencyTableError)
        return cls.from_dict(data, source=f"latency table {str(path)!r}")


def builtin_targets() -> list[str]:
    """Names of the tables shipped with qinject and saved in the user's profile cache."""
    names = {p.stem for p in BUILTIN_DIR.glob("*.json")} | {p.stem for p in user_dir().glob("*.json")}
    return sorted(names)


def user_dir() -> Path:
    """Where ``qinject profile`` keeps tables selectable by name (``QINJECT_TARGETS`` overrides)."""
    base = os.environ.get("QINJECT_TARGETS")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qinject" / "targets"


# Tables from plugins by target name (``qinject.targets`` entry points), registered by the compiler
# layer's plugin loader (``qinject.compiler.plugins.load``, which the CLI and the API call first).
PLUGIN_TARGETS: dict[str, LatencyTable] = {}


def register_target(table: LatencyTable) -> None:
    """Make ``table`` selectable by its target name (a plugin's; a file or built-in name wins)."""
    PLUGIN_TARGETS[table.target] = table


def load_target(name_or_path: str | os.PathLike) -> LatencyTable:
    """A table by path (anything ending in .json or naming a file), else by target name.

    A table in the user's cache (``qinject profile``) shadows a built-in one of the same name.
    """
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        return LatencyTable.load(path)
    for folder in (user_dir(), BUILTIN_DIR):
        candidate = folder / f"{text}.json"
        if candidate.is_file():
            return LatencyTable.load(candidate)
    if text in PLUGIN_TARGETS:
        return PLUGIN_TARGETS[text]
    known = builtin_targets() + sorted(PLUGIN_TARGETS)
    raise LatencyTableError(f"unknown target {text!r}: not a file, and not one of {known}")


# -- validation helpers -----------------------------------------------------------------------------------
def _text(data: dict, key: str, source: str, required: bool = False) -> str:
    value = data.get(key, None)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise LatencyTableError(f"{source}: {key!r} must be a non-empty string")
    return value


def _number(data: dict, key: str, where: str, positive: bool = True, default: float | None = None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= 0 if positive else value < 0):
        need = "a positive number" if positive else "a number >= 0"
        raise LatencyTableError(f"{where}: {key!r} must be {need}, got {value!r}")
    return float(value)


def _roofline(raw: object, source: str) -> Roofline:
    where = f"{source}: roofline"
    if not isinstance(raw, dict):
        raise LatencyTableError(f"{where} must be an object with peak_ops_per_s and memory_bytes_per_s")
    unknown = set(raw) - {"peak_ops_per_s", "memory_bytes_per_s", "op_overhead_us", "sixteen_bit", "notes",
                          "run_overhead_us"}
    if unknown:
        raise LatencyTableError(f"{where}: unknown key(s) {sorted(unknown)}")
    peaks = raw.get("peak_ops_per_s")
    if not isinstance(peaks, dict) or not peaks:
        raise LatencyTableError(f"{where}: 'peak_ops_per_s' must map precisions {list(PRECISIONS)} to ops/s")
    bad = sorted(set(peaks) - set(PRECISIONS))
    if bad:
        raise LatencyTableError(f"{where}: unknown precision(s) {bad} (expected some of {list(PRECISIONS)})")
    parsed = {p: _number(peaks, p, f"{where}: peak_ops_per_s") for p in peaks}
    sixteen = raw.get("sixteen_bit", "fp16")
    if sixteen not in ("fp16", "int16"):
        raise LatencyTableError(f"{where}: 'sixteen_bit' must be 'fp16' or 'int16', got {sixteen!r}")
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise LatencyTableError(f"{where}: 'notes' must be a string")
    return Roofline(parsed, _number(raw, "memory_bytes_per_s", where),
                    _number(raw, "op_overhead_us", where, positive=False, default=0.0), sixteen, notes,
                    _number(raw, "run_overhead_us", where, positive=False, default=0.0))


def _entry(raw: object, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise LatencyTableError(f"{where}: expected an object")
    unknown = set(raw) - {"op", "shape", "weight_bits", "activation_bits", "latency_us", "mode"}
    if unknown:
        raise LatencyTableError(f"{where}: unknown key(s) {sorted(unknown)}")
    for key in ("op", "shape"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise LatencyTableError(f"{where}: {key!r} must be a non-empty string")
    bits = {}
    for key in ("weight_bits", "activation_bits"):
        value = raw.get(key)
        if isinstance(value, bool) or value not in (0, 4, 8, 16, 32):
            raise LatencyTableError(f"{where}: {key!r} must be 0, 4, 8, 16 or 32, got {value!r}")
        bits[key] = value
    mode = raw.get("mode", STATIC)
    if mode not in MODES:
        raise LatencyTableError(f"{where}: 'mode' must be one of {list(MODES)}, got {mode!r}")
    return Entry(raw["op"], raw["shape"], bits["weight_bits"], bits["activation_bits"],
                 _number(raw, "latency_us", where), mode)
