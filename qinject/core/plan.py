"""The plan: per-node quantization choices, and its JSON file format.

File format (version 1)::

    {"format": "qinject-plan", "version": 1,
     "default": {"weights": 8, "activations": 8},
     "nodes": {"conv1": {"weights": 4}, "fc2": "float"}}

``default`` applies to every quantizable node; ``nodes`` overrides it per node name, field by
field. The string ``"float"`` leaves a node (or, as the default, every node) unquantized. Fields of a
choice, with their defaults:

=====================  =======  =====================================================
field                  default  meaning
=====================  =======  =====================================================
weights                8        weight bits: 4, 8 or 16
activations            8        activation bits: 4, 8 or 16
weight_signed          true     int weights (false: uint)
activation_signed      false    uint activations (onnxruntime's fastest CPU kernels are u8s8)
weight_symmetric       true     zero point 0 for weights
activation_symmetric   false    asymmetric activations use the whole code range
per_channel            true     one weight scale per output channel (false: per tensor)
mode                   static   how the node runs (below)
block_size             32       weight-only: weights per scale along the reduction axis
=====================  =======  =====================================================

Execution modes (``mode``):

- ``static``: Q/DQ on weights and activations with calibrated activation scales; onnxruntime runs
  QLinearConv / QGemm / QLinearMatMul at 8 bits.
- ``dynamic``: int8 weights, activations quantized at run time from their own range (no calibrated
  scale); MatMul, Gemm and LSTM, 8-bit only. Written as DynamicQuantizeLinear -> MatMulInteger, which
  onnxruntime fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat, and for LSTM as onnxruntime's
  DynamicQuantizeLSTM (LSTM has no static form: a static choice leaves it float).
- ``weight-only``: 4- or 8-bit weights in blocks of ``block_size`` along the reduction axis,
  activations stay float (``activations`` is ignored). For MatMul/Gemm onnxruntime fuses the
  block-wise DequantizeLinear into MatMulNBits; other ops run the dequantized float weight.

Plan files written before modes existed have no ``mode`` field and load unchanged as ``static``.

Written files are canonical (sorted keys, node fields written only where they differ from the
default), so reading and writing a plan round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qinject.core.errors import PlanError
from qinject.core.jsonfile import read_json
from qinject.core.numerics import QType

FORMAT = "qinject-plan"
VERSION = 1
FLOAT = "float"
STATIC, DYNAMIC, WEIGHT_ONLY = "static", "dynamic", "weight-only"
MODES = (STATIC, DYNAMIC, WEIGHT_ONLY)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True, kw_only=True)
class NodeQuant:
    """How one node is quantized."""

    weights: int = 8
    activations: int = 8
    weight_signed: bool = True
    activation_signed: bool = False
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    per_channel: bool = True
    mode: str = STATIC
    block_size: int = 32

    def __post_init__(self) -> None:
        for name in ("weights", "activations"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or bits not in (4, 8, 16):
                raise PlanError(f"plan field {name!r} must be 4, 8 or 16, got {bits!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"plan field {name!r} must be true or false, got {getattr(self, name)!r}")
        if self.mode not in MODES:
            raise PlanError(f"plan field 'mode' must be one of {list(MODES)}, got {self.mode!r}")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise PlanError(f"plan field 'block_size' must be one of {list(BLOCK_SIZES)}, got {self.block_size!r}")
        if self.mode == DYNAMIC and (self.weights, self.activations) != (8, 8):
            raise PlanError(f"mode 'dynamic' runs 8-bit weights and activations (onnxruntime's "
                            f"DynamicQuantizeMatMul), got W{self.weights}A{self.activations}")
        if self.mode == WEIGHT_ONLY and self.weights == 16:
            raise PlanError("mode 'weight-only' takes 4- or 8-bit weights, got 16")

    @property
    def quantizes_activations(self) -> bool:
        """Whether calibrated Q/DQ pairs go on the activations (static mode only)."""
        return self.mode == STATIC

    @property
    def label(self) -> str:
        """How the choice reads in reports: "W8A8", "W8A8 dynamic", "W4 weight-only/32"."""
        if self.mode == WEIGHT_ONLY:
            return f"W{self.weights} weight-only/{self.block_size}"
        text = f"W{self.weights}A{self.activations}"
        return text if self.mode == STATIC else f"{text} {self.mode}"

    @property
    def weight_qtype(self) -> QType:
        return QType(self.weights, self.weight_signed)

    @property
    def activation_qtype(self) -> QType:
        return QType(self.activations, self.activation_signed)

    @property
    def min_opset(self) -> int:
        """The default-domain opset this choice needs: per-axis Q/DQ is opset 13, int4/int16 and
        block-wise Q/DQ (weight-only) opset 21."""
        if self.mode == WEIGHT_ONLY:
            return 21
        need = max(self.weight_qtype.min_opset, self.activation_qtype.min_opset)
        return max(need, 13) if self.per_channel else need


_FIELDS = {f.name for f in dataclasses.fields(NodeQuant)}
_FLAGS = ("weight_signed", "activation_signed", "weight_symmetric", "activation_symmetric", "per_channel")


@dataclass
class Plan:
    """A default choice for every quantizable node plus per-node overrides (None means float)."""

    default: NodeQuant | None = field(default_factory=NodeQuant)
    nodes: dict[str, NodeQuant | None] = field(default_factory=dict)

    @classmethod
    def uniform(cls, weights: int = 8, activations: int = 8, per_channel: bool = True) -> Plan:
        return cls(NodeQuant(weights=weights, activations=activations, per_channel=per_channel))

    def choice(self, node_name: str) -> NodeQuant | None:
        return self.nodes.get(node_name, self.default)

    def min_opset(self) -> int:
        choices = [c for c in [self.default, *self.nodes.values()] if c is not None]
        return max((c.min_opset for c in choices), default=1)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        base = self.default or NodeQuant()
        nodes = {}
        for name, q in sorted(self.nodes.items()):
            nodes[name] = FLOAT if q is None else {
                k: v for k, v in dataclasses.asdict(q).items() if v != getattr(base, k)}
        out: dict = {"format": FORMAT, "version": VERSION,
                     "default": FLOAT if self.default is None else _nondefault(self.default)}
        if nodes:
            out["nodes"] = nodes
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(", ", ": ")) + "\n"

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a JSON object, found {type(data).__name__}")
        unknown = set(data) - {"format", "version", "default", "nodes"}
        if unknown:
            raise PlanError(f"{source}: unknown key(s) {sorted(unknown)} (expected format, version, default, nodes)")
        if data.get("format", FORMAT) != FORMAT:
            raise PlanError(f"{source}: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version", VERSION) != VERSION:
            raise PlanError(f"{source}: plan version {data.get('version')!r} is not supported (expected {VERSION})")
        default = _choice(data.get("default", {}), None, f"{source}: default")
        raw_nodes = data.get("nodes", {})
        if not isinstance(raw_nodes, dict):
            raise PlanError(f"{source}: 'nodes' must be an object mapping node names to choices")
        nodes = {name: _choice(v, default, f"{source}: node {name!r}") for name, v in raw_nodes.items()}
        return cls(default, nodes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        data = read_json(path, "plan file", PlanError)
        return cls.from_dict(data, source=f"plan file {str(path)!r}")

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def _nondefault(q: NodeQuant) -> dict:
    return {k: v for k, v in dataclasses.asdict(q).items() if v != getattr(NodeQuant(), k)}


def _choice(value: object, base: NodeQuant | None, where: str) -> NodeQuant | None:
    if value == FLOAT or value is None:
        return None
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected an object of fields or \"float\", found {value!r}")
    unknown = set(value) - _FIELDS
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)} (expected some of {sorted(_FIELDS)})")
    try:
        return dataclasses.replace(base or NodeQuant(), **value)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None
