"""One real-model corpus case through the command line, as a user runs it: the float model and its
calibration feeds (a folder of .npz files, shapes varying where the model's dims are symbolic) are
written to a folder, ``qinject quantize MODEL -o OUT --calib FOLDER`` runs, onnxruntime runs the output
and the float model on the evaluation feeds, and the case's task fidelity (``models/realworld``) is
measured. Used by ``test_corpus.py`` (in spawned worker processes) and by hand::

    .venv/bin/python -m tests.realworld.corpus_run nudenet torch_lstm_dynamo
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from click.testing import CliRunner

from models.realworld import corpus
from qinject.cli import cli

CALIBRATION = 16  # samples: a few batches of each shape the case's feeds take
EVALUATION = 16


@dataclass
class Outcome:
    name: str
    status: str  # quantized | refused | crash
    detail: str = ""
    quantized_nodes: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    evaluations: int | None = None  # with a search: full-model evaluations used
    seconds: float = 0.0


KEPT_FLOAT = "kept float"  # a search found no plan faster than float on its target


def run_case(name: str, search: str | None = None) -> Outcome:
    """``search``: a --max-drop budget (e.g. "1%"), measured on the evaluation feeds by the default
    metric (agreement with the float model for classifiers, output fidelity otherwise)."""
    case = corpus.case(name)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx.save(case.model(), folder / "model.onnx")
        corpus.save_feeds(case.calibration(CALIBRATION), folder / "calib")
        evaluation = case.evaluation(EVALUATION)
        args = ["quantize", str(folder / "model.onnx"), "-o", str(folder / "q.onnx"), "--calib",
                str(folder / "calib"), "--target", "none"]
        if search is not None:
            # a folder of evaluation feeds: the search measures on those of the most common shape
            corpus.save_feeds(evaluation, folder / "eval")
            args += ["--max-drop", search, "--eval", str(folder / "eval"), "--target", "local-cpu",
                     "--workers", "1"]
        done = CliRunner().invoke(cli, args, catch_exceptions=True)
        seconds = time.perf_counter() - start
        if done.exception is not None and not isinstance(done.exception, SystemExit):
            return Outcome(name, "crash", f"{type(done.exception).__name__}: {done.exception}", seconds=seconds)
        if done.exit_code != 0 and search is not None and "search kept every node float" in done.output:
            # no plan paid on the target: no model is written, the report says what was measured
            report = json.loads((folder / "q.onnx.search.json").read_text())
            assert not (folder / "q.onnx").exists(), name
            return Outcome(name, KEPT_FLOAT, "", 0, {}, report["evaluations"], seconds)
        if done.exit_code != 0:
            lines = [ln for ln in done.output.splitlines() if ln.startswith(("error:", "internal error:"))]
            status = "refused" if lines and lines[0].startswith("error:") else "crash"
            return Outcome(name, status, lines[0] if lines else done.output[-300:], seconds=seconds)
        reference = corpus.run_model(folder / "model.onnx", evaluation)
        quantized = corpus.run_model(folder / "q.onnx", evaluation)  # onnxruntime runs what was written
        figures = {k: float(v) for k, v in case.fidelity(reference, quantized, evaluation).items()}
        count = next(int(ln.split()[1]) for ln in done.output.splitlines() if ln.startswith("quantized "))
        evaluations = None
        if search is not None:
            report = json.loads((folder / "q.onnx.search.json").read_text())
            evaluations = report["evaluations"]
    return Outcome(name, "quantized", "", count, figures, evaluations, seconds)


def describe(o: Outcome) -> str:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(o.figures.items()) if not math.isnan(v))
    extra = f", {o.evaluations} evaluations" if o.evaluations is not None else ""
    return f"{o.name}: {o.status} {o.quantized_nodes} nodes{extra} ({o.seconds:.1f} s) {o.detail}{shown}"


if __name__ == "__main__":
    for arg in sys.argv[1:] or sorted(corpus.CASES):
        print(describe(run_case(arg)), flush=True)
