"""The command line, run as users run it: a subprocess, one-line errors, no output on failure."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.builders import CNN, conv_net, run_cli


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(conv_net(), str(path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    return path


def test_quantize_writes_model_and_plan(model, tmp_path) -> None:
    out = tmp_path / "q.onnx"
    r = run_cli("quantize", model, "-o", out, "--calib", tmp_path / "calib.npz", "--calib-method", "percentile",
                "--save-plan", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    assert "quantized 3 node(s)" in r.stdout
    onnx.checker.check_model(str(out), full_check=True)
    r2 = run_cli("quantize", model, "-o", tmp_path / "q2.onnx", "--plan", tmp_path / "plan.json",
                 "--calib", tmp_path / "calib.npz", "--calib-method", "percentile")
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "q2.onnx").read_bytes() == out.read_bytes()  # same plan, same data: same bytes


def test_quantize_without_calibration_warns(model, tmp_path) -> None:
    r = run_cli("quantize", model, "-o", tmp_path / "q.onnx", "--per-tensor", "--weights", "4")
    assert r.returncode == 0, r.stderr
    assert "warning: no calibration data given" in r.stderr


def test_inspect(model) -> None:
    r = run_cli("inspect", model)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["node", "op", "weight", "shape", "MACs", "params"]
    assert lines[2].split()[:2] == ["conv1", "Conv"] and "3 quantizable node(s)" in r.stdout


def test_cost_prints_the_breakdown_and_plots(model, tmp_path) -> None:
    (tmp_path / "plan.json").write_text('{"default": {"weights": 8, "activations": 8}, "nodes": {"fc": "float"}}')
    r = run_cli("cost", model, "--target", "nvidia-a100", "--plan", tmp_path / "plan.json", "--batch", "32",
                "--plot", tmp_path / "nodes.png")
    assert r.returncode == 0, r.stderr
    assert "conv1" in r.stdout and "estimated latency on nvidia-a100" in r.stdout and "W16A16 baseline" in r.stdout
    fc = next(line for line in r.stdout.splitlines() if line.startswith("fc "))
    assert "float" in fc
    assert (tmp_path / "nodes.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_prints_tables_and_writes_json_and_plot(model, tmp_path) -> None:
    r = run_cli("analyze", model, "--calib", tmp_path / "calib.npz", "--metric", "quant-error", "--bits", "8,4",
                "--workers", "1", "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert r.returncode == 0, r.stderr
    assert "quant_error" in r.stdout and "conv1" in r.stdout and "4-bit" in r.stdout

    report = json.loads((tmp_path / "s.json").read_text())
    assert set(report["signals"]["quant_error"]["nodes"]) == {"conv1", "conv2", "fc"}
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_targets_lists_the_builtin_tables() -> None:
    r = run_cli("targets")
    assert r.returncode == 0, r.stderr
    assert "nvidia-a100" in r.stdout and "analytic" in r.stdout


def test_quantize_prints_the_latency_estimate(model, tmp_path) -> None:
    r = run_cli("quantize", model, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "calib.npz",
                "--target", "google-tpu-v5e")
    assert r.returncode == 0, r.stderr
    assert "estimated latency on google-tpu-v5e" in r.stdout and "saved" in r.stdout


def _bad_cases(tmp_path: Path, model: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "trunc.onnx").write_bytes(model.read_bytes()[:300])
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "bad_plan.json").write_text('{"default": {"weights": 3}}')
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 5, 5), np.float32))
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "bad_table.json").write_text('{"format": "qinject-latency-table", ')
    np.savez(tmp_path / "wrong_eval.npz", y=np.zeros((4, 3, 8, 8), np.float32))
    out = ["-o", str(tmp_path / "out.onnx")]
    proto = onnx.load(str(model))

    def copy() -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        return m

    broken = {}
    cycle = copy()
    cycle.graph.node[0].input[0] = cycle.graph.node[-1].output[0]
    broken["cycle"] = cycle
    missing = copy()
    del missing.graph.initializer[0]
    broken["noinit"] = missing
    unordered = copy()
    nodes = list(unordered.graph.node)[::-1]
    del unordered.graph.node[:]
    unordered.graph.node.extend(nodes)
    broken["unordered"] = unordered
    unknown = copy()
    unknown.graph.node[1].op_type = "FancyOp"
    broken["unknown"] = unknown
    nan = copy()
    w = onnx.numpy_helper.to_array(nan.graph.initializer[0]).copy()
    w.flat[0] = np.nan
    nan.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, nan.graph.initializer[0].name))
    broken["nan_weight"] = nan
    domain = copy()
    domain.graph.node[1].domain = "com.acme"
    domain.opset_import.append(onnx.helper.make_opsetid("com.acme", 1))
    broken["domain"] = domain
    future = copy()
    future.opset_import[0].version = 99
    broken["opset99"] = future
    calib = np.load(tmp_path / "calib.npz")["x"].copy()
    calib[0, 0, 0, 0] = np.inf
    np.savez(tmp_path / "inf_calib.npz", x=calib)
    np.savez(tmp_path / "int_calib.npz", x=np.nan_to_num(calib, posinf=0).astype(np.int32))
    for name, bad in broken.items():
        onnx.save(bad, str(tmp_path / f"{name}.onnx"))
    return [
        (["quantize", str(tmp_path / "cycle.onnx"), *out], "the graph has a cycle through node(s)"),
        (["quantize", str(tmp_path / "noinit.onnx"), *out], "which no node, graph input or initializer defines"),
        (["quantize", str(tmp_path / "unordered.onnx"), *out], "before the node that defines it"),
        (["quantize", str(tmp_path / "unknown.onnx"), *out], "No Op registered for FancyOp"),
        (["quantize", str(tmp_path / "nan_weight.onnx"), *out], "weight 'w1' contains NaN or Inf"),
        (["quantize", str(tmp_path / "domain.onnx"), *out, "--calib", str(tmp_path / "calib.npz")],
         "com.acme:Relu(-1) is not a registered function/op"),
        (["quantize", str(tmp_path / "opset99.onnx"), *out], "uses default-domain opset 99; supported are"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "inf_calib.npz")], "contains NaN or Inf"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "int_calib.npz")], "has dtype int32"),
        (["quantize", str(tmp_path / "missing.onnx"), *out], "does not exist"),
        (["quantize", str(tmp_path / "trunc.onnx"), *out], "not a valid ONNX"),
        (["quantize", str(tmp_path / "random.onnx"), *out], "not a valid ONNX"),
        (["quantize", str(model), *out, "--plan", str(tmp_path / "bad_plan.json")], "must be 4, 8 or 16"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "nothere.npz")], "does not exist"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "wrong.npz")], "axis 2: 5 != 8"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "empty.npz")], "lacks model input"),
        (["quantize", str(model), "-o", str(tmp_path / "nofolder" / "q.onnx")], "does not exist"),
        (["quantize", str(model), "-o", str(model)], "is the input model"),
        (["quantize", str(model), *out, "--target", "nope"], "unknown target 'nope'"),
        (["quantize", str(model), *out, "--target", str(tmp_path / "bad_table.json")], "is not valid JSON"),
        (["cost", str(model), "--target", str(tmp_path / "bad_table.json")], "is not valid JSON"),
        (["cost", str(model), "--target", "nvidia-a100", "--plot", str(tmp_path / "nofolder" / "p.png")],
         "does not exist"),
        (["analyze", str(model), "--calib", str(tmp_path / "nothere.npz"), "--metric", "quant-error"],
         "does not exist"),
        (["analyze", str(model), "--calib", str(tmp_path / "calib.npz"), "--metric", "quant-error",
          "--eval", str(tmp_path / "wrong_eval.npz")], "lacks model input"),
        (["analyze", str(model), "--calib", str(tmp_path / "calib.npz"), "--metric", "quant-error", "--bits", "3"],
         "--bits must be"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "calib.npz"), "--max-drop", "lots"],
         "accuracy budget 'lots'"),
        (["quantize", str(model), *out, "--max-drop", "1%"], "needs --calib"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "calib.npz"), "--max-drop", "1%", "--eval",
          str(tmp_path / "nothere.npz")], "does not exist"),
        (["quantize", str(model), *out, "--calib", str(tmp_path / "calib.npz"), "--max-drop", "1%", "--eval",
          str(tmp_path / "wrong_eval.npz")], "lacks model input"),
        (["quantize", str(model), *out, "--search", "ilp", "--plan", str(tmp_path / "bad_plan.json")],
         "exclude each other"),
        (["quantize", str(model), *out, "--search", "ilp", "--target", "none"], "needs a --target"),
    ]


def _in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI run in this process (click's runner): the same code path and streams as a subprocess,
    without paying an interpreter start per case."""
    from click.testing import CliRunner

    from qinject.cli import cli

    result = CliRunner().invoke(cli, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_bad_input_one_line_no_output(model, tmp_path) -> None:
    before = model.read_bytes()
    for i, (args, message) in enumerate(_bad_cases(tmp_path, model)):
        r = run_cli(*args) if i < 4 else _in_process(*args)  # the first few as real processes
        assert r.returncode != 0, args
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "out.onnx").exists()
        assert not list(tmp_path.glob(".*.tmp"))
    assert model.read_bytes() == before


