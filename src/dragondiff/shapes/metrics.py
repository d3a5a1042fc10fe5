"""Behavioural metrics for edits of shape scenes: colour segmentation against the scene's known colours,
centroids, IoU, vacated area, Lab colour distance, PSNR. Thresholds of success live here too.

Used by the shapes benchmark (its cases' evaluators, declared by each task) and by the trainer (PSNR); neither
imports the other."""

from __future__ import annotations

import math

import cv2
import numpy as np

# A case succeeds when every threshold of its task holds (docs/benchmark.md explains each).
THRESHOLDS = {
    "centroid_px": 5.0,  # moved / dragged object's centroid within this of the ground truth
    "iou": 0.5,  # segmented object vs ground-truth mask
    "vacated": 0.8,  # share of the vacated source area no longer showing the object's colour
    "area_ratio_rel": 0.25,  # resize: |area ratio / scale² − 1|
    "delta_e": 15.0,  # appearance: Lab ΔE between edited object and reference object
    "shape_iou": 0.6,  # appearance: recoloured region vs the original object
    "bg_psnr_db": 25.0,  # background PSNR against the model's own reconstruction
}


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return mask.copy()
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = cv2.erode(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    return out if out.any() else mask.copy()


def measured_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median colour of an object as the model renders it (use on the VAE reconstruction)."""
    return np.median(image[erode(mask, 3)].astype(np.float32), axis=0)


def segment(image: np.ndarray, colour, competitors, background: np.ndarray, max_dist: float = 80.0) -> np.ndarray:
    """Pixels nearer to `colour` than to every competitor colour and to the local background, within max_dist."""
    img = image.astype(np.float32)
    d = np.linalg.norm(img - np.asarray(colour, np.float32), axis=-1)
    ok = (d < max_dist) & (d < np.linalg.norm(img - background.astype(np.float32), axis=-1))
    for c in competitors:
        ok &= d < np.linalg.norm(img - np.asarray(c, np.float32), axis=-1)
    return ok


def centroid(mask: np.ndarray):
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size == 0:
        return float("nan")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255.0**2 / mse))


def delta_e(rgb1, rgb2) -> float:
    """CIE76 ΔE between two sRGB colours (0..255)."""
    lab = cv2.cvtColor(np.array([[rgb1, rgb2]], np.float32) / 255.0, cv2.COLOR_RGB2Lab)[0]
    return float(np.linalg.norm(lab[0] - lab[1]))


def placement(case, output: np.ndarray, colours, background: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """An object that should have moved (move, resize, drag cases): the edited object's colour segmented in the
    output against its ground-truth placement. Returns (metrics: centroid_err_px, iou, vacated), the background
    mask to compare (away from source and target), and the segmentation."""
    scene, target = case.scene, case.target
    src, tgt = scene.masks[case.index], target.masks[case.index]
    others = [c for k, c in enumerate(colours) if k != case.index]
    seg = segment(output, colours[case.index], others, background)
    c_out, c_tgt = centroid(seg), centroid(tgt)
    dist = np.hypot(*(centroid(src) - c_tgt))
    m = {"centroid_err_px": float(dist if c_out is None else np.hypot(*(c_out - c_tgt))), "iou": iou(seg, tgt)}
    vacated = src & ~dilate(tgt, 2)
    m["vacated"] = float(1 - seg[vacated].mean()) if vacated.any() else float("nan")
    keep = ~(dilate(src, 4) | dilate(tgt, 4))
    return m, keep, seg


def placed(m: dict, vacated: bool = True) -> bool:
    """The object is where it should be (centroid, IoU) and, with `vacated`, gone from where it was."""
    ok = m["centroid_err_px"] <= THRESHOLDS["centroid_px"] and m["iou"] >= THRESHOLDS["iou"]
    if vacated:
        ok = ok and (np.isnan(m["vacated"]) or m["vacated"] >= THRESHOLDS["vacated"])
    return ok
