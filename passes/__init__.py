"""The pass library, installed as ``qinject.passes``: calibration, sensitivity (``sensitivity_*``,
loaded on demand by ``qinject.sensitivity.signal_pass``), search, rewrites, lowering. One pass per
module, named for what it does."""

from __future__ import annotations

from qinject.passes.adaround import AdaRound
from qinject.passes.bias_correction import BiasCorrection
from qinject.passes.calibrate import Calibrate
from qinject.passes.estimate_cost import EstimateCost
from qinject.passes.fold_conv_affine import FoldConvAffine
from qinject.passes.fold_constants import FoldConstantWeights
from qinject.passes.insert_qdq import InsertQDQ
from qinject.passes.lower_jax_to_onnx import LowerJaxToOnnx
from qinject.passes.search_bisection import BisectionSearch
from qinject.passes.search_greedy import GreedySearch
from qinject.passes.search_ilp import IlpSearch
from qinject.passes.search_pareto import ParetoSweep
from qinject.passes.upgrade_opset import UpgradeOpset

SEARCH_PASSES = {"bisection": BisectionSearch, "greedy": GreedySearch, "ilp": IlpSearch, "pareto": ParetoSweep}

__all__ = ["SEARCH_PASSES", "AdaRound", "BiasCorrection", "BisectionSearch", "Calibrate", "EstimateCost",
           "FoldConstantWeights", "FoldConvAffine", "GreedySearch", "IlpSearch", "InsertQDQ", "LowerJaxToOnnx",
           "ParetoSweep", "UpgradeOpset"]
