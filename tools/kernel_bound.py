"""How fast can onnxruntime's CPU kernels make a model at best? Per node, the float kernel against the
integer one, from onnxruntime's own profiler.

For each case (a folder holding ``model.onnx`` and ``eval.npz``, as ``tools/bench_realworld.py``
leaves them), the float model and a W8A8 rewrite of every quantizable node (``qinject quantize
--force``, per-channel, static: onnxruntime fuses it into QLinearConv / QLinearMatMul / QGemm /
QLinearAdd ...) are run ``--runs`` times on evaluation feed 0 with onnxruntime's profiler
(intra_op_num_threads=2, no spinning), and each node's median kernel time is taken. A node of the
rewrite is matched to the float node it came from by name: qinject keeps a quantized node's name,
and onnxruntime's fusions keep the name of the node they are built on.

The bound: every quantizable node at the faster of its float and its integer kernel, every other
node at its float time, and **no conversions at all** (no QuantizeLinear, DequantizeLinear or layout
Transpose). No plan of per-node choices can run faster on these kernels, since any real plan adds
conversions where float and integer nodes meet. ``bound / float`` is therefore a floor on the latency
ratio qinject (or any QDQ quantizer using these kernels) can reach; if it is above 0.67, a 1.5x
speed-up is out of reach on this machine.

Usage:
    python tools/kernel_bound.py WORKDIR --cases torchvision_mobilenet_v3_small_dynamo,nudenet [--runs 50]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

WARMUP = 5  # runs whose kernel times are dropped (first allocations, cold caches)
QUANTIZABLE = {"Conv", "MatMul", "Gemm", "ConvTranspose", "FusedConv", "FusedMatMul", "FusedGemm",
               "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "ConvInteger", "MatMulInteger"}
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def kernel_times(path: Path, feeds: dict[str, np.ndarray], runs: int) -> dict[str, tuple[str, float]]:
    """Node name -> (op, median kernel microseconds) over ``runs`` runs after ``WARMUP`` more, in one
    session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    for _ in range(WARMUP + runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            times[name].append(event["dur"])
            ops[name] = event["args"]["op_name"]
    return {name: (ops[name], float(np.median(values[WARMUP:] or values))) for name, values in times.items()}


class Names:
    """Maps a profiled node name to the model node it runs. onnxruntime renames what it transforms:
    its NCHWc layout names a convolution after its output tensor (``<tensor>_nchwc``, the tensor of
    an activation it fused in), and its QDQ fusions extend the name of the node they are built on
    (``<name>_token_19``)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = {out: n for n in model.graph.node for out in n.output}

    def resolve(self, name: str) -> str | None:
        if name in self.nodes:
            return name
        if name.endswith("_nchwc"):
            node = self.producer.get(name[: -len("_nchwc")])
            while node is not None and node.op_type not in QUANTIZABLE and node.input:
                node = self.producer.get(node.input[0])  # back through the fused activation
            return node.name if node is not None else None
        for cut in range(len(name) - 1, 0, -1):
            if name[cut] == "_" and name[:cut] in self.nodes:
                return name[:cut]
        return None


def bound(case: Path, runs: int, integer_file: str | None = None) -> dict:
    feeds = dict(np.load(case / "eval.npz"))
    feeds = {k: v[:1] for k, v in feeds.items() if k != "labels"}
    forced = case / (integer_file or "kernel_bound_w8a8.onnx")
    if integer_file is None and not forced.exists():
        cli = Path(sys.executable).with_name("qinject")  # the venv's command, beside its python
        subprocess.run([str(cli), "quantize", str(case / "model.onnx"), "-o", str(forced),
                        "--calib", str(case / "calib"), "--force", "--no-measure", "--target", "none"],
                       check=True, capture_output=True)
    model = onnx.load(case / "model.onnx", load_external_data=False)
    names = Names(model)
    floated = {names.resolve(n) or n: t for n, t in kernel_times(case / "model.onnx", feeds, runs).items()}
    quantized = kernel_times(forced, feeds, runs)
    integer: dict[str, float] = collections.defaultdict(float)
    conversions = unmatched = 0.0
    for name, (op, us) in quantized.items():
        origin = names.resolve(name)
        if op in CONVERSIONS or (op == "Transpose" and origin is None):
            conversions += us
        elif origin is None or origin not in floated:
            unmatched += us
        else:
            integer[origin] += us
    total = sum(us for _, us in floated.values())
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node}
    best, kinds = 0.0, collections.defaultdict(lambda: [0, 0.0, 0.0])  # kind -> [nodes, float us, best us]
    for name, (op, us) in floated.items():
        if name in integer and (op in QUANTIZABLE or integer_file is not None):
            kind = ("depthwise/grouped conv" if groups.get(name, 1) > 1 else "conv" if "Conv" in op
                    else "matmul" if op in QUANTIZABLE else "other")
            fastest = min(us, integer[name])
            best += fastest
            row = kinds[kind]
            row[0], row[1], row[2] = row[0] + 1, row[1] + us, row[2] + fastest
        else:
            best += us
    return {"case": case.name, "float_ms": total / 1e3, "all_int8_ms": sum(us for _, us in quantized.values()) / 1e3,
            "bound_ms": best / 1e3, "bound_ratio": best / total, "conversions_ms": conversions / 1e3,
            "unmatched_ms": unmatched / 1e3,
            "kinds": {k: {"nodes": n, "float_ms": f / 1e3, "best_ms": b / 1e3} for k, (n, f, b) in kinds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--cases", required=True, help="comma-separated case folders of WORKDIR")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--integer-file", help="an integer model already in each case folder (ort_static.onnx: "
                        "onnxruntime's quantize_static, which also runs Sigmoid, Mul, Concat ... on integers) to "
                        "take the integer kernels from, every node counted; default: qinject's W8A8 of every "
                        "quantizable node, those nodes counted")
    args = parser.parse_args()
    rows = [bound(args.workdir / c, args.runs, args.integer_file) for c in args.cases.split(",")]
    print("| case | float ms | all W8A8 ms (ratio) | bound ms | bound / float | per kind: float -> best ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        nodes = ", ".join(f"{v['nodes']} {k} {v['float_ms']:.2f} -> {v['best_ms']:.2f}"
                          for k, v in sorted(r["kinds"].items()))
        print(f"| {r['case']} | {r['float_ms']:.2f} | {r['all_int8_ms']:.2f} ({r['all_int8_ms'] / r['float_ms']:.2f}x) "
              f"| {r['bound_ms']:.2f} | **{r['bound_ratio']:.2f}x** | {nodes} |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
