"""Benchmark the real-model corpus (``models/realworld/corpus.py``) and the light zoo: onnxruntime's
quantizers vs qinject, and qinject's latency estimates against the measured latency.

For every case (the 4 PyPI models, every export of ``exports_loader``, and the light-zoo conv nets of
``models/light_zoo.py`` as ``light_<name>``, with He-normal weights and standard-normal images), from the
same float file and the same calibration feeds:

* ``ort_static``   onnxruntime ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, QUInt8
                   activations, QInt8 weights, MinMax), calibrated by a CalibrationDataReader over the feeds
* ``ort_dynamic``  onnxruntime ``quantize_dynamic`` (QInt8 weights)
* ``ort_nbits``    onnxruntime ``MatMulNBitsQuantizer`` (4-bit, block 32, symmetric, default accuracy level:
                   MatMul with a constant weight -> MatMulNBits); a model without one is "nothing to quantize"
* ``qinject``      ``qinject quantize MODEL -o OUT --calib FOLDER`` (the CLI, as a user runs it: on local-cpu
                   it times its rewrite here and keeps float what runs slower, fit-measured; this tool's
                   own timing, in the measuring process, is the one reported)
* ``qinject_auto`` the same with ``--mode auto`` (per node, the execution mode the target prices fastest)
* ``qinject_1pct`` ``qinject quantize MODEL -o OUT --calib FOLDER --max-drop 1% --eval EVAL.npz``
                   (``--eval`` takes a file, not a folder: EVAL.npz holds the evaluation feeds of the first
                   feed's shapes, concatenated, with their labels)

Each tool runs in its own process with a time limit (a failure or time-out is recorded, never fatal). Then
one process per case loads the float model and every quantized model, measures fidelity on the evaluation
feeds (``Case.fidelity``) and latency (onnxruntime CPU, intra_op_num_threads=2, batch 1 = evaluation feed
0, median of the runs of about ``--latency-s`` seconds per case after warm-up, no spinning, the sessions
interleaved round by round, each round starting one model later, with a 95% interval of each ratio by
resampling the rounds) and file size (external
data included). Each qinject run prints its estimate on its target ("estimated latency on local-cpu: X ms vs
float Y ms"): X / Y is set beside the measured ratio, and a summary counts the written models whose estimate
is within 25% of the measured ratio and on the same side of 1.0. Results go to stdout, to
``WORKDIR/results.json`` and to the ``bench_realworld`` section of BENCHMARKS.md
(``--no-write``: not written).

Usage:
    python tools/bench_realworld.py                              # every case: corpus and light zoo
    python tools/bench_realworld.py --quick --cases nudenet,torchvision_resnet50_dynamo
    python tools/bench_realworld.py --cases light --no-write     # "corpus" and "light" name the two sets
    python tools/bench_realworld.py --exports-rev HEAD           # the exports committed at HEAD
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_common import machine, source_state, write_section  # noqa: E402

SECTION = "bench_realworld"
MAX_ROUNDS = 3000  # thousands of rounds steady a sub-millisecond model's median; more adds nothing
HEADING = "## Real-model corpus and light zoo vs onnxruntime's quantizers, and qinject's latency estimates"
TOOLS = ["ort_static", "ort_dynamic", "ort_nbits", "qinject", "qinject_auto", "qinject_1pct"]
THREADS = 2
QINJECT = Path(sys.executable).with_name("qinject")
LIGHT = "light_"  # case-name prefix of the light-zoo models
ESTIMATE_TOLERANCE = 0.25  # |estimated / measured - 1| that counts as "the estimate holds"
# "estimated latency on local-cpu: 1.234 ms vs float 2.345 ms (...)", the CLI's last line about the estimate
ESTIMATE_LINE = re.compile(r"estimated latency on (\S+): ([\d.]+) ms vs float ([\d.]+) ms")


# --------------------------------------------------------------------------- small helpers

def first_error_line(text: str) -> str:
    """The line that says what went wrong: qinject's 'Error: ...', else a Python exception line, else the
    last line of output."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no output"
    for ln in lines:
        if ln.lower().startswith("error:"):
            return ln
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Fail\w*)\b.*:", ln) or re.match(r"^[\w.]+Error$", ln):
            return ln
    return lines[-1]


