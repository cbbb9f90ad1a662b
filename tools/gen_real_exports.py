#!/usr/bin/env python3
"""Export a corpus of real ONNX models with the real exporters into models/realworld/exports.

PyTorch's two exporters (``torch.onnx.export(dynamo=False)``, the TorchScript exporter, and
``dynamo=True``) run on random-init, seeded models: torchvision classifiers, small Hugging Face
transformers, TorchScript modules with data-dependent ``If``/``Loop``, and LSTM/GRU nets. The Keras
part lives in ``tools/gen_real_exports_tf.py`` (its own virtual environment) and reuses the
helpers here (everything above ``# ---- torch part`` needs only numpy, onnx and onnxruntime).

Each export is checked: onnxruntime runs the exported model against the framework's own output
(``max_abs_diff``), then the committed file, reloaded through ``models/realworld/exports_loader.py``,
runs on two sizes of every dynamic axis with finite outputs. A file over ``SIZE_LIMIT`` is committed
structure-only (see the loader). An export that fails is recorded in the manifest with its error.

    python3 -m venv /work/genvenv
    /work/genvenv/bin/pip install -r tools/gen_real_exports.requirements.txt
    /work/genvenv/bin/python tools/gen_real_exports.py            # all torch models
    /work/genvenv/bin/python tools/gen_real_exports.py --only resnet50 bert   # some of them
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

try:  # the Keras environment has no torch: it uses only the shared helpers below
    import torch
    from torch import nn
except ImportError:
    torch = nn = None

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "models" / "realworld" / "exports"
LOADER_PATH = REPO / "models" / "realworld" / "exports_loader.py"
SIZE_LIMIT = 3 * 1024 * 1024       # a file over this is committed structure-only
STRIP_MIN_ELEMENTS = 1024          # float initializers with more elements than this are stripped
GLOBAL_SEED = 0


def _load_loader():
    spec = importlib.util.spec_from_file_location("qinject_exports_loader", LOADER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loader = _load_loader()


# ---- shared helpers (numpy, onnx, onnxruntime only) ------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:400]


def error_record(exc: BaseException) -> dict[str, str]:
    """The error's first line, plus the first line of its cause where it has one."""
    record = {"error": first_line(exc)}
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        record["error_cause"] = first_line(cause)
    return record


def graphs(graph: onnx.GraphProto):
    yield from loader._graphs(graph)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for g in graphs(model.graph):
        for node in g.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    return dict(sorted(counts.items()))


def _dims(value_info: onnx.ValueInfoProto) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in shape.dim]


