"""The pass library, installed as ``qinject.passes``: calibration, rewrites, lowering, and (later)
sensitivity and search. One pass per module, named for what it does."""

from __future__ import annotations

from qinject.passes.calibrate import Calibrate
from qinject.passes.estimate_cost import EstimateCost
from qinject.passes.fold_conv_affine import FoldConvAffine
from qinject.passes.fold_constants import FoldConstantWeights
from qinject.passes.insert_qdq import InsertQDQ
from qinject.passes.lower_jax_to_onnx import LowerJaxToOnnx
from qinject.passes.upgrade_opset import UpgradeOpset

__all__ = ["Calibrate", "EstimateCost", "FoldConstantWeights", "FoldConvAffine", "InsertQDQ", "LowerJaxToOnnx", "UpgradeOpset"]
