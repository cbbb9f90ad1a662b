"""Fidelity of a quantized model's outputs against the float model's (pure numpy, reusable).

Every function takes the outputs of both models on the same feeds, as ``run_model`` returns them:
``reference[f][k]`` is output ``k`` of the float model on feed ``f`` (shapes may differ between
feeds), ``quantized`` likewise. Every result dict has ``sqnr_db_min``: the lowest signal-to-
quantization-noise ratio over the outputs, each output's samples pooled over all feeds.

    sqnr_db(ref, q)                       -> dB (inf when identical)
    output_sqnr(reference, quantized)     -> [dB per output]
    classifier(reference, quantized, labels=None)   top-1 agreement (+ accuracy vs labels)
    encoder(reference, quantized)         cosine per token of the last hidden state / logits
    nudenet(reference, quantized)         detections after nudenet's own post-processing, matched
    layout(reference, quantized)          detections after rapid_layout's PicoDet post-processing
    generic(reference, quantized)         SQNR only
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Outputs = Sequence[Sequence[np.ndarray]]


# --------------------------------------------------------------------------- SQNR

def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - q|^2) over the whole arrays (float64); inf when they are equal."""
    r = np.asarray(ref, np.float64).ravel()
    d = r - np.asarray(q, np.float64).ravel()
    finite = np.isfinite(r) & np.isfinite(d)  # -inf masks in both models compare equal
    r, d = r[finite], d[finite]
    noise = float(np.dot(d, d))
    signal = float(np.dot(r, r))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def output_sqnr(reference: Outputs, quantized: Outputs) -> list[float]:
    """SQNR (dB) of each output, its values pooled over all feeds (integer outputs: exact match)."""
    n_out = len(reference[0]) if reference else 0
    out = []
    for k in range(n_out):
        r = np.concatenate([np.asarray(f[k], np.float64).ravel() for f in reference])
        q = np.concatenate([np.asarray(f[k], np.float64).ravel() for f in quantized])
        out.append(sqnr_db(r, q))
    return out


def _base(reference: Outputs, quantized: Outputs) -> dict[str, float]:
    _check(reference, quantized)
    per = output_sqnr(reference, quantized)
    return {"sqnr_db_min": min(per) if per else math.nan}


def _check(reference: Outputs, quantized: Outputs) -> None:
    if len(reference) != len(quantized):
        raise ValueError(f"{len(reference)} reference feeds but {len(quantized)} quantized ones")
    for i, (r, q) in enumerate(zip(reference, quantized)):
        if len(r) != len(q):
            raise ValueError(f"feed {i}: {len(r)} reference outputs but {len(q)} quantized ones")
        for k, (a, b) in enumerate(zip(r, q)):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"feed {i} output {k}: shape {np.shape(a)} vs {np.shape(b)}")


# --------------------------------------------------------------------------- classifier / encoder

def _rows(outputs: Outputs, k: int = 0) -> np.ndarray:
    """Output ``k`` of every feed as rows [N, classes] (all leading axes flattened)."""
    return np.concatenate([np.asarray(f[k], np.float64).reshape(-1, np.shape(f[k])[-1]) for f in outputs])


def classifier(reference: Outputs, quantized: Outputs, labels: np.ndarray | None = None,
               output: int = 0) -> dict[str, float]:
    """Top-1 agreement of the quantized model with the float model (and accuracy vs ``labels``)."""
    res = _base(reference, quantized)
    r, q = _rows(reference, output), _rows(quantized, output)
    res["top1_agreement"] = float(np.mean(r.argmax(1) == q.argmax(1)))
    res["samples"] = float(len(r))
    if labels is not None and len(labels) == len(r):
        labels = np.asarray(labels).ravel()
        res["accuracy_fp32"] = float(np.mean(r.argmax(1) == labels))
        res["accuracy"] = float(np.mean(q.argmax(1) == labels))
    return res


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (1 where both rows are zero)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (na * nb)
    cos[(na == 0) & (nb == 0)] = 1.0
    cos[~np.isfinite(cos)] = 0.0
    return cos


