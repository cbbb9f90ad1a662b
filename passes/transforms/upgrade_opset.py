"""Upgrade the default-domain opset when the requested quantization needs a newer one.

Per-axis QuantizeLinear/DequantizeLinear needs opset 13; int4 and int16 need opset 21. The upgrade
goes through onnx's version converter, so it runs before any analysis that stores results in
``meta`` (a round trip through protobuf does not keep them).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter

from qinject.core import ir as qir
from qinject.core.errors import UnsupportedModelError
from qinject.core.pass_manager import Pass, PassResult

# QuantizeLinear/DequantizeLinear take float16 and bfloat16 tensors and scales from opset 19.
LOW_PRECISION_FLOATS_OPSET = 19


class UpgradeOpset(Pass):
    """Raise the default-domain opset to at least ``min_opset`` (and to 19 when a quantizable node
    computes in float16 or bfloat16); a no-op if it is already there."""

    name = "upgrade-opset"
    in_place = False

    def __init__(self, min_opset: int) -> None:
        self.min_opset = min_opset

    def call(self, model: ir.Model) -> PassResult:
        current = model.opset_imports.get("", 1)
        target = max(self.min_opset, LOW_PRECISION_FLOATS_OPSET if _low_precision(model) else 0)
        if current >= target:
            return PassResult(model, False)

        def upgrade(proto: onnx.ModelProto) -> onnx.ModelProto:
            upgraded = version_converter.convert_version(proto, target)
            return onnx.shape_inference.infer_shapes(upgraded, data_prop=True)

        try:
            new_model = qir.round_trip(model, upgrade)
        except Exception as exc:  # the converter raises bare RuntimeError/ValueError/C++ errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UnsupportedModelError(
                f"cannot upgrade the model from opset {current} to {target}, which the requested "
                f"quantization needs: {first}") from None
        return PassResult(new_model, True)


def _low_precision(model: ir.Model) -> bool:
    nodes = qir.quantizable_nodes(model) + qir.subgraph_quantizable_nodes(model)
    return any(v is not None and v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
               for n in nodes for v in n.inputs)
