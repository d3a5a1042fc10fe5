"""DragBench's two numbers for a folder of edits, computed as DragDiffusion's evaluation scripts compute them.

* Mean Distance (MD, pixels, lower is better): for every (handle, target) pair, where the handle's DIFT feature
  (see dift.py) is found in the edited image, and how far that is from the target. Pooled over all pairs: the
  benchmark's MD is the mean over every pair of every sample (not a mean of per-sample means); a category's MD is
  the same pool restricted to its samples.
* Image Fidelity (IF, higher is better): 1 - LPIPS(alex) between the original and the edited image, both bilinearly
  resized to 224 x 224 in [-1, 1]; the mean over samples.

The edited image is `<outputs>/<category>/<sample>/dragged_image.png` (what `dragondiff batch` writes); one of
another size is bilinearly resized to the original's size first, as the scripts do. Samples whose result is
missing or unreadable are listed, never silently dropped: the numbers then cover fewer samples, and the report
says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import dragbench
from .dift import DIFT_ENSEMBLE, DIFT_SEED, DIFT_TIMESTEP, DIFT_UP_BLOCK, distances, match_points, point_rc, upsample
from .lpips_alex import lpips_distance
from .published import NOT_FOUND, PUBLISHED

# DragBench's categories in its scripts' order (drag_bench_evaluation/run_eval_*.py); 205 samples in all.
CATEGORIES = ("art_work", "land_scape", "building_city_view", "building_countryside_view", "animals", "human_head",
              "human_upper_body", "human_full_body", "interior_design", "other_objects")
DRAGBENCH_SAMPLES = 205
LPIPS_SIZE = 224


@dataclass
class Settings:
    """How the metrics were computed (recorded in the report)."""

    dift_model: str = ""
    timestep: int = DIFT_TIMESTEP
    up_block: int = DIFT_UP_BLOCK
    ensemble: int = DIFT_ENSEMBLE
    seed: int = DIFT_SEED
    lpips: str = ""
    lpips_size: int = LPIPS_SIZE


@dataclass
class SampleResult:
    sample: str  # path relative to DIR
    category: str
    status: str  # "ok", or why it was not evaluated: "missing", "unreadable", "invalid"
    reason: str = ""
    pairs: list = field(default_factory=list)  # [[hx, hy], [tx, ty]] per pair
    matched: list = field(default_factory=list)  # [x, y] where each handle was found
    distances: list = field(default_factory=list)
    lpips: float | None = None


def category_of(rel: Path) -> str:
    """DragBench's layout is <category>/<sample>; a sample directly under DIR has no category ("-")."""
    return rel.parts[0] if len(rel.parts) > 1 else "-"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) in [-1, 1]."""
    return torch.tensor(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def read_pair(sample: dragbench.Sample, edited: Path) -> tuple[np.ndarray, np.ndarray]:
    """The original and the edited image as RGB arrays, the edited one resized (bilinear) to the original's size."""
    with Image.open(sample.image) as im:
        source = im.convert("RGB")
    with Image.open(edited) as im:
        result = im.convert("RGB")
    if result.size != source.size:
        result = result.resize(source.size, Image.BILINEAR)
    return np.array(source), np.array(result)


def sample_metrics(source: np.ndarray, edited: np.ndarray, prompt: str, pairs, *, dift, lpips_model,
                   settings: Settings) -> dict:
    """distances (one per pair), matched (x, y) per handle, lpips: for one sample."""
    h, w = source.shape[:2]
    out: dict = {}
    if dift is not None:
        kw = dict(t=settings.timestep, up_block=settings.up_block, ensemble=settings.ensemble, seed=settings.seed)
        f_src = upsample(dift.features(source, prompt, **kw), (h, w))
        f_dst = upsample(dift.features(edited, prompt, **kw), (h, w))
        found = match_points(f_src, f_dst, [point_rc(handle, (h, w)) for handle, _ in pairs])
        out["matched"] = [[c, r] for r, c in found]
        out["distances"] = distances(pairs, found)
    if lpips_model is not None:
        out["lpips"] = lpips_distance(lpips_model, to_tensor(source), to_tensor(edited), settings.lpips_size)
    return out


