"""fit-measured: the plan's rewrite is timed against the float model on this machine; a rewrite that
runs slower keeps float the nodes the estimate credits least, or all of them.

The logic is checked with a stand-in clock (the time a candidate takes is a function of its
quantized nodes), so it is exact; the real clock is checked only for what holds whatever the
machine's load: the kept model never measured slower than float."""

from __future__ import annotations

import os
import re
import shutil

import onnx
import pytest

import qinject
from qinject.core import ir as qir
from qinject.core.errors import UnsupportedModelError
from qinject.passes.target import fit_measured
from qinject.plan import NodeQuant, Plan
import numpy as np

from tests.builders import CNN, depthwise_net, post_norm_block, run_cli


def _clock(cost_of: dict[str, float], base: float = 1.0, per_node: float = 0.0):
    """A stand-in for ``interleaved_latency``: float runs in ``base`` ms; a rewrite takes ``base`` plus,
    for each quantized node, ``cost_of[node]`` (negative: a saving) and a fixed ``per_node``."""
    seen: list[int] = []
    baselines: list[object] = []

    def timings(models, feeds, budget_s=2.0):
        seen.append(len(models))
        baselines.append(models[0])
        out = []
        for model in models:
            if isinstance(model, str):  # the source file: the float model
                out.append(base)
                continue
            quantized = [n.name for n in model.graph.all_nodes() if qir.QUANT_APPLIED in n.meta]
            out.append(base + sum(cost_of.get(n, 0.0) + per_node for n in quantized))
        return out

    timings.seen, timings.baselines = seen, baselines
    return timings


def _quantize(tmp_path, **kwargs):
    return qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "q.onnx", calib=CNN / "calib.npz",
                                 target="local-cpu", progress=False, measure=True, **kwargs)


def _names() -> list[str]:
    return [n.name for n in qir.quantizable_nodes(qinject.load_onnx(CNN / "model.onnx"))]


def test_a_rewrite_faster_than_float_is_kept_whole_after_two_timings(tmp_path, monkeypatch):
    clock = _clock({}, per_node=-0.01)
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    result = _quantize(tmp_path, force=False)
    assert clock.seen == [2, 2]  # float and the plan, then again in fresh sessions
    assert clock.baselines == [str((CNN / "model.onnx").resolve())] * 2  # the float model is the user's file
    assert result.measured["tried"] == 1 and result.measured["quantized_ms"] < result.measured["float_ms"]
    assert result.quantized and not any("measured" in n for notes in result.notes.values() for n in notes)


def test_a_slower_rewrite_keeps_the_fastest_partial_plan(tmp_path, monkeypatch):
    """One node costs more than the others save: the candidates that leave it float win."""
    monkeypatch.setattr(fit_measured, "interleaved_latency", _clock({}, per_node=-0.01))
    chosen = _quantize(tmp_path).quantized  # what fit-target keeps on local-cpu
    assert len(chosen) >= 2
    # the slow node is the one the estimate credits least: the halvings drop it first
    slow = chosen[0]
    costs = {name: -0.05 for name in chosen} | {slow: 0.5}
    clock = _clock(costs)
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    monkeypatch.setattr(fit_measured.FitMeasured, "_ranked",
                        lambda self, model, plan, names: [*(n for n in names if n != slow), slow])
    result = _quantize(tmp_path)
    # the plan; float, it and its halvings; the winner alone against float again
    assert clock.seen == [2, 2 + len(fit_measured._halvings(len(chosen))), 2]
    assert slow not in result.quantized
    assert len(result.quantized) == len(chosen) // 2  # the largest halving: it saves the most
    assert any("measured" in note and "--force" in note for note in result.notes[slow])
    assert result.measured["quantized_ms"] < result.measured["float_ms"]


