"""Rewrites and the calibration they read: constant folding, Conv affine folding, the opset upgrade,
calibration, the Q/DQ insertion, the SkipLayerNormalization split and the JAX-to-ONNX lowering. Above
core, the backends and cost; below the runtime, which runs their output."""

from __future__ import annotations

import onnx_ir as ir
from qinject.passes.transforms.calibrate import Calibrate
from qinject.passes.transforms.fold_constants import FoldConstants
from qinject.passes.transforms.fold_conv_affine import FoldConvAffine
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.passes.transforms.lower_jax_to_onnx import LowerJaxToOnnx
from qinject.passes.transforms.split_skip_layernorm import SplitSkipLayerNorm
from qinject.passes.transforms.upgrade_opset import UpgradeOpset

from qinject.core import op_facts
from qinject.core.pass_manager import Pass
from qinject.core.plan import Plan


def prepare() -> list[Pass]:
    """What every pipeline runs first, and what the cost model sees: the constant chains feeding
    weights folded, Conv affines fused."""
    return [FoldConstants(), FoldConvAffine()]


def rewrite(plan: Plan, calib: object, method: str = "minmax", batch_size: int = 16, percentile: float = 99.99,
            progress: bool = True) -> list[Pass]:
    """A plan applied as it stands (no target, no search): prepare, the opset the plan needs,
    calibrate, insert Q/DQ. The profiler quantizes its microbenchmarks with it; the standard
    pipeline (``qinject.compiler.pipelines``) adds the target and search passes between its steps."""
    return [*prepare(), UpgradeOpset(plan.min_opset()),
            Calibrate(calib, method=method, batch_size=batch_size, progress=progress),
            InsertQDQ(plan, method=method, percentile=percentile)]


def keep_slow_kernels_float(model: ir.Model, plan: Plan) -> tuple[Plan, dict[str, str]]:
    """The plan with nodes whose CPU integer kernel is slower than float left float (unless the plan
    names them), and why, per node."""

    kept = {n.name: reason for n in model.graph.all_nodes()  # weights may not be folded yet: by op
            if op_facts.fact(n).quantizable and n.name not in plan.nodes and plan.choice(n.name) is not None
            and (reason := op_facts.slower_on_cpu(n)) is not None}
    if not kept:
        return plan, {}
    return Plan(plan.default, {**plan.nodes, **dict.fromkeys(kept)}), kept


__all__ = ["Calibrate", "FoldConstants", "FoldConvAffine", "InsertQDQ", "LowerJaxToOnnx", "SplitSkipLayerNorm",
           "UpgradeOpset", "keep_slow_kernels_float", "prepare", "rewrite"]
