"""The pass library, installed as ``qinject.passes``, one pass per module, grouped by layer:

- ``transforms``: fold-constants, fold-conv-affine, upgrade-opset, calibrate, insert-qdq (+ its
  modes), lower-jax-to-onnx;
- ``target``: profile-target, fit-target, estimate-cost;
- ``sensitivity``: the signal passes (quant-error, noise, hessian, interlayer, bit-error);
- ``rounding``: AdaRound and bias correction;
- ``search``: bisection, greedy, ILP and the Pareto sweep.

The groups sit on different layers (docs/ARCHITECTURE.md): the runtime runs what ``transforms``
write, and the analyses above it run the runtime. This package is the facade over all of them, so it
imports none: ``from qinject.passes import InsertQDQ`` loads the module that defines the name on
first access (a module ``__getattr__``), and importing one group never loads the groups above it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Calibrate": "transforms.calibrate", "FoldConstants": "transforms.fold_constants",
    "FoldConvAffine": "transforms.fold_conv_affine", "InsertQDQ": "transforms.insert_qdq",
    "LowerJaxToOnnx": "transforms.lower_jax_to_onnx", "UpgradeOpset": "transforms.upgrade_opset",
    "EstimateCost": "target.estimate_cost", "FitMeasured": "target.fit_measured", "FitTarget": "target.fit_target",
    "ProfileTarget": "target.profile_target",
    "AdaRound": "rounding.adaround", "BiasCorrection": "rounding.bias_correction",
    "Bisection": "search", "Greedy": "search", "Ilp": "search", "Pareto": "search",
    "SEARCH_PASSES": "search",
}
# Old spellings the README once showed, still accepted: the class each now names.
_RENAMED = {"FoldConstantWeights": "FoldConstants"}


def __getattr__(name: str) -> object:
    name = _RENAMED.get(name, name)
    if name in _WHERE:
        return getattr(importlib.import_module(f"qinject.passes.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'qinject.passes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = ["SEARCH_PASSES", "AdaRound", "BiasCorrection", "Bisection", "Calibrate", "EstimateCost",
           "FitMeasured", "FitTarget", "FoldConstants", "FoldConvAffine", "Greedy", "Ilp", "InsertQDQ",
           "LowerJaxToOnnx", "Pareto", "ProfileTarget", "UpgradeOpset"]