def _dtype(value_info: onnx.ValueInfoProto) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)).name


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Make every main-graph Constant holding a large float tensor an initializer."""
    keep, moved = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if t.data_type in loader._FLOAT_TYPES and math.prod(t.dims) > STRIP_MIN_ELEMENTS:
                init = onnx.TensorProto()
                init.CopyFrom(t)
                init.name = node.output[0]
                graph.initializer.append(init)
                moved += 1
                continue
        keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def make_structure_only(model: onnx.ModelProto, seed: int = GLOBAL_SEED) -> int:
    """Strip, in place, the data of every float initializer over STRIP_MIN_ELEMENTS elements."""
    constants_to_initializers(model.graph)
    stripped = 0
    for g in graphs(model.graph):
        for t in g.initializer:
            if t.data_type not in loader._FLOAT_TYPES or math.prod(t.dims) <= STRIP_MIN_ELEMENTS:
                continue
            a = numpy_helper.to_array(t).astype(np.float64)
            stats = {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
                     "max": float(a.max()), "seed": seed}
            for fld in ("raw_data", "float_data", "double_data", "int32_data"):
                t.ClearField(fld)
            t.doc_string = json.dumps({loader.DOC_KEY: stats})
            stripped += 1
    meta = {p.key: p for p in model.metadata_props}
    if "qinject.structure_only" not in meta:
        model.metadata_props.add(key="qinject.structure_only", value=f"refill seed {seed}")
    return stripped


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_checks(model: onnx.ModelProto, entry: dict[str, Any]) -> dict[str, Any]:
    """Run ``model`` (as loaded) on every check case; every output must be finite.

    A fixed output dim the file declares that the run contradicts is recorded in ``quirks``
    (onnxruntime only warns about it)."""
    results, quirks = [], []
    declared = {vi.name: _dims(vi) for vi in model.graph.output}
    for case in loader.cases_for_entry(entry):
        sizes = dict(case)
        batch = sizes.pop("batch")
        feeds = loader.feeds_for_entry(entry, batch, **sizes)
        outs = ort_run(model, feeds)
        finite = all(bool(np.isfinite(o).all()) for o in outs if np.issubdtype(o.dtype, np.floating))
        results.append({"case": case, "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
                        "output_shapes": [list(o.shape) for o in outs],
                        "output_absmax": [float(np.max(np.abs(o))) if o.size else 0.0 for o in outs],
                        "finite": finite})
        if not finite:
            raise AssertionError(f"{entry['name']}: non-finite outputs on {case}")
        for vi, out in zip(model.graph.output, outs):
            dims = declared[vi.name]
            bad = [i for i, d in enumerate(dims) if isinstance(d, int) and d > 0 and i < out.ndim
                   and out.shape[i] != d]
            if bad or len(dims) != out.ndim:
                quirk = (f"output {vi.name} is declared {dims} but has shape {list(out.shape)} on "
                         f"{case} (a fixed dim the exporter should have left symbolic)")
                if not any(q.startswith(f"output {vi.name} is declared") for q in quirks):
                    quirks.append(quirk)
    if quirks:
        entry["quirks"] = quirks
    return {"cases": results, "passed": True}


def describe_io(model: onnx.ModelProto, entry: dict[str, Any], input_specs: list[dict[str, Any]]) -> None:
    """Fill the manifest's inputs/outputs from the file's graph and the spec's kinds and axes."""
    init_names = {t.name for t in model.graph.initializer}
    by_name = {s["name"]: s for s in input_specs}
    inputs = []
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        spec = dict(by_name.get(vi.name, {"name": vi.name, "kind": "float"}))
        spec["dtype"] = _dtype(vi)
        spec["dims"] = _dims(vi)
        spec["axes"] = {str(k): v for k, v in spec.get("axes", {}).items()}
        inputs.append(spec)
    entry["inputs"] = inputs
    entry["outputs"] = [{"name": vi.name, "dtype": _dtype(vi), "dims": _dims(vi)} for vi in model.graph.output]


def finalize(model: onnx.ModelProto, entry: dict[str, Any], out_dir: Path,
             reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None) -> dict[str, Any]:
    """Compare with the framework, size-budget, save, reload through the loader and check."""
    name = entry["name"]
    entry["opset"] = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    entry["ir_version"] = model.ir_version
    entry["producer"] = f"{model.producer_name} {model.producer_version}".strip()
    entry["op_types"] = op_counts(model)
    entry["n_nodes"] = sum(entry["op_types"].values())
    entry["n_functions"] = len(model.functions)
    entry["has_subgraphs"] = sum(1 for _ in graphs(model.graph)) > 1
    if reference is not None:
        base = dict(entry["defaults"])
        batch = base.pop("batch")
        feeds = loader.feeds_for_entry(entry, batch, **base)
        got = ort_run(model, feeds)
        want = reference(feeds)
        diffs = [float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
                 for g, w in zip(got, want)]
        scale = max(float(np.max(np.abs(w))) for w in want)
        entry["framework_check"] = {"max_abs_diff": max(diffs), "max_abs_reference": scale,
                                    "case": dict(entry["defaults"])}
        if not max(diffs) <= 1e-3 * max(1.0, scale):
            raise AssertionError(f"{name}: onnxruntime differs from the framework by {max(diffs)}")
    data = model.SerializeToString()
    entry["exported_bytes"] = len(data)
    if len(data) > SIZE_LIMIT:
        entry["stripped_tensors"] = make_structure_only(model)
        entry["status"] = "structure-only"
        data = model.SerializeToString()
    else:
        entry["status"] = "full"
    entry["file"] = f"{name}.onnx"
    entry["bytes"] = len(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / entry["file"]).write_bytes(data)
    reloaded = onnx.load(str(out_dir / entry["file"]))
    loader.refill(reloaded, GLOBAL_SEED)
    onnx.checker.check_model(reloaded, full_check=False)
    entry["check"] = run_checks(reloaded, entry)
    return entry