def test_no_plan_that_beats_float_by_the_margin_means_nothing_is_quantized(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_measured, "interleaved_latency", _clock({}, per_node=0.001))
    with pytest.raises(UnsupportedModelError, match="nothing was quantized.*measured .*x the float model"):
        _quantize(tmp_path)
    assert not (tmp_path / "q.onnx").exists()
    # a gain inside the timing noise (under 3%) is not a gain either
    monkeypatch.setattr(fit_measured, "interleaved_latency", _clock({}, base=1.0, per_node=0.1))
    monkeypatch.setattr(fit_measured.FitMeasured, "_ranked", lambda self, model, plan, names: names)
    with pytest.raises(UnsupportedModelError, match="nothing was quantized"):
        _quantize(tmp_path)


def test_force_and_no_measure_skip_it(tmp_path, monkeypatch):
    clock = _clock({}, per_node=1.0)  # every rewrite far slower: would float everything
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    assert set(_quantize(tmp_path, force=True).quantized) == set(_names())
    plain = qinject.quantize_onnx(CNN / "model.onnx", tmp_path / "p.onnx", calib=CNN / "calib.npz",
                                  target="local-cpu", progress=False)
    assert plain.quantized and plain.measured is None and clock.seen == []


def test_the_float_baseline_is_the_source_file_onnxruntime_runs(tmp_path):
    """The rewrite must beat the model as the user runs it: the file it came from, not the pipeline's
    re-serialised float IR (a TorchScript If export ran 1.5x slower from it). The IR stands in for a
    model given in memory, and for a source onnxruntime cannot load."""
    loaded = qinject.load_onnx(CNN / "model.onnx")
    assert fit_measured._float_model(loaded) == str((CNN / "model.onnx").resolve())
    in_memory = qinject.load_onnx(onnx.load(str(CNN / "model.onnx")))
    assert fit_measured._float_model(in_memory) is in_memory
    copy = tmp_path / "m.onnx"
    shutil.copy(CNN / "model.onnx", copy)
    gone = qinject.load_onnx(copy)
    copy.write_bytes(b"truncated")
    assert fit_measured._float_model(gone) is gone


def test_the_halvings_of_the_candidates():
    assert fit_measured._halvings(11) == [5, 2, 1]
    assert fit_measured._halvings(2) == [1]
    assert fit_measured._halvings(1) == []


def test_on_the_real_clock_the_kept_rewrite_never_measured_slower_than_float(tmp_path):
    """Whatever this machine's load: either a plan measured no slower than float is written, with its
    figures, or nothing is quantized and no file is written."""
    try:
        result = _quantize(tmp_path)
    except UnsupportedModelError as exc:
        assert "measured" in str(exc) and not (tmp_path / "q.onnx").exists()
        return
    assert result.measured["quantized_ms"] <= result.measured["float_ms"]
    assert set(result.quantized) == {n for n in _names() if result.plan.choice(n) is not None}


def test_the_cli_measures_by_default_and_says_what_it_kept(tmp_path):
    measuring = {k: v for k, v in os.environ.items() if k != "QINJECT_NO_MEASURE"}
    done = run_cli("quantize", CNN / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", CNN / "calib.npz",
                   env=measuring)
    if done.returncode == 0:
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("measured on this machine"))
        found = re.search(r"float ([0-9.]+) ms, quantized ([0-9.]+) ms", line)
        assert found, line
        assert float(found[2]) <= float(found[1])
    else:  # slower here whatever was kept: one line, no file
        assert done.stderr.startswith("error: nothing was quantized") and done.stderr.count("\n") == 1
        assert not (tmp_path / "q.onnx").exists()


def test_a_node_the_plan_names_keeps_what_was_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_measured, "interleaved_latency", _clock({}, per_node=-0.01))
    chosen = _quantize(tmp_path).quantized
    slow = chosen[0]
    monkeypatch.setattr(fit_measured, "interleaved_latency", _clock({slow: 0.5}, per_node=0.01))
    result = _quantize(tmp_path, plan=Plan(NodeQuant(), {slow: NodeQuant()}))
    assert result.quantized == [slow]  # the others went float; the named one stayed, slower or not
    assert result.measured["quantized_ms"] > result.measured["float_ms"]  # the CLI warns about it