def _short(text: str, n: int = 160) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _use_exports_rev(rev: str, work: Path) -> None:
    """Point exports_loader at the exports committed at ``rev`` (the working tree may be mid-regeneration)."""
    from models.realworld import corpus, exports_loader

    dest = work / f"exports@{rev}"
    if not dest.exists():
        tmp = work / "exports.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "models/realworld/exports"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        (tmp / "models/realworld/exports").rename(dest)
    exports_loader.EXPORTS_DIR = dest
    exports_loader.MANIFEST_PATH = dest / "manifest.json"
    exports_loader._manifest.cache_clear()
    corpus._vocab_from_model.cache_clear()
    corpus.CASES.clear()
    corpus.CASES.update(corpus._build_cases())


def eval_npz(feeds: list[dict[str, np.ndarray]], path: Path) -> tuple[Path, int]:
    """The evaluation feeds that share feed 0's shapes, concatenated into one .npz (``--eval`` takes a file).
    Scalar inputs become one value per sample. Returns the path and the number of samples."""
    def shapes(f):
        return {k: np.shape(v)[1:] for k, v in f.items() if np.ndim(v) > 0 and k != "labels"}

    def scalars(f):
        return {k for k, v in f.items() if np.ndim(v) == 0}

    ref = feeds[0]
    group = [f for f in feeds if shapes(f) == shapes(ref) and scalars(f) == scalars(ref)]
    arrays: dict[str, list[np.ndarray]] = {}
    for f in group:
        batch = next((len(v) for k, v in f.items() if np.ndim(v) > 0), 1)
        for k, v in f.items():
            arrays.setdefault(k, []).append(np.full(batch, v) if np.ndim(v) == 0 else v)
    out = {k: np.concatenate(v) for k, v in arrays.items()}
    np.savez(path, **out)
    return path, int(len(next(iter(out.values()))))


# --------------------------------------------------------------------------- cases