def update_manifest(out_dir: Path, entries: dict[str, dict[str, Any]], generator: str,
                    versions: dict[str, str], run_seconds: float) -> None:
    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.setdefault("format", 1)
    manifest["global_seed"] = GLOBAL_SEED
    manifest["size_limit_bytes"] = SIZE_LIMIT
    manifest["strip_min_elements"] = STRIP_MIN_ELEMENTS
    manifest.setdefault("generators", {})[generator] = {"versions": versions,
                                                        "run_seconds": round(run_seconds, 1)}
    models = manifest.setdefault("models", {})
    models.update(entries)
    manifest["models"] = dict(sorted(models.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    # Remove files no manifest entry names any more (an export that now fails).
    named = {e.get("file") for e in manifest["models"].values() if e.get("file")}
    for f in out_dir.glob("*.onnx"):
        if f.name not in named:
            f.unlink()


def base_entry(name: str, source: str, exporter: str, model_key: str, task: str,
               description: str, realistic_inputs: str, defaults: dict[str, Any],
               alternates: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "source": source, "model": model_key, "exporter": exporter, "task": task,
            "description": description, "realistic_inputs": realistic_inputs,
            "random_init": True, "seed": GLOBAL_SEED,
            "defaults": dict(defaults), "alternates": dict(alternates)}


# ---- torch part ---------------------------------------------------------------------------------

@dataclass
class Spec:
    key: str                      # the model part of the file name
    source: str                   # torchvision | transformers | torchscript | torch
    task: str
    build: Callable[[], Any]      # -> (module in eval mode, example args for the export)
    inputs: list[dict[str, Any]]  # name, kind, axes {axis: logical}, vocab_size / range / default
    outputs: list[str]
    output_axes: dict[str, dict[int, str]]
    defaults: dict[str, Any]      # logical axis / scalar input -> size used by default
    alternates: dict[str, Any]    # logical axis / scalar input -> other size(s) the check runs
    description: str
    realistic_inputs: str
    exporters: tuple[str, ...] = ("torchscript", "dynamo")
    script: bool = False          # torch.jit.script the module for the TorchScript exporter
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # dynamo Dim min/max
    dynamo_build: Callable[[], Any] | None = None  # a different module for dynamo (torch.cond)
    notes: dict[str, str] = field(default_factory=dict)  # exporter -> note for the manifest
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest keys (feed_sequences, ...)


def _seed(seed: int = GLOBAL_SEED) -> None:
    import random

    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- torchvision

IMAGE_DESC = ("float32 NCHW image, ImageNet-normalised (roughly [-2, 2]); any height/width >= 32 "
              "works for the convnets (224 is the native size), batch >= 1")


def torchvision_spec(key: str, vit: bool = False) -> Spec:
    def build():
        import torch
        import torchvision
        _seed()
        model = torchvision.models.get_model(key, weights=None).eval()
        if vit:  # torchvision zero-initialises the head: every logit would be 0, whatever the input
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model, (torch.randn(2, 3, 224, 224),)

    axes = {0: "batch"} if vit else {0: "batch", 2: "height", 3: "width"}
    defaults = {"batch": 1} if vit else {"batch": 1, "height": 224, "width": 224}
    alternates = {"batch": 2} if vit else {"batch": 2, "height": 160, "width": 192}
    realistic = ("float32 NCHW image 3x224x224 (fixed by the position embeddings), "
                 "ImageNet-normalised (roughly [-2, 2])") if vit else IMAGE_DESC
    return Spec(key=key, source="torchvision", task="classifier", build=build,
                inputs=[{"name": "input", "kind": "image", "range": [-2.0, 2.0], "axes": axes}],
                outputs=["logits"], output_axes={"logits": {0: "batch"}},
                defaults=defaults, alternates=alternates,
                description=f"torchvision.models.{key}(weights=None), random init (seed 0), eval "
                            "mode, 1000-class ImageNet head"
                            + (" (its zero-initialised head weight redrawn from normal(0, 0.02), so the "
                               "logits depend on the input)" if vit else ""),
                realistic_inputs=realistic,
                bounds={"height": (32, 1024), "width": (32, 1024)})


# -- transformers

VOCAB = 1000
MAX_POS = 128


def _hf_text_inputs(token_types: bool = False, vocab: int = VOCAB) -> list[dict[str, Any]]:
    axes = {0: "batch", 1: "sequence"}
    inputs = [{"name": "input_ids", "kind": "tokens", "vocab_size": vocab, "axes": axes},
              {"name": "attention_mask", "kind": "mask", "axes": axes}]
    if token_types:
        inputs.append({"name": "token_type_ids", "kind": "token_type", "axes": axes})
    return inputs


def _text_args(token_types: bool = False, vocab: int = VOCAB):
    import torch
    g = torch.Generator().manual_seed(GLOBAL_SEED)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    args = (ids, torch.ones(2, 8, dtype=torch.int64))
    return args + (torch.zeros(2, 8, dtype=torch.int64),) if token_types else args


TEXT_REALISTIC = (f"int64 token ids in [0, {VOCAB}) (vocab {VOCAB}), attention_mask int64 ones "
                  f"(0 for padding), sequence length 1..{MAX_POS}")


def _bert_wrapper(model, output: str):
    """``model`` called with the three BERT inputs by position (how the exporters pass them),
    returning its output ``output`` alone."""
    import torch  # the generator's own environment has torch; importing this file must not need it

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return getattr(out, output)
    return Wrap().eval()


def hf_bert() -> Spec:
    def build():
        from transformers import BertConfig, BertForSequenceClassification
        _seed()
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=MAX_POS, num_labels=2)
        model = BertForSequenceClassification(cfg).eval()
        return _bert_wrapper(model, "logits"), _text_args(True)

    return Spec(key="bert", source="transformers", task="classifier", build=build,
                inputs=_hf_text_inputs(True), outputs=["logits"], output_axes={"logits": {0: "batch"}},
                defaults={"batch": 1, "sequence": 16}, alternates={"batch": 2, "sequence": 7},
                description="BertForSequenceClassification from BertConfig(hidden 64, 2 layers, 4 heads, "
                            f"intermediate 128, vocab {VOCAB}, 2 labels), random init",
                realistic_inputs=TEXT_REALISTIC + "; token_type_ids int64 zeros (ones for a second segment)",
                bounds={"sequence": (2, MAX_POS)})


BERT_BASE_VOCAB = 30522   # bert-base-uncased's WordPiece vocabulary
BERT_BASE_MAX_POS = 512


def hf_bert_base() -> Spec:
    """A BERT-base-size encoder (110M parameters), the size at which quantization pays on a CPU.

    The small exports above run in well under a millisecond, where fixed per-kernel costs outweigh
    the arithmetic; this one is what users deploy (12 layers, hidden 768, 128 tokens)."""
    def build():
        from transformers import BertConfig, BertModel
        _seed()
        cfg = BertConfig(vocab_size=BERT_BASE_VOCAB, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=BERT_BASE_MAX_POS)
        model = BertModel(cfg, add_pooling_layer=False).eval()
        return _bert_wrapper(model, "last_hidden_state"), _text_args(True, BERT_BASE_VOCAB)

    return Spec(key="bert_base", source="transformers", task="encoder", build=build,
                inputs=_hf_text_inputs(True, BERT_BASE_VOCAB), outputs=["last_hidden_state"],
                output_axes={"last_hidden_state": {0: "batch", 1: "sequence"}},
                defaults={"batch": 1, "sequence": 128}, alternates={"batch": 2, "sequence": 16},
                description="BertModel (no pooler) from BertConfig(hidden 768, 12 layers, 12 heads, "
                            f"intermediate 3072, vocab {BERT_BASE_VOCAB}, {BERT_BASE_MAX_POS} "
                            "positions): bert-base-uncased's size, random init; output "
                            "last_hidden_state [batch, sequence, 768]",
                realistic_inputs=(f"int64 token ids in [0, {BERT_BASE_VOCAB}), attention_mask int64 "
                                  "ones (0 for padding), token_type_ids 0/1 for a sentence pair, "
                                  f"sequence length 1..{BERT_BASE_MAX_POS}; deployed at 128 tokens"),
                bounds={"sequence": (2, BERT_BASE_MAX_POS)},
                # The corpus feeds 128-token sentence pairs (the deployed length) rather than the
                # 12..48 tokens of the toy exports, so latency is measured where it matters.
                extra={"feed_sequences": {"calibration": [128, 96, 112], "evaluation": [128, 104, 120]}})


def hf_distilbert() -> Spec:
    def build():
        import torch
        from transformers import DistilBertConfig, DistilBertModel
        _seed()
        cfg = DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                               max_position_embeddings=MAX_POS)
        model = DistilBertModel(cfg).eval()

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return Wrap().eval(), _text_args()

    return Spec(key="distilbert", source="transformers", task="encoder", build=build,
                inputs=_hf_text_inputs(), outputs=["last_hidden_state"],
                output_axes={"last_hidden_state": {0: "batch", 1: "sequence"}},
                defaults={"batch": 1, "sequence": 16}, alternates={"batch": 2, "sequence": 7},
                description="DistilBertModel from DistilBertConfig(dim 64, 2 layers, 4 heads, hidden 128, "
                            f"vocab {VOCAB}), random init; output last_hidden_state [batch, sequence, 64]",
                realistic_inputs=TEXT_REALISTIC, bounds={"sequence": (2, MAX_POS)})


