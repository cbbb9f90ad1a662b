"""A tiny third-party plugin for qinject's tests: one pass, one quantizable op, one latency target.

Declared through entry points (``tests/plugin_pkg/pyproject.toml``); the tests install it by putting
its folder and a ``.dist-info`` with the same entry points on ``sys.path``, which is what ``pip install``
produces, so ``importlib.metadata`` finds it as it finds any installed package.
"""

from __future__ import annotations

from qinject.compiler.registry import Option
from qinject.core.op_facts import OpFact
from qinject.core.pass_manager import Pass, PassResult


class TagNodes(Pass):
    """Write ``label`` into every node's meta (``demo.tag``) and count the nodes (an analysis)."""

    name = "tag-nodes"
    analysis = True
    options = (Option("label", str, "demo", "what to write"), Option("repeat", int, 1, "times to write it"))

    def __init__(self, label: str = "demo", repeat: int = 1) -> None:
        self.label, self.repeat = label, repeat

    def call(self, model):
        for node in model.graph:
            node.meta["demo.tag"] = self.label * self.repeat
        model.meta["demo.count"] = len(list(model.graph))
        return PassResult(model, False)


# A custom-domain dense layer: y = x @ W^T, weight at input 1, output channel on axis 0.
FACTS = {("demo.ops", "MyDense"): OpFact(quantizable=True, activation_inputs=(0,), weight_input=1,
                                         channel_axis=lambda node: 0)}

TABLE = {"format": "qinject-latency-table", "version": 1, "target": "demo-npu", "kind": "analytic",
         "description": "a made-up NPU from a plugin", "source": "tests",
         "roofline": {"peak_ops_per_s": {"fp32": 1e12, "fp16": 4e12, "int8": 8e12, "int4": 1.6e13},
                      "memory_bytes_per_s": 1e11, "op_overhead_us": 1.0, "sixteen_bit": "fp16"}}
