"""The Ray executor: every sensitivity signal and every search give the process pool's results, bit for
bit, whatever the worker count; an actor killed mid-run is restarted and its evaluation retried, with
the results and the evaluation count unchanged; a model's failure is reported, not retried.

One local Ray (``ray.init(num_cpus=2)``) serves the whole module: starting it costs ~4 s."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from qinject.passes.search import SEARCH_PASSES
from qinject.passes.sensitivity import SIGNALS, report, signal_pass
from qinject.passes.sensitivity.base import EVALUATIONS, alone
from tqdm.auto import tqdm

import qinject
from qinject.app.cli import cli
from qinject.core import ir as qir
from qinject.core.calib_data import QinjectWarning
from qinject.core.errors import QinjectError
from qinject.core.search_result import search_result
from qinject.runtime import executor as executor_module
from qinject.runtime import ray_executor
from qinject.runtime.executor import Executor
from tests.builders import CNN, run_cli
from tests.passes.sensitivity.fixtures import conv_case

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cnn():
    """The digits CNN, calibrated and annotated by quant-error (what the searches rank by)."""
    return qinject.analyze(CNN / "model.onnx", CNN / "calib.npz", ["quant-error"], workers=1, progress=False)


def _variants(ex: Executor) -> list:
    nodes = [n.name for n in qir.searchable_nodes(ex.model)]
    return [ex.model, *(ex.quantized(alone(n, b)) for n in nodes for b in (16, 8, 4))]


def test_outputs_equal_the_process_pools_bit_for_bit_at_any_worker_count(cnn):
    with np.load(CNN / "eval.npz") as data:
        inputs = {"input": data["input"]}
    with Executor(cnn, inputs, workers=2) as ex:
        expected = ex.run(_variants(ex))
        assert ex.count == len(expected)
    for workers in (1, 2):
        with Executor(cnn, inputs, workers=workers, executor="ray") as ex:
            outputs = ex.run(_variants(ex))
            assert ex.count == len(expected)
            assert len(ex._pool.actors) == workers
        assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))


def _without_seconds(model) -> dict:
    out = report(model)
    for value in out["signals"].values():
        value.pop("seconds")
    return out


def test_every_signal_through_ray_equals_the_process_pool():
    """quant-error, noise, bit-error and interlayer send model variants to the actors; hessian sends
    nodes to actors that build the model's JAX function (locally it runs in this process)."""
    results = {}
    for executor in ("process", "ray"):
        model, data = conv_case(labels=True)
        for name in ("quant-error", "noise", "bit-error", "hessian", "interlayer"):
            options = {"rates": (1e-2,), "score_rate": 1e-2, "seeds": 2} if name == "bit-error" else \
                {"min_iter": 2, "max_iter": 4} if name == "hessian" else {}
            signal_pass(name, data, workers=2, executor=executor, progress=False, **options)(model)
        results[executor] = _without_seconds(model)
    assert sorted(results["ray"]["signals"]) == sorted(cls.signal for cls in SIGNALS.values())
    assert results["ray"] == results["process"]
    counts = {k: v["evaluations"] for k, v in results["ray"]["signals"].items()}
    assert counts["quant_error"] == 1 + 3 * 3 and counts["interlayer"] == 1 + 3 * 3, counts
    traces = {n: v["details"]["trace"] for n, v in results["ray"]["signals"]["hessian"]["nodes"].items()}
    assert len(traces) == 3 and all(t > 0 for t in traces.values()), traces  # the loss is cross-entropy


@pytest.mark.parametrize("algorithm", sorted(SEARCH_PASSES))
def test_every_search_through_ray_equals_the_process_pool(cnn, algorithm):
    found = {}
    for executor in ("process", "ray"):
        model = cnn.clone()
        SEARCH_PASSES[algorithm](CNN / "eval.npz", "0.5pt", "nvidia-a100", batch=256, workers=2,
                                 executor=executor, progress=False, limit=300)(model)
        found[executor] = search_result(model)
    ray_result, process_result = found["ray"], found["process"]
    assert ray_result.evaluations == process_result.evaluations >= 2
    assert ray_result.bits == process_result.bits and ray_result.score == process_result.score
    assert [(t.label, t.bits, t.score) for t in ray_result.trials] == \
        [(t.label, t.bits, t.score) for t in process_result.trials]


def test_an_actor_killed_mid_run_is_replaced_and_nothing_is_lost_or_counted_twice(cnn):
    with np.load(CNN / "eval.npz") as data:
        inputs = {"input": np.tile(data["input"], (6, 1, 1, 1))}  # ~0.3 s per evaluation
    with Executor(cnn, inputs, workers=1) as ex:
        plans = [alone(n.name, b) for n in qir.searchable_nodes(cnn) for b in (8, 4)]
        expected = ex.run(ex.quantized(p) for p in plans)
    killed: list[int] = []
    with Executor(cnn, inputs, workers=2, executor="ray") as ex:

        def variants():
            for i, plan in enumerate(plans):
                if i == 2 * len(ex._pool.actors) + 1:
                    # Asked for the next variant after a result came back: both actors hold a task
                    # (the pool keeps two per actor queued), so the one killed dies mid-evaluation.
                    killed.append(ex._pool.pids()[0])
                    os.kill(killed[0], signal.SIGKILL)
                yield ex.quantized(plan)

        ex.run([ex.model])  # the actors exist, with their inputs
        before = ex._pool.pids()
        outputs = ex.run(variants())
        assert ex.count == 1 + len(plans)
        after = ex._pool.pids()
    assert killed == [before[0]] and after[0] != before[0] and after[1] == before[1]
    assert len(outputs) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))


