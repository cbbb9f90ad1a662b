"""Rules: first match wins, unmatched rules reported, JSON round trip, a searched plan re-applied
exactly from its rules file (and after a hand edit), pins respected by the search."""

from __future__ import annotations

import json

import onnx
import pytest

import qinject
from qinject.app.api import SearchOptions
from qinject.core.errors import PlanError
from qinject.core.rules import Rule, Rules
from qinject.plan import NodeQuant
from tests.builders import CNN, run_cli


@pytest.fixture(scope="module")
def model():
    return qinject.load_onnx(CNN / "model.onnx")  # conv1..conv3 (Conv), fc1, fc2 (Gemm)


def test_first_match_wins_and_unmatched_rules_are_reported(model):
    rules = Rules((Rule(name="conv1", skip=True),
                   Rule(name="conv.*", weights=4),  # conv1 already decided above
                   Rule(op_types=("Gemm",), name="fc2", weights=16, activations=16),
                   Rule(name="attention_.*", weights=4),  # no such node
                   Rule(op_types=("MatMul",))))  # no such op here
    plan, unmatched = rules.plan(model)
    assert plan.choice("conv1") is None
    assert plan.choice("conv2") == NodeQuant(weights=4, activations=8)
    assert plan.choice("fc2") == NodeQuant(weights=16, activations=16)
    assert plan.choice("fc1") == NodeQuant()  # the default
    assert [r.name for r in unmatched] == ["attention_.*", None]
    floats = Rules((Rule(name="fc1", weights=8),), default=None).plan(model)[0]
    assert floats.choice("conv1") is None and floats.choice("fc1") == NodeQuant()


def test_json_round_trip_and_errors(tmp_path):
    rules = Rules((Rule(name="conv[12]", op_types=("Conv",), weights=4, comment="small convs"),
                   Rule(name="fc2", skip=True), Rule(op_types=("Gemm",), per_channel=False)), default=None)
    rules.save(tmp_path / "r.json")
    assert Rules.load(tmp_path / "r.json") == rules
    bad = [({"format": "qinject-rules", "version": 1, "rules": [{"name": "("}]}, "is not a regular expression"),
           ({"format": "qinject-rules", "version": 1, "rules": [{"weights": 3}]}, "must be 4, 8 or 16"),
           ({"format": "qinject-rules", "version": 1, "rules": [{"nmae": "x"}]}, "unknown field"),
           ({"format": "qinject-rules", "version": 1, "rules": [{"skip": True, "weights": 4}]}, "both skips"),
           ({"format": "qinject-plan", "version": 1}, "not a qinject rules file")]
    for data, message in bad:
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(PlanError, match=message):
            Rules.load(tmp_path / "bad.json")


def test_a_searched_plan_reapplies_exactly_from_its_rules(tmp_path):
    searched = tmp_path / "s.onnx"
    r = run_cli("quantize", CNN / "model.onnx", "-o", searched, "--calib", CNN / "calib.npz", "--eval",
             CNN / "eval.npz", "--max-drop", "1%", "--target", "nvidia-a100", "--latency-batch", "256",
             "--workers", "1")
    assert r.returncode == 0, r.stderr
    rules_file = tmp_path / "s.onnx.rules.json"
    data = json.loads(rules_file.read_text())
    assert [rule["name"] for rule in data["rules"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    again = tmp_path / "again.onnx"
    r = run_cli("quantize", CNN / "model.onnx", "-o", again, "--calib", CNN / "calib.npz", "--rules", rules_file,
             "--target", "none")
    assert r.returncode == 0, r.stderr
    # the model the search wrote, node for node and bit for bit; only the opset may differ: a search
    # lowers at opset 21 (its 16-bit evaluations need it), a rules run keeps the source's where 8 bits do
    written, reapplied = onnx.load(searched), onnx.load(again)
    assert reapplied.graph == written.graph
    # A reviewer keeps fc2 in float and moves conv2 to 16 bits; the edit applies as written.
    data["rules"][4] = {"name": "fc2", "skip": True}
    data["rules"][1] = {"name": "conv2", "weights": 16, "activations": 16}
    data["rules"].append({"name": "typo_.*", "weights": 4})
    rules_file.write_text(json.dumps(data))
    edited = tmp_path / "edited.onnx"
    r = run_cli("quantize", CNN / "model.onnx", "-o", edited, "--calib", CNN / "calib.npz", "--rules", rules_file,
             "--target", "none")
    assert r.returncode == 0, r.stderr
    assert "warning: rule(s) matched no node: {name='typo_.*'}" in r.stderr
    result = qinject.load_onnx(edited)
    weighted = {n.name for n in result.graph if n.op_type in ("Conv", "Gemm") and n.inputs[1].producer() is not None
                and n.inputs[1].producer().op_type == "DequantizeLinear"}
    assert weighted == {"conv1", "conv2", "conv3", "fc1"}  # fc2 kept its float weight
    int16 = [n for n in result.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
             and str(n.inputs[0].dtype) == "INT16"]
    assert int16  # conv2's weight at 16 bits


def test_rules_pin_nodes_the_search_must_not_touch():
    pins = Rules((Rule(name="conv1", weights=16, activations=16), Rule(name="fc2", skip=True)))
    result = qinject.quantize_onnx(CNN / "model.onnx", calib=CNN / "calib.npz", target="nvidia-a100",
                                   latency_batch=256, progress=False,
                                   search=SearchOptions(max_drop="1%", eval_data=CNN / "eval.npz", workers=1,
                                                        rules=pins))
    found = result.search
    assert found.bits["conv1"] == 16 and found.bits["fc2"] is None
    assert found.searched == ["conv2", "conv3", "fc1"]
    assert result.plan.choice("fc2") is None and result.plan.choice("conv1").weights == 16
    assert "fc2" not in result.quantized and found.score >= found.floor
