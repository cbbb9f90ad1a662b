"""The report that proposes fixes, on the bundled model: it renders (Markdown and self-contained
HTML with the plots), its rules are ready to apply, and its predictions hold against real runs.

Tolerances: each verified fix's predicted change of output SQNR within 1.5 dB of the measured change
(0.05-0.80 dB measured on this model), and the plan's SQNR predicted from per-node errors (which
assumes uncorrelated errors) within 3 dB of the measured one (39.9 vs 41.5 dB).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import qinject
from qinject.app.report import build_report
from qinject.core.rules import Rule, Rules
from qinject.latency_table import load_target
from qinject.plan import Plan
from tests.builders import CNN, run_cli


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model = qinject.analyze(CNN / "model.onnx", CNN / "calib.npz", ["quant-error"], workers=1, progress=False)
    inputs = {"input": np.load(CNN / "calib.npz")["input"]}
    return build_report(model, Plan.uniform(8, 8), load_target("local-cpu"), inputs, batch=64, verify=3, workers=1,
                        plot_dir=tmp_path_factory.mktemp("plots"))


def test_every_node_has_its_numbers_and_a_proposal(report):
    assert [r.node for r in report.rows] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert sum(r.error_share for r in report.rows) == pytest.approx(1.0)
    assert all(0 < r.latency_share < 1 and r.sqnr_db > 20 for r in report.rows)
    raised = [r for r in report.rows if r.action.startswith("keep") and r.rule is not None]
    assert raised and all(r.rule.weights == 16 and r.predicted_db > 0 and r.latency_ms > 0 for r in raised)
    assert all(r.error_share > 1 / 5 for r in raised)  # raised: above-average error share


def test_predictions_hold_against_real_runs(report):
    errors = report.prediction_errors()
    assert len(errors) == 3 and max(errors) <= 1.5, [(r.action, r.predicted_db, r.measured_db) for r in report.rows]
    assert abs(report.predicted_sqnr_db - report.output_sqnr_db) <= 3.0


def test_the_rules_apply_and_the_pages_render(report, tmp_path):
    rules = Rules(tuple(r.rule for r in report.rows if r.rule is not None))
    plan, unmatched = rules.plan(qinject.load_onnx(CNN / "model.onnx"))
    assert not unmatched and plan.choice("conv2").weights in (16, 4)
    md = report.save(tmp_path / "r.md").read_text()
    assert "| conv2 | Conv | W8A8 |" in md and "Mean absolute prediction error" in md and "![latency" in md
    page = report.save(tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == len(report.plots) >= 2
    for line in md.split("```json")[1].split("```")[0].strip().splitlines():
        Rule(**{k: tuple(v) if k == "op_types" else v for k, v in json.loads(line.rstrip(",")).items()})


def test_cli_report(tmp_path):
    r = run_cli("report", CNN / "model.onnx", "--calib", CNN / "calib.npz", "-o", tmp_path / "r.html",
                "--target", "nvidia-a100", "--batch", "256", "--verify", "1", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "output SQNR" in r.stdout and "predictions checked on 1 real runs" in r.stdout
    assert (tmp_path / "r.html").stat().st_size > 20_000
