"""Plugins: a pass, an op fact and a latency target from an installed package's entry points.

The package is ``tests/plugin_pkg``. It is installed into a temporary site folder the way pip lays
it out (the package plus a ``.dist-info`` holding its entry points), and every check runs in a fresh
interpreter with that folder on ``sys.path``, so discovery goes through ``importlib.metadata`` as it
does for any installed package and this test process stays free of the plugin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "plugin_pkg"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(PLUGIN / "qinject_demo_plugin", site / "qinject_demo_plugin")
    info = site / "qinject_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qinject-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [qinject.passes]
        tag-nodes = qinject_demo_plugin:TagNodes

        [qinject.op_facts]
        demo-ops = qinject_demo_plugin:FACTS
        demo-einsum = qinject_demo_plugin.einsum:FACTS

        [qinject.targets]
        demo-npu = qinject_demo_plugin:TABLE
        """))
    return site


def _python(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_plugin_pass_is_listed_and_runs_from_a_pipeline(site):
    r = _python(site, """
        import sys
        from qinject.cli import main
        sys.argv = ["qinject", "passes", "tag-nodes"]
        try:
            main()
        except SystemExit:
            pass
        import qinject
        from qinject.core.pass_manager import PassManager
        from qinject.compiler.registry import build
        model = qinject.load_onnx("models/digits_cnn/model.onnx")
        PassManager(build("tag-nodes{label=ab,repeat=2}")).run(model)
        print("tags", {n.meta["demo.tag"] for n in model.graph}, model.meta["demo.count"] == len(list(model.graph)))
    """)
    assert r.returncode == 0, r.stderr
    assert "tag-nodes  [plugin qinject-demo-plugin]" in r.stdout
    assert "label: str = demo  (what to write)" in r.stdout
    assert "tags {'abab'} True" in r.stdout


def test_plugin_op_fact_makes_a_custom_op_quantizable(site):
    r = _python(site, """
        import numpy as np, onnx
        from onnx import helper, TensorProto
        import qinject
        from qinject.core import ir as qir
        from qinject.passes import InsertQDQ
        from qinject.plan import Plan
        w = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MyDense", ["x", "w"], ["y"], name="dense", domain="demo.ops")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
            [onnx.numpy_helper.from_array(w, "w")])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("demo.ops", 1)])
        model = qinject.load_onnx(proto)
        print("quantizable", [n.name for n in qir.quantizable_nodes(model)])
        # onnxruntime cannot run the custom op, so its input range is given instead of calibrated.
        from qinject.core.stats import TensorStats
        stats = TensorStats()
        stats.update(np.linspace(-1, 1, 64, dtype=np.float32))
        model.graph.inputs[0].meta[qir.ACT_STATS] = stats
        InsertQDQ(Plan.uniform(8, 8))(model)
        dq = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.outputs[0].uses()
              and next(iter(n.outputs[0].uses())).node.name == "dense"]
        print("weight axis", [n.attributes["axis"].value for n in dq if n.inputs[0].const_value is not None])
    """)
    assert r.returncode == 0, r.stderr
    assert "quantizable ['dense']" in r.stdout
    assert "weight axis [0]" in r.stdout  # per channel along the plugin's channel axis


def test_plugin_makes_a_standard_op_quantizable_end_to_end(site):
    """Einsum, not quantizable in qinject itself, from one op-facts entry and its JAX integer kernel
    (``qinject_demo_plugin.einsum``): insert-qdq writes Q/DQ around it, onnxruntime runs the result,
    and the JAX backend runs it simulated and on int8."""
    r = _python(site, """
        import jax, numpy as np, onnx, onnxruntime as ort
        from onnx import helper, TensorProto
        import qinject
        from qinject.backends import onnx_backend
        from qinject.backends.jax_backend import Program, to_jax
        from qinject.core import ir as qir, op_facts
        from qinject.core.pass_manager import PassManager
        from qinject.passes.transforms import rewrite
        from qinject.plan import Plan
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((8, 6)) / 3).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Einsum", ["x", "w"], ["y"], name="einsum", equation="bsk,kn->bsn"),
             helper.make_node("Relu", ["y"], ["out"], name="relu")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 6])],
            [onnx.numpy_helper.from_array(w, "w")])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        x = rng.standard_normal((2, 3, 8)).astype(np.float32)
        model = qinject.load_onnx(proto)
        print("quantizable", [n.name for n in qir.quantizable_nodes(model)])
        model = PassManager(rewrite(Plan.uniform(8, 8), [{"x": x}], progress=False)).run(model).model
        einsum = next(n for n in model.graph if n.name == "einsum")
        fed = [v.producer().op_type if v.producer() else None for v in einsum.inputs]
        weight_dq = einsum.inputs[1].producer()
        print("inputs", fed, "weight axis", weight_dq.attributes["axis"].value, "codes",
              weight_dq.inputs[0].const_value.numpy().dtype)
        float_out = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
        written = onnx_backend.to_proto(model)
        ort_out = ort.InferenceSession(written.SerializeToString()).run(None, {"x": x})[0]
        simulated = np.asarray(jax.jit(to_jax(model, "simulated"))(x))
        integer = np.asarray(jax.jit(to_jax(model, "integer"))(x))
        print("kernels", sorted(Program(model, "integer").kernels))
        scale = float(np.abs(float_out).max())
        print("ort vs float", float(np.abs(ort_out - float_out).max()) / scale < 0.05)
        print("simulated vs ort", float(np.abs(simulated - ort_out).max()) / scale < 1e-5)
        print("integer vs simulated", float(np.abs(integer - simulated).max()) / scale < 1e-4)
        print("integer differs from float", bool(np.abs(integer - float_out).max() > 0))
    """)
    assert r.returncode == 0, r.stderr
    assert "quantizable ['einsum']" in r.stdout
    assert "inputs ['DequantizeLinear', 'DequantizeLinear'] weight axis 1 codes int8" in r.stdout
    assert "kernels ['einsum']" in r.stdout  # the plugin's integer kernel runs it on int8
    assert "ort vs float True" in r.stdout
    assert "simulated vs ort True" in r.stdout
    assert "integer vs simulated True" in r.stdout
    assert "integer differs from float True" in r.stdout


def test_plugin_target_is_selectable_by_name(site):
    r = _python(site, """
        import sys
        from qinject.cli import main
        sys.argv = ["qinject", "cost", "models/digits_cnn/model.onnx", "--target", "demo-npu", "--top", "2"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        sys.argv = ["qinject", "targets"]
        try:
            main()
        except SystemExit:
            pass
    """)
    assert r.returncode == 0, r.stderr
    assert "estimated latency on demo-npu" in r.stdout
    assert "demo-npu" in r.stdout and "a made-up NPU from a plugin" in r.stdout


def test_without_the_plugin_nothing_leaks(tmp_path):
    r = _python(tmp_path, """
        from qinject.compiler.registry import passes
        print("tag-nodes" in passes())
    """)
    assert r.returncode == 0 and r.stdout.strip() == "False"