def hf_gpt2() -> Spec:
    def build():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        _seed()
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=64, n_layer=2, n_head=4,
                         use_cache=False)
        model = GPT2LMHeadModel(cfg).eval()

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).logits
        return Wrap().eval(), _text_args()

    return Spec(key="gpt2", source="transformers", task="causal-lm", build=build,
                inputs=_hf_text_inputs(), outputs=["logits"],
                output_axes={"logits": {0: "batch", 1: "sequence"}},
                defaults={"batch": 1, "sequence": 16}, alternates={"batch": 2, "sequence": 7},
                description="GPT2LMHeadModel from GPT2Config(n_embd 64, 2 layers, 4 heads, "
                            f"vocab {VOCAB}, n_positions {MAX_POS}), use_cache=False (no past key "
                            "values), random init; output logits [batch, sequence, vocab]",
                realistic_inputs=TEXT_REALISTIC, bounds={"sequence": (2, MAX_POS)})


def hf_vit() -> Spec:
    def build():
        import torch
        from transformers import ViTConfig, ViTForImageClassification
        _seed()
        cfg = ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=10)
        model = ViTForImageClassification(cfg).eval()

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                return self.model(pixel_values=pixel_values).logits
        return Wrap().eval(), (torch.randn(2, 3, 64, 64),)

    return Spec(key="vit", source="transformers", task="classifier", build=build,
                inputs=[{"name": "pixel_values", "kind": "image", "range": [-2.0, 2.0],
                         "axes": {0: "batch"}}],
                outputs=["logits"], output_axes={"logits": {0: "batch"}},
                defaults={"batch": 1}, alternates={"batch": 2},
                description="ViTForImageClassification from ViTConfig(image 64, patch 8, hidden 64, "
                            "2 layers, 4 heads, intermediate 128, 10 labels), random init",
                realistic_inputs="float32 NCHW image 3x64x64 (fixed), normalised to about [-1, 1] "
                                 "(ViTImageProcessor's mean/std 0.5)")