def encoder(reference: Outputs, quantized: Outputs, output: int = 0,
            token_top1: bool = False) -> dict[str, float]:
    """Cosine similarity per token (rows of the last axis) of output ``output``: mean and min.

    ``token_top1``: also the per-token top-1 agreement (logits of a language model or tagger).
    """
    res = _base(reference, quantized)
    r, q = _rows(reference, output), _rows(quantized, output)
    cos = cosine_rows(r, q)
    res["cos_mean"] = float(cos.mean())
    res["cos_min"] = float(cos.min())
    res["tokens"] = float(len(r))
    if token_top1:
        res["top1_agreement"] = float(np.mean(r.argmax(1) == q.argmax(1)))
    return res


def generic(reference: Outputs, quantized: Outputs) -> dict[str, float]:
    res = _base(reference, quantized)
    per = output_sqnr(reference, quantized)
    res["sqnr_db_mean"] = float(np.mean([p for p in per if np.isfinite(p)])) if any(
        np.isfinite(p) for p in per) else res["sqnr_db_min"]
    return res


# --------------------------------------------------------------------------- detection

def iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of corner-form boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms_boxes(boxes_xyxy: np.ndarray, scores: np.ndarray, score_threshold: float,
              nms_threshold: float, top_k: int = 0) -> list[int]:
    """``cv2.dnn.NMSBoxes`` (class-agnostic greedy NMS): indices kept, best score first."""
    scores = np.asarray(scores, np.float64)
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    keep: list[int] = []
    boxes = np.asarray(boxes_xyxy, np.float64)
    for i in order:
        if keep and iou_xyxy(boxes[i], boxes[keep]).max() > nms_threshold:
            continue
        keep.append(i)
        if 0 < top_k == len(keep):
            break
    return keep


def nudenet_detections(output: np.ndarray, min_score: float = 0.2, score_threshold: float = 0.25,
                       nms_threshold: float = 0.45) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """nudenet ``_postprocess`` per image of ``output`` [batch, 4 + classes, anchors], in model pixels.

    Candidates with a best class score >= 0.2, centre boxes to corners, then
    ``cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)`` (class-agnostic). The package's rescale to the
    original image is a per-image affine map, the same for both models, so it is left out.
    Returns, per image, (boxes [n, 4] xyxy, scores [n], classes [n]).
    """
    out = []
    for rows in np.asarray(output, np.float64):
        rows = rows.T  # [anchors, 4 + classes]
        cls_scores = rows[:, 4:]
        best = cls_scores.max(axis=1)
        cand = np.nonzero(best >= min_score)[0]
        xywh = rows[cand, :4]
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        scores = best[cand]
        classes = cls_scores[cand].argmax(axis=1)
        keep = nms_boxes(boxes, scores, score_threshold, nms_threshold)
        out.append((boxes[keep], scores[keep], classes[keep]))
    return out


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hard_nms(box_probs: np.ndarray, iou_thres: float, top_k: int, candidate_size: int = 200) -> np.ndarray:
    """rapid_layout ``PPPostProcess.hard_nms``."""
    scores, boxes = box_probs[:, -1], box_probs[:, :-1]
    picked = []
    indexes = np.argsort(scores)[-candidate_size:]
    while len(indexes) > 0:
        current = indexes[-1]
        picked.append(current)
        if 0 < top_k == len(picked) or len(indexes) == 1:
            break
        indexes = indexes[:-1]
        iou = iou_xyxy(boxes[indexes], boxes[current])[:, 0]
        indexes = indexes[iou <= iou_thres]
    return box_probs[picked, :]


