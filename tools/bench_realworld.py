"""Benchmark the real-model corpus (``models/realworld/corpus.py``): onnxruntime's quantizers vs qinject.

For every case (the 4 PyPI models and every export of ``exports_loader``), from the same float file and
the same calibration feeds:

* ``ort_static``   onnxruntime ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, QUInt8
                   activations, QInt8 weights, MinMax), calibrated by a CalibrationDataReader over the feeds
* ``ort_dynamic``  onnxruntime ``quantize_dynamic`` (QInt8 weights)
* ``qinject``      ``qinject quantize MODEL -o OUT --calib FOLDER --no-measure`` (the CLI; ``--no-measure``
                   skips qinject's own timing of its output, this tool's timing is the one reported)
* ``qinject_1pct`` ``qinject quantize MODEL -o OUT --calib FOLDER --no-measure --max-drop 1% --eval EVAL.npz``
                   (``--eval`` takes a file, not a folder: EVAL.npz holds the evaluation feeds of the first
                   feed's shapes, concatenated, with their labels)

Each tool runs in its own process with a time limit (a failure or time-out is recorded, never fatal). Then
one process per case loads the float model and every quantized model, measures fidelity on the evaluation
feeds (``Case.fidelity``) and latency (onnxruntime CPU, intra_op_num_threads=2, batch 1 = evaluation feed
0, median of >= 20 runs after warm-up, the sessions interleaved round by round). Results go to stdout, to
``WORKDIR/results.json`` and to the "Real-model corpus vs onnxruntime's quantizers" section of BENCHMARKS.md.

Usage:
    python tools/bench_realworld.py                              # every case
    python tools/bench_realworld.py --quick --cases nudenet,torchvision_resnet50_dynamo
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_common import machine, source_state, write_section  # noqa: E402

SECTION = "bench_realworld"
HEADING = "## Real-model corpus vs onnxruntime's quantizers"
TOOLS = ["ort_static", "ort_dynamic", "qinject", "qinject_1pct"]
THREADS = 2
QINJECT = Path(sys.executable).with_name("qinject")


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


# --------------------------------------------------------------------------- tool processes

def ort_child(tool: str, model: str, calib: str, out: str) -> None:
    """Hidden sub-command: one onnxruntime quantization; prints a JSON line of notes."""
    import onnx
    from onnxruntime import quantization as oq

    notes: dict[str, str] = {}
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
    cmd = [str(QINJECT), "quantize", str(model), "-o", str(out), "--calib", str(calib), "--no-measure"]
    if tool == "qinject_1pct":
        cmd += ["--max-drop", "1%", "--eval", str(evalf)]
    return cmd


def run_tool(cmd: list[str], timeout: float, log: Path) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(THREADS))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
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
    return res


# --------------------------------------------------------------------------- measuring (one process per case)

def measure_child(case_name: str, work: str, rounds: int, runs_per_round: int, exports_rev: str) -> None:
    """Hidden sub-command: fidelity and latency of fp32 and every quantized model of one case."""
    from models.realworld import corpus

    work_p = Path(work)
    if exports_rev:
        _use_exports_rev(exports_rev, work_p.parent)
    c = corpus.case(case_name)
    feeds = [dict(np.load(f)) for f in sorted((work_p / "eval").glob("*.npz"))]
    models = {"fp32": work_p / "model.onnx"}
    models.update({t: work_p / f"{t}.onnx" for t in TOOLS if (work_p / f"{t}.onnx").exists()})
    result: dict[str, dict] = {}
    sessions = {}
    ref = None
    for label, path in models.items():
        r: dict = {"size_mb": path.stat().st_size / 1e6}
        try:
            sess = corpus.session(path, THREADS)
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
        for _ in range(rounds):
            for k, s in sessions.items():
                f = corpus.model_inputs(feed0, names[k])
                for _ in range(runs_per_round):
                    t0 = time.perf_counter()
                    s.run(None, f)
                    times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            result[k]["latency_ms"] = float(np.median(v)) * 1e3
            result[k]["latency_runs"] = len(v)
    print(json.dumps(result, default=float))


# --------------------------------------------------------------------------- one case

def bench_case(name: str, args, root: Path) -> dict:
    from models.realworld import corpus

    c = corpus.case(name)
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
        if "error" not in res and not out.exists():
            res["error"] = "no output file written"
        rec["tools"][tool] = res
        print(f"  {tool}: {res.get('error') or 'ok'} ({res['seconds']:.1f} s)", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_measure", name, str(work),
           str(args.rounds), str(args.runs_per_round), args.exports_rev or ""]
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
        return f"fails: {_short(t['error'])}", "–", "–", "–", secs
    if not m:
        return "? (" + _short(rec.get("measure_error", "not measured")) + ")", "–", "–", "–", secs
    q = m.get(tool, {})
    size = f"{q['size_mb']:.2f}" if "size_mb" in q else "–"
    if "run_error" in q:
        return f"fails at run: {_short(q['run_error'])}", "–", "–", size, secs
    ratio = (f"{q['latency_ms'] / fp['latency_ms']:.2f}"
             if q.get("latency_ms") and fp.get("latency_ms") else "–")
    runs = "yes" + (f" ({_short(t['note'], 80)})" if t.get("note") else "")
    return runs, fidelity_text(rec["task"], q.get("fidelity", {})), ratio, size, secs


def render(records: list[dict], args, started: str, elapsed: float) -> str:
    import onnxruntime as ort

    cmd = "python tools/bench_realworld.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [HEADING, "",
             f"Written by `tools/bench_realworld.py` on {started} ({elapsed / 60:.0f} min). Machine: {machine()}. "
             f"onnxruntime {ort.__version__}, Python {platform.python_version()}, {source_state()}.",
             f"Command: `{cmd.strip()}`.", "",
             "Every case of `models/realworld/corpus.py` (4 models from PyPI packages with their own preprocessing, "
             "and the exports of `models/realworld/exports`) quantized from the same float file and the same "
             f"calibration feeds ({'4' if args.quick else '8'} feeds; shapes vary between feeds) by onnxruntime "
             "`quantize_static` (after `quant_pre_process`; QDQ, per-channel, QUInt8 activations / QInt8 weights, "
             "MinMax), `quantize_dynamic` (QInt8 weights), `qinject quantize --calib FOLDER --no-measure` and "
             "`qinject quantize --calib FOLDER --no-measure --max-drop 1% --eval EVAL.npz` (`--no-measure`: this "
             "tool's timing is the one reported; `--eval` takes a file, not a folder: "
             "EVAL.npz holds the evaluation feeds that share feed 0's shapes). Fidelity against fp32 on "
             f"{'6' if args.quick else '16'} evaluation feeds (disjoint from calibration): classifiers top-1 "
             "agreement (accuracy vs labels where known), detectors/layout the share of fp32 detections (after the "
             "package's own post-processing) matched by a same-class quantized detection with IoU >= 0.5, encoders "
             "cosine per token, otherwise the lowest output SQNR. Latency ratio = quantized / fp32 (onnxruntime CPU, "
             f"intra_op_num_threads={THREADS}, batch 1, median of {args.rounds * args.runs_per_round} runs after "
             f"warm-up, all models of a case measured in one process, interleaved). Tool time limit {args.timeout:.0f} s.",
             "", "Latency ratio (lower is faster) and key fidelity, side by side:", "",
             "| case | task | fp32 ms | " + " | ".join(args.tools) + " |",
             "|---|---|---|" + "---|" * len(args.tools)]
    for rec in records:
        fp = rec.get("measure", {}).get("fp32", {})
        fp_ms = f"{fp['latency_ms']:.2f}" if fp.get("latency_ms") else "–"
        cells = []
        for tool in args.tools:
            if "error" in rec:
                cells.append("–")
                continue
            runs, _, ratio, _, _ = tool_cell(rec, tool)
            if runs.startswith("fails"):
                cells.append("fails")
            elif ratio == "–":
                cells.append(_short(runs, 40))
            else:
                f = rec["measure"].get(tool, {}).get("fidelity", {})
                cells.append(f"{ratio}× · {key_metric(rec['task'], f)}")
        lines.append(f"| {rec['case']} | {rec['task']} | {fp_ms} | " + " | ".join(cells) + " |")
    lines += ["", "Details:", "", "| case | tool | runs | fidelity vs fp32 | latency ratio | size MB | tool s |",
              "|---|---|---|---|---|---|---|"]
    for rec in records:
        if "error" in rec:
            lines.append(f"| {rec['case']} | – | {_short(rec['error'])} | | | | |")
            continue
        fp = rec.get("measure", {}).get("fp32", {})
        size = f"{fp['size_mb']:.2f}" if "size_mb" in fp else "–"
        lines.append(f"| {rec['case']} | fp32 | " + ("yes" if fp and "run_error" not in fp else
                                                   _short(fp.get("run_error", rec.get("measure_error", "?"))))
                     + f" | {_short(rec.get('evaluation', ''), 120)} | 1.00 | {size} | |")
        for tool in args.tools:
            runs, fidelity, ratio, size, secs = tool_cell(rec, tool)
            lines.append(f"| {rec['case']} | {tool} | {runs} | {fidelity} | {ratio} | {size} | {secs} |")
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
        measure_child(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else "")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated case names (default: every case)")
    ap.add_argument("--quick", action="store_true", help="4 calibration and 6 evaluation feeds")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {TOOLS}")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per tool run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs-per-round", type=int, default=5)
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--exports-rev", help="use the exports committed at this git revision")
    ap.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    if args.rounds * args.runs_per_round < 20:
        ap.error("at least 20 latency runs (rounds x runs-per-round)")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_realworld_"))
    root.mkdir(parents=True, exist_ok=True)
    from models.realworld import corpus

    if args.exports_rev:
        _use_exports_rev(args.exports_rev, root)
    names = args.cases.split(",") if args.cases else sorted(corpus.CASES)
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