WHISPER_MELS, WHISPER_FRAMES = 80, 200


def hf_whisper_encoder() -> Spec:
    def build():
        import torch
        from transformers import WhisperConfig, WhisperModel
        _seed()
        cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=64, encoder_layers=2,
                            encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
                            encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_source_positions=WHISPER_FRAMES // 2, max_target_positions=64,
                            pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
                            begin_suppress_tokens=None, suppress_tokens=None)
        encoder = WhisperModel(cfg).get_encoder().eval()

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_features):
                return self.encoder(input_features=input_features).last_hidden_state
        return Wrap().eval(), (torch.randn(2, WHISPER_MELS, WHISPER_FRAMES),)

    return Spec(key="whisper_encoder", source="transformers", task="encoder", build=build,
                inputs=[{"name": "input_features", "kind": "features", "axes": {0: "batch"}}],
                outputs=["last_hidden_state"], output_axes={"last_hidden_state": {0: "batch"}},
                defaults={"batch": 1}, alternates={"batch": 2},
                description=f"WhisperModel(WhisperConfig(d_model 64, 2 encoder layers, 4 heads, ffn 128, "
                            f"{WHISPER_MELS} mel bins, max_source_positions {WHISPER_FRAMES // 2})).encoder, "
                            f"random init; output [batch, {WHISPER_FRAMES // 2}, 64]",
                realistic_inputs=f"float32 log-mel features [batch, {WHISPER_MELS} mels, {WHISPER_FRAMES} "
                                 "frames] (frames fixed: the encoder requires 2 x max_source_positions), "
                                 "WhisperFeatureExtractor-style values roughly in [-1, 1.5]")


# -- control flow (TorchScript)