def test_a_model_onnxruntime_cannot_run_is_reported_not_retried(cnn):
    with np.load(CNN / "eval.npz") as data:
        inputs = {"input": data["input"][:16]}
    with Executor(cnn, inputs, workers=2, executor="ray") as ex:
        ex.run([ex.model])
        pids = ex._pool.pids()
        with pytest.raises(QinjectError, match="onnxruntime could not run a model variant: .*Protobuf"):
            ex._pool.map([b"not an onnx model"], lambda: None)
        assert ex._pool.pids() == pids  # no actor died, none was restarted
        assert ex.count == 1
        assert len(ex.run([ex.model])) == 1  # the pool still works


def test_cli_analyze_with_executor_ray(tmp_path):
    outputs = {}
    for executor in ("process", "ray"):
        path = tmp_path / f"{executor}.json"
        result = CliRunner().invoke(cli, ["analyze", str(CNN / "model.onnx"), "--calib",
                                          str(CNN / "calib.npz"), "--metric", "quant-error", "--limit", "64",
                                          "--executor", executor, "--json", str(path)])
        assert result.exit_code == 0, result.output
        outputs[executor] = path.read_text()
    ray_out, process_out = (json.loads(outputs[k]) for k in ("ray", "process"))
    ray_out["signals"]["quant_error"].pop("seconds"), process_out["signals"]["quant_error"].pop("seconds")
    assert ray_out == process_out


def test_unknown_executor_and_missing_ray_are_one_line_errors(monkeypatch):
    with pytest.raises(QinjectError, match=r"unknown executor 'dask' \(expected 'process', 'ray'"):
        ray_executor.check("dask")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    for spec in ("ray", "ray://head:10001"):
        with pytest.raises(QinjectError, match=r"needs Ray, which is not installed: pip install 'qinject\[ray\]'"):
            ray_executor.check(spec)
    assert ray_executor.check(None) == ray_executor.check("process") == "process"
    result = CliRunner().invoke(cli, ["analyze", str(CNN / "model.onnx"), "--calib", str(CNN / "calib.npz"),
                                      "--metric", "noise", "--executor", "ray"])
    assert result.exit_code == 1 and "pip install 'qinject[ray]'" in result.output


def test_actors_import_neither_qinject_nor_jax(cnn):
    """The actors' code travels by value: a cluster node needs numpy, onnxruntime and Ray only."""
    with Executor(cnn, {"input": np.zeros((2, 1, 8, 8), np.float32)}, workers=1, executor="ray") as ex:
        ex.run([ex.model])
        (pid,) = ex._pool.pids()
    with open(f"/proc/{pid}/maps") as maps:  # the native libraries the actor's process has loaded
        loaded = maps.read()
    assert "onnxruntime" in loaded and "jaxlib" not in loaded and "onnx_cpp2py_export" not in loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.long
def test_an_existing_cluster_through_ray_client(tmp_path):
    """``--executor ray://HOST:PORT``: a cluster started apart (``ray start --head``), reached through
    Ray Client from another process, gives the process pool's figures. Token authentication on, as
    Ray 2.59 starts clusters by default."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    client, gcs = _free_port(), _free_port()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        outputs = {}
        for executor in ("process", f"ray://127.0.0.1:{client}"):
            path = tmp_path / f"{len(outputs)}.json"
            for _ in range(30):  # the head takes a few seconds to open its client port
                r = run_cli("analyze", CNN / "model.onnx", "--calib", CNN / "calib.npz", "--metric", "noise",
                            "--limit", "64", "--executor", executor, "--json", path, env=env)
                if r.returncode == 0 or "cannot connect" not in r.stderr:
                    break
            assert r.returncode == 0, r.stderr
            outputs[executor] = json.loads(path.read_text())
            outputs[executor]["signals"]["noise"].pop("seconds")
        assert outputs["process"] == outputs[f"ray://127.0.0.1:{client}"]
    finally:
        head.terminate()
        head.wait(timeout=60)
        # ray start leaves the dead head's address behind in /tmp/ray, where Ray's default
        # ray.init() would look for a cluster to join
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()


def test_one_progress_bar_follows_a_whole_signal(monkeypatch):
    """Every run of the signal (the float reference, then its variants) moves one bar, per result."""
    shown = io.StringIO()

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": shown, "mininterval": 0})

    monkeypatch.setattr(executor_module, "tqdm", Bar)
    model, data = conv_case()
    signal_pass("noise", data, executor="ray", workers=2, progress=True)(model)
    lines = [line for line in shown.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    count = model.meta[EVALUATIONS]["noise"][0]
    assert all(line.startswith("noise: ") for line in lines), lines
    done = [int(m.group(1)) for m in map(re.compile(r"(\d+)/\d+").search, lines) if m]
    assert done == sorted(done) and set(range(1, count + 1)) <= set(done)  # moved by each result
    assert f"{count}/{count}" in lines[-1]


def test_more_workers_than_the_cluster_has_cpus_is_capped_with_a_warning(cnn):
    with np.load(CNN / "eval.npz") as data:
        inputs = {"input": data["input"][:16]}
    with Executor(cnn, inputs, workers=5, executor="ray") as ex:
        with pytest.warns(QinjectWarning, match="5 Ray workers asked for, but the cluster has 2 CPUs: using 2"):
            ex.run([ex.model])
        assert len(ex._pool.actors) == 2 and ex.count == 1
