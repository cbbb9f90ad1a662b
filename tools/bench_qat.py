"""Quantization-aware fine-tuning benchmark (issue #18): float, PTQ round-to-nearest, PTQ + AdaRound
and QAT (``passes/rounding/finetune.py``) at W4A8 and W4A4 on the zoo's digits CNN and text
transformer (top-1 accuracy on the held-out split) and magika from its ONNX file (top-1 agreement
with the float model on held-out real files).

Every variant is the same calibrated model (minmax) rewritten by ``InsertQDQ`` and evaluated in the
JAX backend's simulated mode, which is what the written QDQ ONNX computes (the tests bound the
difference by one output step; the W4A4 files, written as Clip -> 8-bit Q/DQ pairs, run on onnxruntime).
QAT trains by distillation from the float model, without labels, on unlabelled training inputs:
the digits' and the transformer's own training splits (rebuilt by their training scripts; transformer
lines that also occur in the calibration or held-out splits are dropped), magika's calibration files.

Usage:
    nice -n 10 python tools/bench_qat.py                       # everything
    nice -n 10 python tools/bench_qat.py --models digits_cnn --steps 100
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_common import machine, source_state, write_section  # noqa: E402  (tools/ is on sys.path)

SECTION = "bench_qat"
MODELS = ("digits_cnn", "text_transformer", "magika")
STEPS = {"digits_cnn": 300, "text_transformer": 600, "magika": 200}
PLANS = {"W4A8": (4, 8), "W4A4": (4, 4)}
ADAROUND_MODELS = ("digits_cnn", "text_transformer")  # magika: minutes per convolution (BENCHMARKS, search)


@dataclass
class Case:
    name: str
    model: object  # IR model (float)
    calib: dict[str, np.ndarray]
    train: dict[str, np.ndarray]
    evaluate: object  # predict -> score
    metric: str
    batch: int


def make_case(name: str) -> Case:
    import jax

    import qinject

    if name == "magika":
        from tests.zoo.magika_data import magika_features, magika_model_path, real_files

        calib_files, held_files = real_files(0)
        model = qinject.load_onnx(magika_model_path())
        inp = model.graph.inputs[0].name
        calib, held = magika_features(calib_files), magika_features(held_files)
        def top1(predict):  # in chunks: all held-out files at once take gigabytes of activations
            run = jax.jit(predict)
            return np.concatenate([np.asarray(run(held[i:i + 256])).argmax(axis=1) for i in range(0, len(held), 256)])

        reference = top1(qinject.to_jax(model, "simulated"))

        def agreement(predict):
            return float(np.mean(top1(predict) == reference))

        return Case(name, model, {inp: calib}, {inp: calib}, agreement, "agreement", 32)
    from models import zoo

    zm = zoo.load(name)
    model = qinject.trace_jax(zm.forward, zm.params, zm.example_input(64))
    inp = model.graph.inputs[0].name
    if name == "digits_cnn":
        from models.digits_cnn.train import load_splits

        train = load_splits()["train"][0]
    else:
        from models.zoo.text_transformer import encode
        from models.zoo.train_text_transformer import build_dataset

        lines = build_dataset()["train"][0]
        ids = encode(lines).astype(np.int32)
        known = {row.tobytes() for row in np.concatenate([zm.calib_inputs, zm.eval_inputs])}
        train = ids[[row.tobytes() not in known for row in ids]][:8192]

    def accuracy(predict):
        return zm.evaluate(jax.jit(predict), 64)

    return Case(name, model, {inp: zm.calib_inputs}, {inp: train}, accuracy, "accuracy", 64)


def run_case(case: Case, steps: int) -> list[tuple]:
    from qinject.passes.rounding.adaround import AdaRound
    from qinject.passes.rounding.finetune import RESULT, Finetune

    import qinject
    from qinject.compiler.pipelines import standard_pipeline
    from qinject.core.pass_manager import PassManager
    from qinject.core.plan import NodeQuant, Plan
    from qinject.passes.transforms.insert_qdq import InsertQDQ

    # prepared for the lowest plan (opset 21 for int4), calibrated once for all
    calibrated = PassManager(standard_pipeline(Plan.uniform(4, 4), case.calib, progress=False)[:-1]).run(
        case.model).model
    rows = [("float", "", case.evaluate(qinject.to_jax(case.model, "simulated")), 0, 0.0)]
    for label, (w, a) in PLANS.items():
        plan = Plan(NodeQuant(weights=w, activations=a))
        ptq = calibrated.clone()
        InsertQDQ(plan)(ptq)
        rows.append((label, "PTQ round-to-nearest", case.evaluate(qinject.to_jax(ptq, "simulated")), 0, 0.0))
        if case.name in ADAROUND_MODELS:
            rounded = calibrated.clone()
            t0 = time.perf_counter()
            AdaRound(case.calib, plan, progress=False)(rounded)
            seconds = time.perf_counter() - t0
            InsertQDQ(plan)(rounded)
            rows.append((label, "PTQ + AdaRound", case.evaluate(qinject.to_jax(rounded, "simulated")), 500, seconds))
        else:
            rows.append((label, "PTQ + AdaRound", float("nan"), 0, 0.0))
        tuned = calibrated.clone()
        Finetune(case.train, plan, steps=steps, batch=case.batch, progress=False)(tuned)
        report = tuned.meta[RESULT]
        InsertQDQ(plan)(tuned)
        rows.append((label, "QAT (finetune)", case.evaluate(qinject.to_jax(tuned, "simulated")), report.steps,
                     report.seconds, report))
        print(f"  {case.name} {label}: {rows[-4:]}", file=sys.stderr, flush=True)
    return rows


def report(results: dict[str, tuple[Case, list[tuple]]], argv: list[str], seconds: float) -> str:
    lines = ["## Quantization-aware fine-tuning (`tools/bench_qat.py`)", "",
             f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; machine: {machine()}; whole run {seconds:.0f} s",
             f"- versions: {source_state()}, Python {platform.python_version()}",
             f"- reproduce: `nice -n 10 python tools/bench_qat.py{(' ' + shlex.join(argv)) if argv else ''}`",
             "- every variant is the same minmax-calibrated model rewritten by insert-qdq and run in the JAX "
             "backend's simulated mode (what the QDQ ONNX computes; W4A4 files too, their 4-bit pairs written as "
             "Clip -> 8-bit Q/DQ, which onnxruntime's default session runs). QAT: distillation from the float model (no labels), Adam, batch 64 (magika 32), on "
             "unlabelled training inputs (digits and transformer: their training splits; magika: its "
             "calibration files); seconds include compilation. AdaRound: 500 steps per layer on the calibration split.",
             "", "| model | metric | plan | method | score | vs float | steps | seconds |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, (case, rows) in results.items():
        base = rows[0][2]
        lines.append(f"| {name} | {case.metric} | float | | {base:.2%} | | | |")
        for row in rows[1:]:
            label, method, score, steps, secs = row[:5]
            shown = "not run" if np.isnan(score) else f"{score:.2%}"
            drop = "" if np.isnan(score) else f"{(score - base) * 100:+.2f} pt"
            lines.append(f"| {name} | {case.metric} | {label} | {method} | {shown} | {drop} | "
                         f"{steps or ''} | {f'{secs:.0f}' if secs else ''} |")
            if method.startswith("QAT"):
                goal = 0.5 if label == "W4A8" else 2.0
                gap = round((base - score) * 100, 2)  # as shown: 0.5 pt is one sample in 200 of 1600, not float noise
                verdicts.append(f"{name} {label}: QAT {gap:.2f} pt below float, goal {goal} pt: "
                                + ("met" if gap <= goal else f"**missed by {gap - goal:.2f} pt**"))
    lines += ["", "Goals (QAT within 0.5 pt of float at W4A8, within 2 pt at W4A4):", ""]
    lines += [f"- {v}" for v in verdicts]
    lines += ["", "Magika is where the goals are missed: QAT recovers 2.7 pt of agreement at W4A8 and 39 pt at W4A4 "
              "over round-to-nearest, far from float. It trained on the calibration quarter of the files only, "
              "for 200 steps (about 16 minutes per plan on this CPU, each step a batch of 32 through its "
              "convolution); longer runs and more files were not tried here."]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, help="QAT steps for every model (default: per model)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {}
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        case = make_case(name)
        results[name] = (case, run_case(case, args.steps or STEPS[name]))
    body = report(results, argv, time.perf_counter() - start)
    print(body)
    write_section(args.output, SECTION, body)


if __name__ == "__main__":
    main(sys.argv[1:])