if nn is not None:
    # Module level (not inside a function): torch.jit.script resolves names through the module's
    # globals, so the scripted classes must live here.

    class IfConvNet(nn.Module):
        """Two conv classifiers; the ``mode`` input picks one. All compute is inside the branches."""

        def __init__(self):
            super().__init__()
            self.a_conv = nn.Conv2d(3, 16, 3, padding=1)
            self.a_fc = nn.Linear(16, 10)
            self.b_conv1 = nn.Conv2d(3, 16, 5, padding=2)
            self.b_conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.b_fc = nn.Linear(32, 10)

        def branch_a(self, x):
            return self.a_fc(torch.relu(self.a_conv(x)).mean(dim=(2, 3)))

        def branch_b(self, x):
            y = torch.relu(self.b_conv1(x))
            return self.b_fc(torch.relu(self.b_conv2(y)).mean(dim=(2, 3)))

        def forward(self, x, mode):
            if bool(mode == 0):
                y = self.branch_a(x)
            else:
                y = self.branch_b(x)
            return y

    class IfConvNetCond(IfConvNet):
        """The same net with ``torch.cond``, the data-dependent branch torch.export can trace."""

        def forward(self, x, mode):
            return torch.cond(mode == 0, self.branch_a, self.branch_b, (x,))

    class LoopMLP(nn.Module):
        """An input projection, then ``steps`` residual Linear+tanh updates, then a head."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.step = nn.Linear(32, 32)
            self.out = nn.Linear(32, 4)

        def forward(self, x, steps):
            h = torch.relu(self.inp(x))
            for _ in range(int(steps)):
                h = torch.tanh(self.step(h)) + h
            return self.out(h)

    class LoopMLPWhile(LoopMLP):
        """The same net with ``while_loop``, the data-dependent loop torch.export can trace."""

        def forward(self, x, steps):
            from torch._higher_order_ops.while_loop import while_loop

            def cond(i, h):
                return i < steps

            def body(i, h):
                return i + 1, torch.tanh(self.step(h)) + h

            h = torch.relu(self.inp(x))
            _, h = while_loop(cond, body, (torch.zeros_like(steps), h))
            return self.out(h)


def _if_args():
    import torch
    return (torch.randn(2, 3, 32, 32), torch.tensor(0, dtype=torch.int64))


def if_conv_spec() -> Spec:
    def build():
        _seed()
        return IfConvNet().eval(), _if_args()

    def build_cond():
        _seed()
        return IfConvNetCond().eval(), _if_args()

    return Spec(key="if_conv", source="torchscript", task="classifier", build=build, script=True,
                dynamo_build=build_cond,
                inputs=[{"name": "input", "kind": "image", "range": [-2.0, 2.0],
                         "axes": {0: "batch", 2: "height", 3: "width"}},
                        {"name": "mode", "kind": "scalar", "default": 0, "values": [0, 1], "axes": {}}],
                outputs=["logits"], output_axes={"logits": {0: "batch"}},
                defaults={"batch": 1, "height": 32, "width": 32, "mode": 0},
                alternates={"batch": 2, "height": 24, "width": 40, "mode": 1},
                description="torch.jit.script'ed module: `if bool(mode == 0)` picks conv3x3->relu->mean->"
                            "linear (mode 0) or conv5x5->relu->conv3x3->relu->mean->linear (else); every "
                            "Conv/Gemm is inside an If branch, nothing quantizable outside. The dynamo "
                            "file exports the same weights written with torch.cond",
                realistic_inputs="input float32 NCHW [batch, 3, H, W] in [-2, 2], H, W >= 8; mode an "
                                 "int64 scalar, 0 or 1",
                bounds={"height": (8, 512), "width": (8, 512)},
                notes={"dynamo": "exported from the torch.cond version of the module (torch.export "
                                 "cannot trace a Python `if` on tensor data)"})


def _loop_args():
    return torch.randn(2, 16), torch.tensor(3, dtype=torch.int64)


def loop_spec() -> Spec:
    def build():
        _seed()
        return LoopMLP().eval(), _loop_args()

    def build_while():
        _seed()
        return LoopMLPWhile().eval(), _loop_args()

    return Spec(key="loop_mlp", source="torchscript", task="regressor", build=build, script=True,
                dynamo_build=build_while,
                notes={"dynamo": "exported from the torch._higher_order_ops.while_loop version of the "
                                 "module (torch.export cannot trace `range(int(steps))` on tensor data)"},
                inputs=[{"name": "input", "kind": "float", "axes": {0: "batch"}},
                        {"name": "steps", "kind": "scalar", "default": 3, "values": [0, 1, 3, 5],
                         "axes": {}}],
                outputs=["output"], output_axes={"output": {0: "batch"}},
                defaults={"batch": 1, "steps": 3}, alternates={"batch": 2, "steps": [1, 5]},
                description="torch.jit.script'ed MLP: Linear(16,32)+relu, then `for _ in range(int(steps))`"
                            " h = tanh(Linear(32,32)(h)) + h (an ONNX Loop whose body holds the Gemm/"
                            "MatMul), then Linear(32,4)",
                realistic_inputs="input float32 [batch, 16] standard normal; steps an int64 scalar >= 0")


# -- recurrent

def lstm_spec() -> Spec:
    def build():
        import torch
        from torch import nn

        class LSTMTagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(VOCAB, 32)
                self.rnn = nn.LSTM(32, 64, num_layers=2, batch_first=True)
                self.head = nn.Linear(64, 5)

            def forward(self, input_ids):
                h, _ = self.rnn(self.embed(input_ids))
                return self.head(h)
        _seed()
        g = torch.Generator().manual_seed(GLOBAL_SEED)
        return LSTMTagger().eval(), (torch.randint(0, VOCAB, (2, 8), generator=g),)

    return Spec(key="lstm", source="torch", task="tagger", build=build,
                inputs=[{"name": "input_ids", "kind": "tokens", "vocab_size": VOCAB,
                         "axes": {0: "batch", 1: "sequence"}}],
                outputs=["logits"], output_axes={"logits": {0: "batch", 1: "sequence"}},
                defaults={"batch": 1, "sequence": 16}, alternates={"batch": 2, "sequence": 7},
                description=f"Embedding({VOCAB},32) -> nn.LSTM(32, 64, num_layers=2, batch_first) -> "
                            "Linear(64, 5) per time step (a sequence tagger), random init",
                realistic_inputs=f"int64 token ids [batch, sequence] in [0, {VOCAB})",
                bounds={"sequence": (2, 4096)})


def gru_spec() -> Spec:
    def build():
        import torch
        from torch import nn

        class GRUClassifier(nn.Module):
            def __init__(self):
                super().__init__()
                self.inp = nn.Linear(20, 32)
                self.rnn = nn.GRU(32, 48, batch_first=True, bidirectional=True)
                self.head = nn.Linear(96, 3)

            def forward(self, features):
                h, _ = self.rnn(torch.relu(self.inp(features)))
                return self.head(h.mean(dim=1))
        _seed()
        return GRUClassifier().eval(), (torch.randn(2, 8, 20),)

    return Spec(key="gru", source="torch", task="classifier", build=build,
                inputs=[{"name": "features", "kind": "features", "axes": {0: "batch", 1: "sequence"}}],
                outputs=["logits"], output_axes={"logits": {0: "batch"}},
                defaults={"batch": 1, "sequence": 16}, alternates={"batch": 2, "sequence": 7},
                description="Linear(20,32)+relu -> bidirectional nn.GRU(32, 48, batch_first) -> mean over "
                            "time -> Linear(96, 3), random init",
                realistic_inputs="float32 features [batch, sequence, 20], standard normal",
                bounds={"sequence": (2, 4096)})


def all_specs() -> list[Spec]:
    convnets = ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
                "shufflenet_v2_x1_0"]
    return ([torchvision_spec(k) for k in convnets] + [torchvision_spec("vit_b_16", vit=True)]
            + [hf_bert(), hf_bert_base(), hf_distilbert(), hf_gpt2(), hf_vit(), hf_whisper_encoder()]
            + [if_conv_spec(), loop_spec(), lstm_spec(), gru_spec()])


def _dynamic_shapes(spec: Spec):
    from torch.export import Dim
    dims: dict[str, Any] = {}
    shapes = []
    for inp in spec.inputs:
        per = {}
        for axis, logical in inp.get("axes", {}).items():
            if logical not in dims:
                lo, hi = spec.bounds.get(logical, (1, 1024))
                dims[logical] = Dim(logical, min=lo, max=hi)
            per[int(axis)] = dims[logical]
        shapes.append(per or None)
    return tuple(shapes)


def export_one(spec: Spec, exporter: str, out_dir: Path) -> dict[str, Any]:
    import torch
    name = f"{spec.source}_{spec.key}_{exporter}"
    entry = base_entry(name, spec.source, exporter, spec.key, spec.task, spec.description,
                       spec.realistic_inputs, spec.defaults, spec.alternates)
    entry.update(spec.extra)
    input_names = [i["name"] for i in spec.inputs]
    t0 = time.time()
    try:
        module, args = spec.build()
        with tempfile.TemporaryDirectory() as tmp:
            f = os.path.join(tmp, "model.onnx")
            if exporter == "dynamo" and spec.dynamo_build is not None:
                # First the plain module, as a user would; its failure is recorded, then the
                # torch.cond / while_loop rewrite of the same weights is exported.
                try:
                    torch.onnx.export(module, args, f, dynamo=True, input_names=input_names,
                                      output_names=spec.outputs, dynamic_shapes=_dynamic_shapes(spec))
                except Exception as exc:  # noqa: BLE001
                    entry["plain_module_error"] = error_record(exc)
                    if "dynamo" in spec.notes:
                        entry["note"] = spec.notes["dynamo"]
                    module, args = spec.dynamo_build()
            if exporter == "torchscript":
                target = torch.jit.script(module) if spec.script else module
                dynamic_axes = {i["name"]: {int(a): n for a, n in i["axes"].items()}
                                for i in spec.inputs if i.get("axes")}
                dynamic_axes.update({o: dict(ax) for o, ax in spec.output_axes.items()})
                torch.onnx.export(target, args, f, dynamo=False, input_names=input_names,
                                  output_names=spec.outputs, dynamic_axes=dynamic_axes)
            elif "plain_module_error" in entry or spec.dynamo_build is None:
                torch.onnx.export(module, args, f, dynamo=True, input_names=input_names,
                                  output_names=spec.outputs, dynamic_shapes=_dynamic_shapes(spec))
            model = onnx.load(f)  # pulls in the dynamo exporter's external .data file
    except Exception as exc:  # noqa: BLE001 - an exporter's failure is data for the manifest
        entry.update(status="failed", file=None, export_seconds=round(time.time() - t0, 1),
                     **error_record(exc))
        print(f"  {name}: EXPORT FAILED: {entry['error']}", flush=True)
        return entry
    entry["export_seconds"] = round(time.time() - t0, 1)
    describe_io(model, entry, spec.inputs)

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(feeds[n]) for n in input_names])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in outs]

    try:
        finalize(model, entry, out_dir, reference)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        entry.update(status="failed", file=None, stage="check", **error_record(exc))
        print(f"  {name}: CHECK FAILED: {entry['error']}", flush=True)
        return entry
    print(f"  {name}: {entry['status']} {entry['bytes'] / 1e6:.2f} MB (exported "
          f"{entry['exported_bytes'] / 1e6:.1f} MB) in {entry['export_seconds']} s, "
          f"diff {entry['framework_check']['max_abs_diff']:.2e}", flush=True)
    return entry


def package_versions(pkgs: list[str]) -> dict[str, str]:
    """Python's and each package's installed version ("absent" if not installed), for the manifest."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for p in pkgs:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "absent"
    return out


def torch_versions() -> dict[str, str]:
    return package_versions(["torch", "torchvision", "transformers", "onnx", "onnxscript", "onnx-ir",
                             "onnxruntime", "numpy", "protobuf"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--only", nargs="*", help="model keys (resnet50, bert, if_conv, ...) to regenerate")
    ap.add_argument("--exporters", nargs="*", default=["torchscript", "dynamo"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    entries: dict[str, dict[str, Any]] = {}
    for spec in all_specs():
        if args.only and spec.key not in args.only:
            continue
        print(f"{spec.source}/{spec.key}", flush=True)
        for exporter in spec.exporters:
            if exporter in args.exporters:
                entry = export_one(spec, exporter, args.out)
                entries[entry["name"]] = entry
                # Write as we go, so a crash or time-out keeps what was done.
                update_manifest(args.out, {entry["name"]: entry}, "gen_real_exports.py",
                                torch_versions(), time.time() - t_start)
    update_manifest(args.out, entries, "gen_real_exports.py", torch_versions(), time.time() - t_start)
    failed = [n for n, e in entries.items() if e["status"] == "failed"]
    print(f"done in {time.time() - t_start:.0f} s: {len(entries) - len(failed)} exported, "
          f"{len(failed)} failed {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
