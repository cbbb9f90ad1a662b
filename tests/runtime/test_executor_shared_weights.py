"""Variants travel without the float model's weights: the workers hold those once, and a variant's
bytes carry only what differs (issue #16), with the outputs of the whole-model path bit for bit."""

from __future__ import annotations

import pickle
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qinject.passes.sensitivity.base import alone

from qinject.core import ir as qir
from qinject.runtime import eval_worker
from qinject.runtime import executor as executor_module
from qinject.runtime.executor import Executor, to_onnx_bytes
from tests.builders import calibrated_jax_mlp
from tests.passes.sensitivity.fixtures import calibrated


def _big_net() -> onnx.ModelProto:
    """x[N,32] -> MatMul(w1[32,64]) -> Relu -> MatMul(big[64,4096], 1 MiB) -> Relu -> MatMul(w3[4096,4])."""
    rng = np.random.default_rng(0)
    weights = {"w1": (32, 64), "big": (64, 4096), "w3": (4096, 4)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in weights.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "big"], ["m2"], name="mm2"),
             helper.make_node("Relu", ["m2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "big_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def case():
    x = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    return calibrated(_big_net(), {"x": x}), {"x": x}


def test_a_one_node_variant_sends_a_fraction_of_the_model_and_gives_its_outputs(case, monkeypatch, tmp_path):
    model, inputs = case
    whole = len(to_onnx_bytes(model))
    assert whole > 1_000_000  # the big weight alone is 1 MiB
    sent: list[int] = []
    call = executor_module._WorkerPool._call

    def spy(self, job):
        sent.append(len(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)))
        return call(self, job)

    monkeypatch.setattr(executor_module._WorkerPool, "_call", spy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the pool writes the shared weights
    nodes = [n.name for n in qir.searchable_nodes(model)]
    assert len(nodes) == 3
    for workers in (2, 1):
        sent.clear()
        with Executor(model, inputs, workers=workers) as ex:
            variants = [ex.model, *(ex.quantized(alone(n, b)) for n in nodes for b in (8, 4))]
            variants.append(ex.with_weight("big", ex.model.graph.initializers["big"].const_value.numpy() * 0.5))
            outputs = ex.run(variants)
            expected = [eval_worker.run_model(to_onnx_bytes(v), inputs) for v in variants]
            assert ex.count == len(variants)
        assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))
        if workers == 2:
            # what the workers received: all but the replaced weight's variant a third of the model at
            # most (a node's integer codes), the float model a hundredth
            assert len(sent) == len(variants) and min(sent) < whole / 100 and sorted(sent)[-2] < whole / 3, sent
            # what each variant sends (the pool's threads may send them in any order)
            sizes = [len(pickle.dumps(executor_module._serialise(v, ex._shared_tensors()),
                                      protocol=pickle.HIGHEST_PROTOCOL)) for v in variants]
            assert sorted(sent) == sorted(sizes)
            assert sizes[0] < whole / 100, sizes  # the float model: every large weight is the workers'
            on_big = nodes.index(next(n.name for n in ex.model.graph if "big" in [i.name for i in n.inputs if i]))
            for k in range(len(nodes)):
                # a node's own weight travels as integer codes, a quarter of its float bytes at most
                limit = whole / 3 if k == on_big else whole / 10
                assert sizes[1 + 2 * k] < limit and sizes[2 + 2 * k] < limit, (k, sizes)
            assert sizes[-1] > whole / 2, sizes  # a replaced weight is no longer the workers'
        else:
            assert sent == []  # one worker runs in this process
    assert list(tmp_path.iterdir()) == []  # the weights file is gone once the workers mapped it


def test_a_jax_sourced_model_keeps_working(tmp_path):
    """JAX nodes are lowered on a clone: tensors the lowering keeps are shared, new ones embedded."""
    model, x = calibrated_jax_mlp(hidden=512)
    assert qir.has_jax_nodes(model)
    with Executor(model, {"x": x}, workers=2) as ex:
        nodes = [n.name for n in qir.searchable_nodes(ex.model)]
        variants = [ex.model, *(ex.quantized(alone(n, 8)) for n in nodes)]
        outputs = ex.run(variants)
        expected = [eval_worker.run_model(to_onnx_bytes(v), {"x": x}) for v in variants]
    assert len(outputs) == 3
    assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))


def test_weights_file_round_trips(tmp_path):
    arrays = {"a": np.arange(300, dtype=np.float32).reshape(10, 30), "b": np.arange(7, dtype=np.int64),
              "c": np.ones((3, 3), dtype=np.float16)}
    index = eval_worker.write_weights(arrays, str(tmp_path / "w.bin"))
    back = eval_worker.map_weights(str(tmp_path / "w.bin"), index)
    assert all(off % eval_worker.ALIGN == 0 for _, _, off in index.values())
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)
        assert not back[name].flags.writeable
