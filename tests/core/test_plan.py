from __future__ import annotations

import json

import pytest

from qinject.core.errors import PlanError
from qinject.plan import NodeQuant, Plan


def test_uniform_plan_is_one_line(tmp_path) -> None:
    path = tmp_path / "plan.json"
    Plan.uniform(8, 8).save(path)
    text = path.read_text()
    assert text.count("\n") == 1
    assert Plan.load(path) == Plan.uniform(8, 8)


def test_round_trip_is_exact(tmp_path) -> None:
    plan = Plan(NodeQuant(weights=8, activations=8, per_channel=False),
                {"conv1": NodeQuant(weights=4, activations=8, per_channel=False), "fc": None,
                 "conv2": NodeQuant(weights=16, activations=16, activation_symmetric=True)})
    path = tmp_path / "p.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    again.save(tmp_path / "q.json")
    assert (tmp_path / "q.json").read_text() == path.read_text()


def test_node_entries_override_default_field_by_field() -> None:
    plan = Plan.from_dict({"default": {"weights": 8, "activations": 16}, "nodes": {"a": {"weights": 4}}})
    assert plan.choice("a") == NodeQuant(weights=4, activations=16)
    assert plan.choice("other") == NodeQuant(weights=8, activations=16)


def test_float_default() -> None:
    plan = Plan.from_dict({"default": "float", "nodes": {"a": {}}})
    assert plan.choice("b") is None and plan.choice("a") == NodeQuant()


@pytest.mark.parametrize("data,message", [
    ({"default": {"weights": 5}}, "must be 4, 8 or 16"),
    ({"default": {"wieghts": 8}}, "unknown field"),
    ({"defaults": {}}, "unknown key"),
    ({"version": 7}, "version 7 is not supported"),
    ({"nodes": []}, "'nodes' must be an object"),
    ({"default": {"per_channel": "yes"}}, "must be true or false"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_plans(data, message) -> None:
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_bad_json_file(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"default": ')
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="cannot read"):
        Plan.load(tmp_path / "missing.json")


def test_min_opset() -> None:
    assert Plan.uniform(8, 8, per_channel=False).min_opset() == 10
    assert Plan.uniform(8, 8).min_opset() == 13
    assert Plan.uniform(4, 8).min_opset() == 21
    assert Plan.from_dict({"default": "float"}).min_opset() == 1
    assert json.loads(Plan.uniform(16, 16).to_json())["default"] == {"activations": 16, "weights": 16}


def test_a_plan_file_from_before_execution_modes_loads_unchanged(tmp_path):
    old = ('{"default": {"activations": 8, "weights": 8}, "format": "qinject-plan", '
           '"nodes": {"conv1": {"weights": 4}, "fc2": "float"}, "version": 1}\n')
    (tmp_path / "old.json").write_text(old)
    plan = Plan.load(tmp_path / "old.json")
    assert plan.choice("conv1").mode == "static" and plan.choice("conv1").weights == 4
    assert plan.choice("fc2") is None and plan.choice("other").label == "W8A8"
    assert Plan.from_dict(json.loads(plan.to_json())) == plan and "mode" not in plan.to_json()


def test_execution_modes_round_trip_and_refuse_what_no_kernel_runs():
    plan = Plan(NodeQuant(), {"fc": NodeQuant(mode="dynamic"),
                              "proj": NodeQuant(weights=4, mode="weight-only", block_size=64)})
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan and again.choice("proj").label == "W4 weight-only/64"
    assert again.choice("fc").label == "W8A8 dynamic" and again.min_opset() == 21
    with pytest.raises(PlanError, match="mode 'dynamic' runs 8-bit weights and activations"):
        Plan.from_dict({"default": {"mode": "dynamic", "weights": 4}})
    with pytest.raises(PlanError, match="'mode' must be one of"):
        Plan.from_dict({"nodes": {"fc": {"mode": "fast"}}})
    with pytest.raises(PlanError, match="'block_size' must be one of"):
        Plan.from_dict({"default": {"mode": "weight-only", "block_size": 48}})