def light_case(name: str):
    """A corpus ``Case`` for light-zoo model ``name`` (``light_resnet50``...): the zoo structure with
    He-normal weights at opset 13 (``models.light_zoo.materialize``, as tools/bench_vs_ort.py), fed
    standard-normal images of the model's input shape (as tests/zoo/test_light_zoo.py); top-1 agreement."""
    import onnx

    from models import light_zoo
    from models.realworld import corpus

    zoo = name[len(LIGHT):]
    if zoo not in light_zoo.NAMES:
        raise KeyError(f"unknown light-zoo case {name!r}; known: {[LIGHT + n for n in light_zoo.NAMES]}")
    # The shipped file holds its weights as ConstantOfShape fills: small, read for the input's name and shape.
    shipped = onnx.load(str(light_zoo.light_dir() / f"light_{zoo}.onnx"), load_external_data=False)
    inits = {t.name for t in shipped.graph.initializer}
    x = next(i for i in shipped.graph.input if i.name not in inits)
    shape = tuple(d.dim_value or 1 for d in x.type.tensor_type.shape.dim)

    def make(split: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng([seed, {"calibration": 1, "evaluation": 2}[split], zlib.crc32(zoo.encode())])
        return [{x.name: rng.standard_normal(shape, dtype=np.float32)} for _ in range(n)]

    return corpus.Case(name=name, task="classifier", source="onnx light zoo",
                       _load=lambda: light_zoo.materialize(zoo, 0, opset=13), _make=make,
                       description=f"light-zoo {zoo}, He-normal weights, standard-normal images")


def get_case(name: str):
    from models.realworld import corpus

    return light_case(name) if name.startswith(LIGHT) else corpus.case(name)


def case_names(spec: str | None) -> list[str]:
    """``--cases``: comma-separated names, where ``corpus`` and ``light`` stand for those whole sets."""
    from models import light_zoo
    from models.realworld import corpus

    sets = {"corpus": sorted(corpus.CASES), "light": [LIGHT + n for n in light_zoo.NAMES]}
    names: list[str] = []
    for word in (spec or "corpus,light").split(","):
        names += sets.get(word, [word] if word else [])
    return list(dict.fromkeys(names))


def model_mb(path: Path) -> float:
    """Size of an ONNX file and the external-data files it names."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / e.value for t in _get_all_tensors(model) if uses_external_data(t)
                      for e in t.external_data if e.key == "location"}
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def parse_estimate(stdout: str) -> dict:
    """qinject's printed estimate: quantized and float latency (ms) on its target, and their ratio."""
    found = ESTIMATE_LINE.findall(stdout)
    if not found:
        return {}
    target, est_ms, float_ms = found[-1]
    est, flt = float(est_ms), float(float_ms)
    return {"target": target, "est_ms": est, "est_float_ms": flt, "est_ratio": est / flt if flt > 0 else math.nan}


# --------------------------------------------------------------------------- tool processes

def _all_nodes(graph):
    """Every node of a graph and of the graphs its nodes' attributes hold."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(g)


def nbits_child(model: str, out: str) -> None:
    """onnxruntime's MatMulNBitsQuantizer, 4-bit, block 32, symmetric; prints a JSON line of notes
    (``nothing`` and no file written when no MatMul became MatMulNBits)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(model)
    n_matmul = sum(n.op_type == "MatMul" for n in _all_nodes(m.graph))
    quantizer = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    n_nbits = sum(n.op_type == "MatMulNBits" for n in _all_nodes(quantizer.model.model.graph))
    if n_nbits == 0:
        why = "no MatMul" if n_matmul == 0 else f"none of its {n_matmul} MatMul has a constant weight"
        print(json.dumps({"nothing": f"nothing to quantize ({why})"}))
        return
    big = quantizer.model.model.ByteSize() > 2**31 - 2**26  # protobuf's 2 GB limit, with a margin
    quantizer.model.save_model_to_file(out, use_external_data_format=big)
    print(json.dumps({"note": f"{n_nbits} of {n_matmul} MatMul -> MatMulNBits"}))


def ort_child(tool: str, model: str, calib: str, out: str) -> None:
    """Hidden sub-command: one onnxruntime quantization; prints a JSON line of notes."""
    import onnx
    from onnxruntime import quantization as oq

    notes: dict[str, str] = {}
    if tool == "ort_nbits":
        nbits_child(model, out)
        return
    if tool == "ort_dynamic":
        oq.quantize_dynamic(model, out, weight_type=oq.QuantType.QInt8)
        print(json.dumps(notes))
        return
    names = [i.name for i in onnx.load(model, load_external_data=False).graph.input]

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            files = sorted(Path(calib).glob("*.npz"))
            self._it = iter(files)

        def get_next(self):
            f = next(self._it, None)
            if f is None:
                return None
            with np.load(f) as d:
                return {k: d[k] for k in d.files if k in names}

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/pre.onnx"
        try:
            oq.quant_pre_process(model, src)
        except Exception as exc:  # noqa: BLE001 - recorded, then the raw model is quantized
            notes["note"] = f"quant_pre_process failed ({first_error_line(f'{type(exc).__name__}: {exc}')}); raw model used"
            src = model
        oq.quantize_static(src, out, Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                           calibrate_method=oq.CalibrationMethod.MinMax,
                           activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8)
    print(json.dumps(notes))


def tool_command(tool: str, model: Path, calib: Path, evalf: Path, out: Path) -> list[str]:
    if tool.startswith("ort"):
        return [sys.executable, str(Path(__file__).resolve()), "_ort", tool, str(model), str(calib), str(out)]
    cmd = [str(QINJECT), "quantize", str(model), "-o", str(out), "--calib", str(calib)]
    if tool == "qinject_1pct":
        cmd += ["--max-drop", "1%", "--eval", str(evalf)]
    elif tool == "qinject_auto":
        cmd += ["--mode", "auto"]
    return cmd


def run_tool(cmd: list[str], timeout: float, log: Path) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(THREADS))
    env.pop("QINJECT_NO_MEASURE", None)  # qinject runs as users run it
    try:
        # In the case's own folder: onnxruntime's quant_pre_process leaves temporary files in the cwd.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(log.parent))
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"$ {shlex.join(cmd)}\nTIMEOUT\n{exc.stdout or ''}\n{exc.stderr or ''}")
        return {"error": f"timeout after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    log.write_text(f"$ {shlex.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        return {"error": first_error_line(proc.stderr or proc.stdout), "seconds": seconds, "exit": proc.returncode}
    res: dict = {"seconds": seconds}
    if cmd[0] == sys.executable:
        try:
            res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
    else:
        res.update(parse_estimate(proc.stdout))
        quantized = re.search(r"^quantized (\d+) node\(s\)", proc.stdout, re.MULTILINE)
        if quantized:
            res["quantized_nodes"] = int(quantized.group(1))
    return res


# --------------------------------------------------------------------------- measuring (one process per case)

def measure_child(case_name: str, work: str, latency_s: float, min_rounds: int, exports_rev: str) -> None:
    """Hidden sub-command: fidelity and latency of fp32 and every quantized model of one case."""
    from models.realworld import corpus

    work_p = Path(work)
    if exports_rev:
        _use_exports_rev(exports_rev, work_p.parent)
    c = get_case(case_name)
    feeds = [dict(np.load(f)) for f in sorted((work_p / "eval").glob("*.npz"))]
    models = {"fp32": work_p / "model.onnx"}
    models.update({t: work_p / f"{t}.onnx" for t in TOOLS if (work_p / f"{t}.onnx").exists()})
    result: dict[str, dict] = {}
    sessions = {}
    ref = None
    for label, path in models.items():
        r: dict = {"size_mb": model_mb(path)}
        try:
            sess = corpus.session(path, THREADS, quiet=True)
            outs = corpus.run_model(sess, feeds)
            if label == "fp32":
                ref = outs
            elif ref is not None:
                r["fidelity"] = c.fidelity(ref, outs, feeds)
            sessions[label] = sess
        except Exception as exc:  # noqa: BLE001
            r["run_error"] = first_error_line(f"{type(exc).__name__}: {exc}")
        result[label] = r
    # latency: batch 1 (evaluation feed 0), sessions interleaved round by round
    if sessions:
        names = {k: [i.name for i in s.get_inputs()] for k, s in sessions.items()}
        feed0 = feeds[0]
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for k, s in list(sessions.items()):
            try:
                for _ in range(3):
                    s.run(None, corpus.model_inputs(feed0, names[k]))
            except Exception as exc:  # noqa: BLE001
                result[k]["run_error"] = first_error_line(f"{type(exc).__name__}: {exc}")
                sessions.pop(k)
                times.pop(k)
        # Each round starts one model later, and no session spins (corpus.session(quiet=True)): on a
        # shared machine a spinning session's idle workers slow the next session's run, so a fixed
        # order favoured the model timed right after fp32 (ort_static: SqueezeNet 0.20x, qinject 0.47x;
        # without spinning both 0.42x).
        order = list(sessions)
        inputs = {k: corpus.model_inputs(feed0, names[k]) for k in order}
        one = {}
        for k in order:  # the time one run takes sizes the number of rounds
            t0 = time.perf_counter()
            sessions[k].run(None, inputs[k])
            one[k] = time.perf_counter() - t0
        rounds = int(min(MAX_ROUNDS, max(min_rounds, latency_s / max(sum(one.values()), 1e-6))))
        for r in range(rounds):
            for k in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                sessions[k].run(None, inputs[k])
                times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            result[k]["latency_ms"] = float(np.median(v)) * 1e3
            result[k]["latency_min_ms"] = float(np.min(v)) * 1e3  # spread of the runs, for judging noise
            result[k]["latency_p25_p75_ms"] = [float(x) * 1e3 for x in np.percentile(v, [25, 75])]
            result[k]["latency_runs"] = len(v)
            if k != "fp32" and "fp32" in times:
                result[k]["ratio_ci95"] = ratio_interval(times["fp32"], v)
    print(json.dumps(result, default=float))


def ratio_interval(float_runs: list[float], runs: list[float], draws: int = 2000) -> list[float]:
    """95% interval of the ratio of medians (``runs`` over ``float_runs``), by resampling the rounds:
    the runs of one round were made back to back, so a round is resampled whole (the drift of a shared
    machine hits both alike)."""
    pairs = np.array([float_runs, runs])
    rng = np.random.default_rng(0)
    picks = rng.integers(0, pairs.shape[1], size=(draws, pairs.shape[1]))
    ratios = np.median(pairs[1][picks], axis=1) / np.median(pairs[0][picks], axis=1)
    return [float(x) for x in np.percentile(ratios, [2.5, 97.5])]


# --------------------------------------------------------------------------- one case

def bench_case(name: str, args, root: Path) -> dict:
    from models.realworld import corpus

    c = get_case(name)
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    n_cal, n_eval = (4, 6) if args.quick else (8, 16)
    rec: dict = {"case": name, "task": c.task, "source": c.source, "tools": {}}
    t0 = time.perf_counter()
    try:
        model = c.model()
        import onnx

        onnx.save(model, str(work / "model.onnx"))
        cal, ev = c.calibration(n_cal), c.evaluation(n_eval)
        corpus.save_feeds(cal, work / "calib")
        corpus.save_feeds(ev, work / "eval")
        evalf, n_eval_npz = eval_npz(ev, work / "eval.npz")
        rec.update(calib=corpus.describe(cal), evaluation=corpus.describe(ev), eval_npz_samples=n_eval_npz,
                   prepare_s=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        rec["error"] = f"prepare: {first_error_line(f'{type(exc).__name__}: {exc}')}"
        return rec
    for tool in args.tools:
        out = work / f"{tool}.onnx"
        out.unlink(missing_ok=True)
        cmd = tool_command(tool, work / "model.onnx", work / "calib", work / "eval.npz", out)
        res = run_tool(cmd, args.timeout, work / f"{tool}.log")
        res["command"] = shlex.join(cmd).replace(str(root), "$WORK")
        if "error" not in res and "nothing" not in res and not out.exists():
            res["error"] = "no output file written"
        rec["tools"][tool] = res
        est = f", estimate {res['est_ratio']:.2f}x" if "est_ratio" in res else ""
        print(f"  {tool}: {res.get('error') or res.get('nothing') or 'ok'}{est} ({res['seconds']:.1f} s)", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_measure", name, str(work),
           str(args.latency_s), str(args.min_rounds), args.exports_rev or ""]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * 2,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
        if proc.returncode != 0:
            rec["measure_error"] = first_error_line(proc.stderr)
        else:
            rec["measure"] = json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        rec["measure_error"] = "measurement timed out"
    return rec


# --------------------------------------------------------------------------- reporting

def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _db(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def fidelity_text(task: str, f: dict) -> str:
    s = f"SQNR {_db(f.get('sqnr_db_min'))} dB"
    if task == "classifier":
        t = f"top-1 {_pct(f.get('top1_agreement'))}"
        if "accuracy" in f:
            t += f", acc {_pct(f['accuracy'])} (fp32 {_pct(f.get('accuracy_fp32'))})"
        return f"{t}, {s}"
    if task in ("detector", "layout"):
        n = int(f.get("detections_fp32", 0))
        mae = f.get("score_mae")
        mae_t = "–" if mae is None or math.isnan(mae) else f"{mae:.3f}"
        return f"det {_pct(f.get('det_recall'))} of {n} (prec {_pct(f.get('det_precision'))}), Δscore {mae_t}, {s}"
    if task == "encoder":
        t = f"cos {f.get('cos_mean', math.nan):.4f} (min {f.get('cos_min', math.nan):.3f})"
        if "top1_agreement" in f:
            t += f", tok top-1 {_pct(f['top1_agreement'])}"
        return f"{t}, {s}"
    return s


def key_metric(task: str, f: dict) -> str:
    if task == "classifier":
        return f"top-1 {_pct(f.get('top1_agreement'))}"
    if task in ("detector", "layout"):
        return f"det {_pct(f.get('det_recall'))}"
    if task == "encoder":
        return f"cos {f.get('cos_mean', math.nan):.3f}"
    return f"{_db(f.get('sqnr_db_min'))} dB"


def tool_cell(rec: dict, tool: str) -> tuple[str, str, str, str, str]:
    """(runs, fidelity, latency ratio, size MB, tool s) of one tool on one case."""
    t = rec["tools"].get(tool, {})
    m = rec.get("measure", {})
    fp = m.get("fp32", {})
    secs = f"{t['seconds']:.1f}" if "seconds" in t else "–"
    if "error" in t:
        if "nothing was quantized" in t["error"]:  # qinject's refusal: no node pays on its target
            return "kept float: no node pays on the target (no file written)", "–", "–", "–", secs
        return f"fails: {_short(t['error'])}", "–", "–", "–", secs
    if "nothing" in t:
        return t["nothing"], "–", "–", "–", secs
    if not m:
        return "? (" + _short(rec.get("measure_error", "not measured")) + ")", "–", "–", "–", secs
    q = m.get(tool, {})
    size = f"{q['size_mb']:.2f}" if "size_mb" in q else "–"
    if "run_error" in q:
        return f"fails at run: {_short(q['run_error'])}", "–", "–", size, secs
    ratio = (f"{q['latency_ms'] / fp['latency_ms']:.2f}"
             if q.get("latency_ms") and fp.get("latency_ms") else "–")
    note = t.get("note") or (f"{t['quantized_nodes']} node(s) quantized" if "quantized_nodes" in t else "")
    runs = "yes" + (f" ({_short(note, 80)})" if note else "")
    return runs, fidelity_text(rec["task"], q.get("fidelity", {})), ratio, size, secs


def estimate_pair(rec: dict, tool: str) -> tuple[float, float] | None:
    """(estimated, measured) latency ratio to fp32 of a qinject output that ran, else None."""
    est = rec["tools"].get(tool, {}).get("est_ratio")
    m = rec.get("measure", {})
    q, fp = m.get(tool, {}), m.get("fp32", {})
    if est is None or not q.get("latency_ms") or not fp.get("latency_ms") or "run_error" in q:
        return None
    return est, q["latency_ms"] / fp["latency_ms"]


def estimate_lines(records: list[dict], tools: list[str]) -> list[str]:
    """The estimate-vs-measurement table and its per-tool summary."""
    tools = [t for t in tools if t.startswith("qinject")]
    rows, counts = [], {t: [0, 0, 0, 0] for t in tools}  # holds, within tolerance, same side, written
    for rec in records:
        for tool in tools:
            pair = estimate_pair(rec, tool)
            if pair is None:
                continue
            est, meas = pair
            within = abs(est / meas - 1.0) <= ESTIMATE_TOLERANCE
            same_side = est == 1.0 or (est < 1.0) == (meas < 1.0)
            c = counts[tool]
            c[0], c[1], c[2], c[3] = c[0] + (within and same_side), c[1] + within, c[2] + same_side, c[3] + 1
            why = ([] if within else [f"{est / meas - 1.0:+.0%}"]) + ([] if same_side else ["other side of 1.0"])
            verdict = f"no ({', '.join(why)})" if why else "yes"
            target = rec["tools"][tool].get("target", "?")
            rows.append(f"| {rec['case']} | {tool} | {target} | {est:.2f} | {meas:.2f} | {est / meas:.2f} | {verdict} |")
    if not rows:
        return []
    intro = ("Estimates vs measurement: qinject's printed estimate on its target (quantized / float) beside the "
             f"measured ratio above; it holds when |estimated / measured - 1| <= {ESTIMATE_TOLERANCE:.0%} and both "
             "are on the same side of 1.0 (an estimate of exactly 1.00, nothing changed, sides with either).")
    lines = ["", intro, ""]
    total = [sum(c[i] for c in counts.values()) for i in range(4)]
    for tool, (holds, within, side, n) in counts.items():
        if n:
            lines.append(f"- {tool}: the estimate holds on {holds} of {n} written models ({within} within "
                         f"{ESTIMATE_TOLERANCE:.0%}, {side} on the same side of 1.0)")
    lines.append(f"- all qinject outputs: {total[0]} of {total[3]} hold ({total[1]} within {ESTIMATE_TOLERANCE:.0%}, "
                 f"{total[2]} on the same side of 1.0)")
    lines += ["", "| case | tool | target | estimated | measured | est / meas | holds |",
              "|---|---|---|---|---|---|---|", *rows]
    return lines


def slower_lines(records: list[dict], tools: list[str]) -> list[str]:
    """The qinject outputs measured slower than fp32, and which of them are slower beyond the noise
    (the ratio's 95% interval above 1.0)."""
    slower, beyond = [], []
    written = 0
    for rec in records:
        m = rec.get("measure", {})
        for tool in (t for t in tools if t.startswith("qinject")):
            q, fp = m.get(tool, {}), m.get("fp32", {})
            if not q.get("latency_ms") or not fp.get("latency_ms") or "run_error" in q:
                continue
            written += 1
            ratio, ci = q["latency_ms"] / fp["latency_ms"], q.get("ratio_ci95")
            if ratio > 1.0:
                where = f"{rec['case']} / {tool} {ratio:.2f}×" + (f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci else "")
                slower.append(where)
                if ci and ci[0] > 1.0:
                    beyond.append(where)
    if not written:
        return []
    return ["", f"Never slower than float: {len(slower)} of {written} written qinject outputs measured above "
            f"1.0× ({', '.join(slower) or 'none'}); {len(beyond)} of them beyond the noise, their 95% interval "
            f"above 1.0 ({', '.join(beyond) or 'none'})."]


def render(records: list[dict], args, started: str, elapsed: float) -> str:
    import onnxruntime as ort

    cmd = "python tools/bench_realworld.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    n_light = sum(r["case"].startswith(LIGHT) for r in records)
    lines = [HEADING, "",
             f"Written by `tools/bench_realworld.py` on {started} ({elapsed / 60:.0f} min). Machine: {machine()}. "
             f"onnxruntime {ort.__version__}, Python {platform.python_version()}, {source_state()}.",
             f"Command: `{cmd.strip()}`.", "",
             f"{len(records) - n_light} cases of `models/realworld/corpus.py` (models from PyPI packages with their "
             "own preprocessing, and the exports of `models/realworld/exports`) and "
             f"{n_light} of the light zoo (`models/light_zoo.py`: the classic conv-net structures shipped in onnx "
             "with He-normal weights at opset 13, fed standard-normal images, named `light_*`), each "
             "quantized from the same float file and the same "
             f"calibration feeds ({'4' if args.quick else '8'} feeds; shapes vary between feeds) by onnxruntime "
             "`quantize_static` (after `quant_pre_process`; QDQ, per-channel, QUInt8 activations / QInt8 weights, "
             "MinMax), `quantize_dynamic` (QInt8 weights), `MatMulNBitsQuantizer` (`ort_nbits`: 4-bit weights, "
             "block 32, symmetric, default accuracy level; only MatMul with a constant weight, so a model without "
             "one has nothing to quantize), `qinject quantize --calib FOLDER` (as users run it: on local-cpu it "
             "times its rewrite before writing it and keeps float what runs slower; the timing reported here is "
             "this tool's own), the same with `--mode auto` (`qinject_auto`), and "
             "`qinject quantize --calib FOLDER --max-drop 1% --eval EVAL.npz` (`--eval` takes a file, not a folder: "
             "EVAL.npz holds the evaluation feeds that share feed 0's shapes). Fidelity against fp32 on "
             f"{'6' if args.quick else '16'} evaluation feeds (disjoint from calibration): classifiers top-1 "
             "agreement (accuracy vs labels where known), detectors/layout the share of fp32 detections (after the "
             "package's own post-processing) matched by a same-class quantized detection with IoU >= 0.5, encoders "
             "cosine per token, otherwise the lowest output SQNR. Latency ratio = quantized / fp32 (onnxruntime CPU, "
             f"intra_op_num_threads={THREADS}, no spinning, batch 1, median of the runs of about {args.latency_s:.0f} s "
             f"per case ({args.min_rounds} to {MAX_ROUNDS} rounds) after warm-up, all models of a case measured in "
             "one process, interleaved, each round one run of each model, starting one model later; the details "
             "give the 95% interval of each ratio, resampling the rounds); qinject's columns also give "
             "its own estimate of that ratio (est). File sizes include external data. "
             f"Tool time limit {args.timeout:.0f} s.",
             "", "Latency ratio (lower is faster), key fidelity and file size, side by side:", "",
             "| case | task | fp32 ms · MB | " + " | ".join(args.tools) + " |",
             "|---|---|---|" + "---|" * len(args.tools)]
    for rec in records:
        fp = rec.get("measure", {}).get("fp32", {})
        fp_ms = f"{fp['latency_ms']:.2f}" if fp.get("latency_ms") else "–"
        fp_mb = f"{fp['size_mb']:.1f}" if "size_mb" in fp else "–"
        cells = []
        for tool in args.tools:
            if "error" in rec:
                cells.append("–")
                continue
            runs, _, ratio, size, _ = tool_cell(rec, tool)
            if runs.startswith("fails"):
                cells.append("fails")
            elif ratio == "–":
                cells.append(_short(runs, 40))
            else:
                f = rec["measure"].get(tool, {}).get("fidelity", {})
                est = rec["tools"][tool].get("est_ratio")
                est_t = f" (est {est:.2f})" if est is not None else ""
                cells.append(f"{ratio}×{est_t} · {key_metric(rec['task'], f)} · {float(size):.1f} MB")
        lines.append(f"| {rec['case']} | {rec['task']} | {fp_ms} · {fp_mb} | " + " | ".join(cells) + " |")
    lines += slower_lines(records, args.tools)
    lines += estimate_lines(records, args.tools)
    lines += ["", "Details:", "",
              "| case | tool | runs | fidelity vs fp32 | latency ratio | est. ratio | size MB | tool s |",
              "|---|---|---|---|---|---|---|---|"]
    for rec in records:
        if "error" in rec:
            lines.append(f"| {rec['case']} | – | {_short(rec['error'])} | | | | | |")
            continue
        fp = rec.get("measure", {}).get("fp32", {})
        size = f"{fp['size_mb']:.2f}" if "size_mb" in fp else "–"
        lines.append(f"| {rec['case']} | fp32 | " + ("yes" if fp and "run_error" not in fp else
                                                   _short(fp.get("run_error", rec.get("measure_error", "?"))))
                     + f" | {_short(rec.get('evaluation', ''), 120)} | 1.00 | | {size} | |")
        for tool in args.tools:
            runs, fidelity, ratio, size, secs = tool_cell(rec, tool)
            ci = rec.get("measure", {}).get(tool, {}).get("ratio_ci95")
            ratio += f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci and ratio != "–" else ""
            est = rec["tools"].get(tool, {}).get("est_ratio")
            est_t = f"{est:.2f}" if est is not None else ""
            lines.append(f"| {rec['case']} | {tool} | {runs} | {fidelity} | {ratio} | {est_t} | {size} | {secs} |")
    fails = [(r["case"], t, r["tools"][t]) for r in records for t in args.tools
             if t.startswith("qinject") and "error" in r.get("tools", {}).get(t, {})]
    run_fails = [(r["case"], t, r["measure"][t]["run_error"]) for r in records if "measure" in r
                 for t in args.tools if t.startswith("qinject") and "run_error" in r["measure"].get(t, {})]
    if fails or run_fails:
        lines += ["", "qinject failures (command, first error line):", ""]
        for case_name, tool, t in fails:
            lines.append(f"- {case_name} / {tool}: `{t.get('command', '')}` → {_short(t['error'], 300)}")
        for case_name, tool, err in run_fails:
            lines.append(f"- {case_name} / {tool}: the written model fails in onnxruntime → {_short(err, 300)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ort":
        ort_child(*argv[1:5])
        return 0
    if argv and argv[0] == "_measure":
        measure_child(argv[1], argv[2], float(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else "")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated case names; 'corpus' and 'light' name those sets "
                    "(default: corpus,light)")
    ap.add_argument("--quick", action="store_true", help="4 calibration and 6 evaluation feeds")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {TOOLS}")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per tool run")
    ap.add_argument("--latency-s", type=float, default=12.0,
                    help="seconds of timing per case, all its models together (default 12)")
    ap.add_argument("--min-rounds", type=int, default=20, help="rounds (one run of each model) at least")
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--exports-rev", help="use the exports committed at this git revision")
    ap.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    if args.min_rounds < 20:
        ap.error("at least 20 latency rounds (--min-rounds)")
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="bench_realworld_"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.exports_rev:
        _use_exports_rev(args.exports_rev, root)
    names = case_names(args.cases)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    records = []
    for name in names:
        print(f"{name}", flush=True)
        try:
            rec = bench_case(name, args, root)
        except Exception as exc:  # noqa: BLE001 - one case never stops the others
            rec = {"case": name, "task": "?", "source": "?", "tools": {},
                   "error": first_error_line(f"{type(exc).__name__}: {exc}")}
        records.append(rec)
        (root / "results.json").write_text(json.dumps(records, indent=1, default=float))
        if not args.no_write and len(records) < len(names):  # partial results survive an interruption
            body = render(records, args, started, time.perf_counter() - t0)
            write_section(ROOT / "BENCHMARKS.md", SECTION,
                          body.replace("\n", f"\n\n(Partial: {len(records)} of {len(names)} cases so far.)\n", 1))
    body = render(records, args, started, time.perf_counter() - t0)
    print(body)
    print(f"\nfiles in {root}")
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