def evaluate(root: Path, outputs: Path, *, dift, lpips_model, settings: Settings,
             progress=None) -> list[SampleResult]:
    """Every DragBench sample under root, against its result under outputs."""
    root, outputs = Path(root), Path(outputs)
    results = []
    folders = dragbench.find_samples(root)
    for folder in (progress(folders) if progress else folders):
        rel = folder.relative_to(root)
        row = SampleResult(sample=str(rel), category=category_of(rel), status="ok")
        results.append(row)
        try:
            sample = dragbench.read_sample(folder)
        except (ValueError, FileNotFoundError, OSError) as e:
            row.status, row.reason = "invalid", str(e)
            continue
        row.pairs = [[list(h), list(t)] for h, t in sample.points]
        edited = outputs / rel / dragbench.OUTPUT_NAME
        if not edited.is_file():
            row.status, row.reason = "missing", f"no {edited}"
            continue
        try:
            source, result = read_pair(sample, edited)
        except (OSError, ValueError) as e:
            row.status, row.reason = "unreadable", f"{edited}: {e}"
            continue
        metrics = sample_metrics(source, result, sample.prompt, sample.points, dift=dift, lpips_model=lpips_model,
                                 settings=settings)
        row.matched, row.distances = metrics.get("matched", []), metrics.get("distances", [])
        row.lpips = metrics.get("lpips")
    return results


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def summary(rows: list[SampleResult]) -> dict:
    """MD pooled over the pairs, IF = 1 - mean LPIPS over the samples: for the rows given."""
    ok = [r for r in rows if r.status == "ok"]
    dists = [d for r in ok for d in r.distances]
    lp = [r.lpips for r in ok if r.lpips is not None]
    mean_lpips = _mean(lp)
    return {"samples": len(ok), "of": len(rows), "pairs": len(dists), "md": _mean(dists),
            "lpips": mean_lpips, "if": None if mean_lpips is None else 1.0 - mean_lpips}


def aggregate(rows: list[SampleResult]) -> dict:
    """Overall and per category (DragBench's order first, then any others by name)."""
    present = {r.category for r in rows}
    order = [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))
    return {"overall": summary(rows),
            "categories": [{"category": c, **summary([r for r in rows if r.category == c])} for c in order]}


def report(rows: list[SampleResult], *, root: Path, outputs: Path, method: str, settings: Settings,
           extra: dict | None = None) -> dict:
    agg = aggregate(rows)
    return {
        "benchmark": "DragBench",
        "method": method,
        "root": str(root),
        "outputs": str(outputs),
        "settings": asdict(settings),
        **agg,
        "not_evaluated": [{"sample": r.sample, "status": r.status, "reason": r.reason}
                          for r in rows if r.status != "ok"],
        "samples": [asdict(r) for r in rows],
        "published": [{"method": m, "md": md, "if": fid, "source": src} for m, md, fid, src in PUBLISHED],
        **(extra or {}),
    }


def _fmt(value, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(data: dict) -> str:
    """The report as Markdown: the published tables' layout (method, MD, IF), then per category, then what is
    missing."""
    o = data["overall"]
    partial = o["samples"] < o["of"] or o["of"] != DRAGBENCH_SAMPLES
    lines = [f"# DragBench: {data['method']}", "",
             f"{o['samples']} of {o['of']} samples evaluated ({o['pairs']} point pairs)"
             + (f"; the full DragBench has {DRAGBENCH_SAMPLES} samples, so this row is not comparable to the "
                "published ones" if partial else "") + ".",
             "MD: mean distance in pixels from each target to where DIFT finds its handle in the edited image "
             "(lower is better). IF: image fidelity, 1 - LPIPS(alex) to the original at 224 px (higher is "
             "better).", "",
             "| Method | MD ↓ | IF ↑ | Source |", "|---|---:|---:|---|",
             f"| **{data['method']}** | {_fmt(o['md'], 2)} | {_fmt(o['if'], 3)} | this run "
             f"({o['samples']}/{o['of']} samples) |"]
    for name, note in NOT_FOUND.items():
        lines.append(f"| {name} | — | — | {note} |")
    for row in data["published"]:
        lines.append(f"| {row['method']} | {_fmt(row['md'], 2)} | {_fmt(row['if'], 3)} | {row['source']} |")
    lines += ["", "## Per category", "", "| Category | Samples | Pairs | MD ↓ | IF ↑ |",
              "|---|---:|---:|---:|---:|"]
    for c in data["categories"]:
        lines.append(f"| {c['category']} | {c['samples']}/{c['of']} | {c['pairs']} | {_fmt(c['md'], 2)} | "
                     f"{_fmt(c['if'], 3)} |")
    lines.append(f"| all (pooled) | {o['samples']}/{o['of']} | {o['pairs']} | {_fmt(o['md'], 2)} | "
                 f"{_fmt(o['if'], 3)} |")
    s = data["settings"]
    lines += ["", f"DIFT: {s['dift_model']}, t={s['timestep']}, up block {s['up_block']}, ensemble {s['ensemble']}, "
                  f"seed {s['seed']} per image. LPIPS: alex, {s['lpips']}."]
    if data["not_evaluated"]:
        lines += ["", f"## Not evaluated ({len(data['not_evaluated'])})", ""]
        lines += [f"- {r['sample']}: {r['status']} ({r['reason']})" for r in data["not_evaluated"]]
    return "\n".join(lines) + "\n"
