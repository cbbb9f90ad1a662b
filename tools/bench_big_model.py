"""Big models and bounded memory (issue #8): a model whose weights exceed 2 GB, and calibration of
a model with large activations, each quantized by ``qinject quantize`` in a child process whose
peak RSS is measured.

1. ``big``: three MatMul layers of float32 [N, N] weights (N = 14000: 2.35 GB), written straight
   to one external-data file (no protobuf ever holds them). Quantized W8A8. Reported: weight bytes,
   peak RSS of the quantize process and its ratio to the weight bytes (loading the weights twice
   would make it above 2), wall time, the output's size (external data), and whether onnxruntime
   runs it and matches float on one input.
2. ``activations``: a convolution stack on 1x32x512x512 inputs (each activation 32 MB), calibrated
   on 4 and on 32 samples: peak RSS of both runs side by side (bounded memory: the same peak,
   whatever the number of calibration samples).

Results go to stdout and the ``bench_big_model`` section of ``BENCHMARKS.md``.

Usage:
    python tools/bench_big_model.py [--n 14000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import machine, source_state, write_section  # noqa: E402

SECTION = "bench_big_model"


def external_tensor(name: str, shape: tuple[int, ...], data_file: Path, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    length = int(np.prod(shape)) * 4
    for key, value in (("location", data_file.name), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def make_big(folder: Path, n: int, layers: int = 3) -> tuple[Path, int]:
    """The model and its weight bytes; weights written layer by layer (one layer in memory at a time)."""
    data_file = folder / "big.onnx.data"
    rng = np.random.default_rng(0)
    tensors, offset = [], 0
    with open(data_file, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32)
            f.write(w.tobytes())
            tensors.append(external_tensor(f"w{i}", (n, n), data_file, offset))
            offset += w.nbytes
            del w
    nodes, cur = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        cur = f"r{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["batch", n])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(folder / "big.calib.npz", x=rng.standard_normal((8, n), dtype=np.float32))
    return path, offset


def make_activations(folder: Path, samples: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    nodes, inits, cur, c = [], [], "x", 3
    for i, width in enumerate((32, 32, 32)):
        w = (rng.standard_normal((width, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        cur, c = f"r{i}", width
    graph = helper.make_graph(nodes, "acts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 512, 512])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, c, 512, 512])], inits)
    path = folder / "acts.onnx"
    if not path.exists():
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calib = folder / f"acts.calib{samples}"
    calib.mkdir(exist_ok=True)
    for i in range(samples):  # a folder of one-sample files: the data itself is never all in memory
        np.save(calib / f"{i:03d}.npy", rng.standard_normal((1, 3, 512, 512), dtype=np.float32))
    return path, calib


def quantize_child(model: Path, out: Path, calib: Path) -> tuple[float, float, float]:
    """(peak RSS in MiB, seconds, peak anonymous memory in MiB) of `qinject quantize` in a child process
    (``tools/measure_memory.py``)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "measure_memory.py"), "quantize", str(model), "-o",
                           str(out), "--calib", str(calib), "--target", "none"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stderr.splitlines()
    peak = next((float(line.split()[1]) / 1024 for line in lines if line.startswith("PEAK")), 0.0)
    anon = next((float(line.split()[1]) / 1024 for line in lines if line.startswith("ANON")), 0.0)
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed: {lines[-3:]}")
    return peak, seconds, anon


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=14000, help="weight side of the big model's layers")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path, weight_bytes = make_big(folder, args.n)
        out = folder / "big.q.onnx"
        peak, seconds, anon = quantize_child(path, out, folder / "big.calib.npz")
        out_bytes = out.stat().st_size + sum(f.stat().st_size for f in folder.glob("big.q.onnx.data"))
        import onnxruntime as ort

        x = np.load(folder / "big.calib.npz")["x"][:1]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        q = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        f = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        sqnr = 10 * np.log10(np.sum(f.astype(np.float64) ** 2) / np.sum((f - q).astype(np.float64) ** 2))
        rows = []
        for samples in (4, 32):
            model, calib = make_activations(folder, samples)
            a_peak, a_seconds, a_anon = quantize_child(model, folder / f"acts{samples}.q.onnx", calib)
            rows.append((samples, a_peak, a_seconds, a_anon))
    lines = ["## Big models and bounded memory (`tools/bench_big_model.py`)", "",
             f"- date: {datetime.date.today().isoformat()}; machine: {machine()}; {source_state()}",
             f"- reproduce: `python tools/bench_big_model.py {' '.join(argv)}`", "",
             "Peak RSS counts file-backed pages once per mapping (weights mapped by qinject and again by "
             "onnxruntime count twice, though they are one copy in memory); peak anonymous memory is what copies and "
             "temporaries cost (`tools/measure_memory.py`).", "",
             "| case | weights | peak RSS | peak anonymous memory | anonymous / weights | seconds | output | check |",
             "|---|---|---|---|---|---|---|---|",
             f"| 3 x MatMul [{args.n}x{args.n}] W8A8, external data | {weight_bytes / 2**30:.2f} GiB | "
             f"{peak / 1024:.2f} GiB | {anon / 1024:.2f} GiB | {anon * 2**20 / weight_bytes:.2f} | {seconds:.0f} | "
             f"{out_bytes / 2**30:.2f} GiB (external data) | onnxruntime runs it; SQNR vs float {sqnr:.1f} dB |", "",
             "Calibration of a conv stack with 32 MB activations (1x32x512x512), one-sample files:", "",
             "| calibration samples | peak RSS | peak anonymous memory | seconds |", "|---|---|---|---|"]
    lines += [f"| {s} | {p:.0f} MiB | {a:.0f} MiB | {t:.0f} |" for s, p, t, a in rows]
    ratio = rows[1][1] / rows[0][1]
    lines += ["", f"Peak RSS with 32 samples is {ratio:.2f}x the peak with 4: calibration memory does not grow with "
                  "the data (one batch of activations plus fixed-size statistics per tensor)."]
    text = "\n".join(lines)
    print(text)
    write_section(args.output, SECTION, text)


if __name__ == "__main__":
    main(sys.argv[1:])