def layout_detections(outputs: Sequence[np.ndarray], input_hw: tuple[int, int] = (800, 608),
                      conf_thres: float = 0.5, iou_thres: float = 0.5,
                      strides: Sequence[int] = (8, 16, 32, 64), nms_top_k: int = 1000,
                      keep_top_k: int = 100) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """rapid_layout ``PPPostProcess`` (PicoDet, pp_layout_cdla) re-implemented, in model pixels.

    ``outputs``: the model's 8 outputs, 4 score maps [b, cells, classes] then 4 box distributions
    [b, cells, 4 * (reg_max + 1)]. Defaults are rapid_layout's (conf 0.5, IoU 0.5). The final
    scaling to the original page is the same for both models and left out.
    """
    half = len(outputs) // 2
    score_maps, box_maps = outputs[:half], outputs[half:]
    reg_max = int(np.shape(box_maps[0])[-1] / 4 - 1)
    out = []
    for b in range(np.shape(box_maps[0])[0]):
        decode_boxes, select_scores = [], []
        for stride, dist, score in zip(strides, box_maps, score_maps):
            dist, score = np.asarray(dist[b], np.float64), np.asarray(score[b], np.float64)
            fm_h, fm_w = input_hw[0] / stride, input_hw[1] / stride
            ww, hh = np.meshgrid(np.arange(fm_w), np.arange(fm_h))
            ct_row = (hh.flatten() + 0.5) * stride
            ct_col = (ww.flatten() + 0.5) * stride
            center = np.stack((ct_col, ct_row, ct_col, ct_row), axis=1)
            d = _softmax(dist.reshape(-1, reg_max + 1), 1) @ np.arange(reg_max + 1)
            d = d.reshape(-1, 4) * stride
            top = np.argsort(score.max(axis=1))[::-1][:nms_top_k]
            decode_boxes.append(center[top] + np.array([-1, -1, 1, 1]) * d[top])
            select_scores.append(score[top])
        bboxes = np.concatenate(decode_boxes)
        conf = np.concatenate(select_scores)
        boxes, scores, classes = [], [], []
        for c in range(conf.shape[1]):
            probs = conf[:, c]
            mask = probs > conf_thres
            if not mask.any():
                continue
            picked = _hard_nms(np.concatenate([bboxes[mask], probs[mask, None]], axis=1), iou_thres, keep_top_k)
            boxes.append(picked[:, :4])
            scores.append(picked[:, 4])
            classes.append(np.full(len(picked), c))
        if boxes:
            bx = np.concatenate(boxes)
            bx[:, [0, 2]] = bx[:, [0, 2]].clip(0, input_hw[1])  # warp_boxes: clip to the image
            bx[:, [1, 3]] = bx[:, [1, 3]].clip(0, input_hw[0])
            out.append((bx, np.concatenate(scores), np.concatenate(classes)))
        else:
            out.append((np.empty((0, 4)), np.empty(0), np.empty(0, np.int64)))
    return out


def match_detections(ref: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     quant: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     iou: float = 0.5) -> dict[str, float]:
    """Greedy one-to-one matching, per image, of float detections to quantized detections of the same
    class with IoU >= ``iou`` (float detections in score order, each taking its best free partner).

    ``det_recall``: share of float detections matched (nan when the float model finds none);
    ``det_precision``: share of quantized detections matched; ``score_mae``: mean |score difference|
    over matched pairs; counts of both.
    """
    n_ref = n_q = matched = 0
    diffs: list[float] = []
    for (rb, rs, rc), (qb, qs, qc) in zip(ref, quant):
        n_ref += len(rb)
        n_q += len(qb)
        if not len(rb) or not len(qb):
            continue
        ious = iou_xyxy(rb, qb)
        ious[np.asarray(rc)[:, None] != np.asarray(qc)[None, :]] = 0.0
        free = np.ones(len(qb), bool)
        for i in np.argsort(-np.asarray(rs), kind="stable"):
            cand = np.where(free, ious[i], 0.0)
            j = int(cand.argmax())
            if cand[j] >= iou:
                free[j] = False
                matched += 1
                diffs.append(abs(float(rs[i]) - float(qs[j])))
    return {"det_recall": matched / n_ref if n_ref else math.nan,
            "det_precision": matched / n_q if n_q else (math.nan if not n_ref else 0.0),
            "score_mae": float(np.mean(diffs)) if diffs else math.nan,
            "detections_fp32": float(n_ref), "detections": float(n_q)}


def nudenet(reference: Outputs, quantized: Outputs) -> dict[str, float]:
    """nudenet (YOLOv8 [b, 22, anchors]): detection matching after nudenet's post-processing."""
    res = _base(reference, quantized)
    ref = [d for f in reference for d in nudenet_detections(f[0])]
    q = [d for f in quantized for d in nudenet_detections(f[0])]
    res.update(match_detections(ref, q))
    return res


def layout(reference: Outputs, quantized: Outputs, input_hw: tuple[int, int] = (800, 608)) -> dict[str, float]:
    """rapid_layout: detection matching after its PicoDet post-processing, plus SQNR per output."""
    res = _base(reference, quantized)
    ref = [d for f in reference for d in layout_detections(f, input_hw)]
    q = [d for f in quantized for d in layout_detections(f, input_hw)]
    res.update(match_detections(ref, q))
    for k, s in enumerate(output_sqnr(reference, quantized)):
        res[f"sqnr_db_out{k}"] = s
    return res