def test_a_whole_plan_faster_by_less_than_the_noise_is_timed_again_and_not_kept(tmp_path, monkeypatch):
    clock = _clock({}, per_node=-0.004)  # 5 nodes: 0.98x, inside the 3% timing noise
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    with pytest.raises(UnsupportedModelError, match=r"measured 0\.98x .*kept only under 0\.97x"):
        _quantize(tmp_path)
    assert len(clock.seen) == 2  # the first timing, then the plan with its halvings


def test_a_searched_plan_the_timing_floats_entirely_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_measured, "interleaved_latency", _clock({}, per_node=0.5))
    search = qinject.SearchOptions(max_drop="5%", eval_data=CNN / "eval.npz", limit=128)
    with pytest.raises(UnsupportedModelError, match="nothing was quantized.*measured"):
        _quantize(tmp_path, search=search)
    assert not (tmp_path / "q.onnx").exists()


def _flaky(first: list[float], then: float):
    """A stand-in clock whose rewrites measure ``first[i]`` times float in the i-th timing, ``then``
    after: a plan that wins one timing by luck."""
    seen: list[int] = []

    def timings(models, feeds, budget_s=2.0):
        ratio = first[len(seen)] if len(seen) < len(first) else then
        seen.append(len(models))
        return [1.0, *([ratio] * (len(models) - 1))]

    timings.seen = seen
    return timings


def test_a_plan_that_wins_one_timing_and_loses_the_next_is_not_kept(tmp_path, monkeypatch):
    # whole plan: 0.90x, then 1.02x in fresh sessions; every candidate 1.02x from then on
    clock = _flaky([0.90], then=1.02)
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    with pytest.raises(UnsupportedModelError, match=r"nothing was quantized.*measured 1\.02x"):
        _quantize(tmp_path)
    assert clock.seen[:2] == [2, 2] and len(clock.seen) == 3  # the plan twice, then the candidates
    assert not (tmp_path / "q.onnx").exists()


def test_the_fastest_candidate_is_kept_only_if_it_wins_its_own_timing(tmp_path, monkeypatch):
    chosen_ratio = [1.05, 0.90, 1.05]  # the plan; its candidates (the best at 0.90x); the best alone
    monkeypatch.setattr(fit_measured, "interleaved_latency", _flaky(chosen_ratio, then=1.05))
    with pytest.raises(UnsupportedModelError, match="nothing was quantized"):
        _quantize(tmp_path)
    clock = _flaky([1.05, 0.90, 0.90], then=1.05)
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    result = _quantize(tmp_path)
    assert result.quantized and result.measured == {"float_ms": 1.0, "quantized_ms": 0.90,
                                                    "tried": 1 + clock.seen[1] - 1}


@pytest.mark.parametrize("dw_saves", [True, False])
def test_a_depthwise_convolution_goes_on_integers_where_the_plan_with_it_measures_faster(
        tmp_path, monkeypatch, dw_saves):
    """A depthwise convolution stays float on a CPU (onnxruntime's kernel for it alone is slower), but
    between integer neighbours it saves their conversions (TorchScript's ShuffleNetV2: 0.92x -> 0.78x
    of float). So a plan with it free is fitted too and timed against the first: it is kept, with its
    note, where it measures faster. Here the first plan, with dw float, prices its two neighbours
    faster in float too, so where the second loses nothing is quantized."""
    path = tmp_path / "dw.onnx"
    onnx.save(depthwise_net(), path)
    calib = {"x": np.random.default_rng(0).standard_normal((4, 32, 28, 28)).astype(np.float32)}
    clock = _clock({"dw": -0.3 if dw_saves else 0.3}, per_node=-0.05)
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)

    def quantize():
        return qinject.quantize_onnx(path, tmp_path / "q.onnx", calib=calib, target="local-cpu", progress=False,
                                     measure=True)

    if not dw_saves:
        with pytest.raises(UnsupportedModelError, match="nothing was quantized"):
            quantize()
        assert clock.seen == [3]  # float and both plans, once: the second lost
        return
    result = quantize()
    assert clock.seen[:2] == [3, 2]
    notes = " ".join(result.notes.get("dw", []))
    assert set(result.quantized) == {"pw0", "dw", "pw1"} and "quantized though" in notes, result.notes
    assert "grouped/depthwise" not in notes


