"""The pass library, installed as ``qinject.passes``: calibration, sensitivity (``sensitivity_*``,
loaded on demand by ``qinject.sensitivity.signal_pass``), search, rewrites, lowering. One pass per
module, named for what it does. The searches and AdaRound/bias correction (scipy, optax) load on
first use, so a plain quantize does not import them."""

from __future__ import annotations

import importlib

from qinject.passes.calibrate import Calibrate
from qinject.passes.estimate_cost import EstimateCost
from qinject.passes.fit_target import FitTarget
from qinject.passes.fold_conv_affine import FoldConvAffine
from qinject.passes.fold_constants import FoldConstantWeights
from qinject.passes.insert_qdq import InsertQDQ
from qinject.passes.lower_jax_to_onnx import LowerJaxToOnnx
from qinject.passes.profile_target import ProfileTarget
from qinject.passes.upgrade_opset import UpgradeOpset

_LAZY = {"AdaRound": "adaround", "BiasCorrection": "bias_correction", "BisectionSearch": "search_bisection",
         "GreedySearch": "search_greedy", "IlpSearch": "search_ilp", "ParetoSweep": "search_pareto"}
_SEARCHES = {"bisection": "BisectionSearch", "greedy": "GreedySearch", "ilp": "IlpSearch", "pareto": "ParetoSweep"}


def __getattr__(name: str) -> object:
    if name == "SEARCH_PASSES":
        return {algo: __getattr__(cls) for algo, cls in _SEARCHES.items()}
    if name in _LAZY:
        return getattr(importlib.import_module(f"qinject.passes.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qinject.passes' has no attribute {name!r}")

__all__ = ["SEARCH_PASSES", "AdaRound", "BiasCorrection", "BisectionSearch", "Calibrate", "EstimateCost",
           "FitTarget", "FoldConstantWeights", "FoldConvAffine", "GreedySearch", "IlpSearch", "InsertQDQ",
           "LowerJaxToOnnx", "ParetoSweep", "ProfileTarget", "UpgradeOpset"]
