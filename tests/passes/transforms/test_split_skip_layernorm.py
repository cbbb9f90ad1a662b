"""split-skip-layernorm: the Adds onnxruntime would fuse with their LayerNormalization into
SkipLayerNormalization are written as Sum (the same function), so it runs the two kernels instead;
by default only where fit-measured timed that faster."""

from __future__ import annotations

import numpy as np
import onnx

from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.frontends.onnx_frontend import load_onnx
from qinject.passes.transforms.split_skip_layernorm import SplitSkipLayerNorm, fused_adds
from qinject.runtime.measure import fused_kernels
from tests.builders import post_norm_block, run


def test_the_add_onnxruntime_fuses_becomes_a_sum_and_runs_apart_with_the_same_result(tmp_path, rng) -> None:
    source = tmp_path / "block.onnx"
    onnx.save(post_norm_block(), source)
    assert fused_kernels(source)["SkipLayerNormalization"] == 1  # res1 + ln1; res2 has two readers
    model = load_onnx(source)
    assert [n.name for n in fused_adds(model.graph)] == ["res1"]
    assert not SplitSkipLayerNorm()(model).modified  # fit-measured chose nothing
    assert SplitSkipLayerNorm(always=True)(model).modified
    ops = {n.name: n.op_type for n in model.graph}
    assert (ops["res1"], ops["res2"], ops["out"]) == ("Sum", "Add", "Add")
    split = tmp_path / "split.onnx"
    onnx.save(onnx_backend.to_proto(model), split)
    kernels = fused_kernels(split)
    assert kernels["SkipLayerNormalization"] == 0 and kernels["LayerNormalization"] == 2, kernels
    x = {"x": rng.standard_normal((1, 32, 64)).astype(np.float32)}
    # the fused kernel rounds in its own order: equal to float precision
    np.testing.assert_allclose(run(str(split), x)[0], run(str(source), x)[0], rtol=1e-5, atol=1e-5)


def test_fit_measured_s_choice_is_applied() -> None:
    model = load_onnx(post_norm_block())
    model.meta[qir.SPLIT_SKIP_LAYERNORM] = 0.9
    assert SplitSkipLayerNorm()(model).modified
    assert [n.name for n in model.graph if n.op_type == "Sum"] == ["res1"]