@pytest.mark.parametrize("dw_saves", [True, False])
def test_a_search_tries_its_plan_with_the_depthwise_convolution_on_integers_too(tmp_path, monkeypatch, dw_saves):
    """A search pins depthwise convolutions float on a CPU, as a plain quantize does; where the target
    prices its chosen plan faster with one on integers (here beside pw0) and that plan meets the
    budget too, the two are timed against each other, and the faster kept (TorchScript's
    ShuffleNetV2: the search's plan ran 0.88x of float where the plain quantize's ran 0.78x)."""
    path = tmp_path / "dw.onnx"
    onnx.save(depthwise_net(channels=96, expanded=576, size=14), path)
    calib = {"x": np.random.default_rng(0).standard_normal((8, 96, 14, 14)).astype(np.float32)}
    clock = _clock({"dw": -0.3 if dw_saves else 0.3}, per_node=-0.1)
    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    result = qinject.quantize_onnx(path, tmp_path / "q.onnx", calib=calib, target="local-cpu", progress=False,
                                   measure=True, search=qinject.SearchOptions(max_drop="5%", eval_data=calib))
    searched = {n for n in result.search.bits if result.search.plan.choice(n) is not None}
    assert "pw0" in searched and "dw" not in searched, result.search.bits  # dw pinned by the search
    assert clock.seen[0] == 3  # float, the search's plan and the one with dw on integers
    notes = " ".join(result.notes.get("dw", []))
    if dw_saves:
        assert set(result.quantized) == searched | {"dw"} and "quantized though" in notes, result.notes
    else:
        assert set(result.quantized) == searched and "grouped/depthwise" in notes, result.notes


@pytest.mark.parametrize("split_saves", [True, False])
def test_adds_onnxruntime_fuses_into_a_slower_skip_layernorm_are_written_as_sum_where_measured_faster(
        tmp_path, monkeypatch, split_saves):
    """onnxruntime's SkipLayerNormalization (a residual Add and its LayerNormalization, fused) ran 3x
    the two kernels' time on this repository's machine; BERT-base's int8 rewrite ran 0.91x with its
    Adds written as Sum. Timed both ways, the faster is written, with a note."""
    path = tmp_path / "block.onnx"
    onnx.save(post_norm_block(width=256, tokens=128), path)
    calib = {"x": np.random.default_rng(0).standard_normal((4, 128, 256)).astype(np.float32)}

    def clock(models, feeds, budget_s=2.0):
        out = []
        for model in models:
            split = not isinstance(model, str) and any(n.op_type == "Sum" for n in model.graph)
            quantized = 0 if isinstance(model, str) else sum(qir.QUANT_APPLIED in n.meta for n in model.graph)
            out.append(1.0 - 0.1 * quantized + ((-0.2 if split_saves else 0.2) if split else 0.0))
        return out

    monkeypatch.setattr(fit_measured, "interleaved_latency", clock)
    result = qinject.quantize_onnx(path, tmp_path / "q.onnx", calib=calib, target="local-cpu", progress=False,
                                   measure=True)
    assert result.quantized
    sums = [n.name for n in onnx.load(tmp_path / "q.onnx").graph.node if n.op_type == "Sum"]
    if split_saves:
        assert sums == ["res1"] and result.model.meta[qir.SPLIT_SKIP_LAYERNORM] < fit_measured.MIN_GAIN
    else:
        assert sums == [] and qir.SPLIT_SKIP_LAYERNORM not in result.model.meta
