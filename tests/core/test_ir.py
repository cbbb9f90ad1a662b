from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import VerificationError
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import conv_net


def test_quantizable_nodes_and_macs() -> None:
    model = load_onnx(conv_net(batch=2))
    nodes = {n.name: n for n in qir.quantizable_nodes(model)}
    assert list(nodes) == ["conv1", "conv2", "fc"]
    # conv1: 2 x 8 x 8 x 8 outputs, each 3 x 3 x 3 products.
    assert op_facts.macs(nodes["conv1"]) == 2 * 8 * 8 * 8 * 27
    assert op_facts.macs(nodes["fc"]) == 2 * 10 * 256
    assert op_facts.channel_axis(nodes["fc"]) == 0  # transB=1: weight is [N, K]


def test_networkx_view() -> None:
    g = qir.to_networkx(load_onnx(conv_net()).graph)
    names = [n.name for n in g.nodes]
    assert len(names) == 7
    assert ("conv1", "relu1") in {(u.name, v.name) for u, v in g.edges}


def _two_node_model(order: list[onnx.NodeProto]) -> onnx.ModelProto:
    graph = helper.make_graph(order, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_verifier_reports_use_before_definition() -> None:
    a = helper.make_node("Relu", ["x"], ["y"], name="a")
    b = helper.make_node("Relu", ["y"], ["z"], name="b")
    model = load_onnx(_two_node_model([a, b]))
    qir.verify(model, full=True)
    first = model.graph.node(0)
    model.graph.remove(first)
    model.graph.append(first)  # now 'b' reads 'y' before 'a' defines it
    with pytest.raises(VerificationError, match="node 'b' reads 'y' before it is defined"):
        qir.verify(model)


def test_verifier_reports_cycle() -> None:
    model = load_onnx(_two_node_model([helper.make_node("Add", ["x", "x"], ["y"], name="a"),
                                       helper.make_node("Relu", ["y"], ["z"], name="b")]))
    a, b = model.graph.node(0), model.graph.node(1)
    a.replace_input_with(1, b.outputs[0])
    with pytest.raises(VerificationError, match="cycle"):
        qir.verify(model)