def test_quantize_searches_within_the_budget(tmp_path) -> None:
    out = tmp_path / "q.onnx"
    # the digits CNN at batch 64: a plan must pay on the A100, since a search that keeps every node
    # float writes no model (at batch 1 none of the test conv net's does)
    r = run_cli("quantize", CNN / "model.onnx", "-o", out, "--calib", CNN / "calib.npz", "--max-drop", "2%",
                "--target", "nvidia-a100", "--latency-batch", "64", "--search", "ilp", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "search: ilp on nvidia-a100, budget 2% relative drop of agreement" in r.stdout
    assert "full-model evaluations:" in r.stdout and "saving" in r.stdout
    onnx.checker.check_model(str(out), full_check=True)

    report = json.loads((tmp_path / "q.onnx.search.json").read_text())
    assert report["score"] >= report["floor"] and report["evaluations"] >= 2
    plan = json.loads((tmp_path / "q.onnx.plan.json").read_text())
    assert plan["format"] == "qinject-plan"


def test_failed_run_keeps_existing_output(model, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    (tmp_path / "bad_plan.json").write_text('{"nodes": {"conv9": "float"}}')
    r = run_cli("quantize", model, "-o", out, "--plan", tmp_path / "bad_plan.json")
    assert r.returncode == 1 and "not quantizable nodes" in r.stderr
    assert out.read_bytes() == b"previous result"


@pytest.mark.slow
def test_demo(tmp_path) -> None:
    r = run_cli("demo", "--out", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    assert "top-1 accuracy" in r.stdout and "QLinearConv x3" in r.stdout and "search: bisection" in r.stdout
    assert (tmp_path / "demo" / "digits_cnn.mixed.onnx").exists()
