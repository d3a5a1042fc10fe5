"""`dragondiff bench dragbench`: DragBench's Mean Distance (DIFT point matching) and Image Fidelity (1 - LPIPS) on
tiny random networks: the plumbing, not the numbers (real numbers need SD 2.1 and LPIPS' AlexNet weights)."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, make_scene
from dragondiff.bench import dragbench_eval as ev
from dragondiff.bench.dift import distances, match_points, point_rc
from dragondiff.bench.lpips_alex import ALEX_CHANNELS, AlexLPIPS, load_lpips, lpips_distance


def test_point_matching_finds_a_planted_correspondence():
    """The edited map is the source map moved by (dy, dx) = (3, -5): every handle is found moved by that much."""
    torch.manual_seed(0)
    source = torch.randn(16, 24, 32)
    edited = torch.roll(source, shifts=(3, -5), dims=(1, 2))
    handles = [(10, 12), (4, 20), (15, 9)]
    found = match_points(source, edited, handles)
    assert found == [(r + 3, c - 5) for r, c in handles]
    # distances go from each target (x, y) to the found (row, col): 0 where the target is the moved handle
    pairs = [((12, 10), (7, 13)), ((20, 4), (15, 7 + 4))]  # second target 4 px below the found point
    assert distances(pairs, found[:2]) == [0.0, 4.0]
    assert point_rc((31.6, 2.2), (24, 32)) == (2, 31) and point_rc((40, -3), (24, 32)) == (0, 31)


@pytest.fixture(scope="module")
def lpips_folder(tmp_path_factory):
    """LPIPS(alex) weights of the real shapes, random, under the published files' names and keys."""
    torch.manual_seed(1)
    model = AlexLPIPS()
    folder = tmp_path_factory.mktemp("lpips")
    trunk = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save({**trunk, "classifier.1.weight": torch.zeros(4, 4)}, folder / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{n}.model.1.weight": torch.rand(1, c, 1, 1) * 0.01 for n, c in enumerate(ALEX_CHANNELS)},
               folder / "alex.pth")
    return folder


def test_lpips_of_an_image_with_itself_is_zero(lpips_folder, tmp_path):
    model = load_lpips(lpips_folder)
    torch.manual_seed(2)
    a, b = torch.rand(1, 3, 90, 130) * 2 - 1, torch.rand(1, 3, 90, 130) * 2 - 1
    assert lpips_distance(model, a, a) == 0.0
    d = lpips_distance(model, a, b)
    assert d > 0 and d == pytest.approx(lpips_distance(model, b, a), rel=1e-5)
    tiny = AlexLPIPS(channels=(4, 8, 8, 8, 8))  # the network's shape does not depend on its widths
    assert float(tiny(a, a)[0]) == 0.0 and float(tiny(a, b)[0]) > 0
    (tmp_path / "alex.pth").write_bytes((lpips_folder / "alex.pth").read_bytes())  # the trunk is missing
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth.*alex.pth"):
        load_lpips(tmp_path)


def _row(sample, category, dists, lp, status="ok"):
    return ev.SampleResult(sample=sample, category=category, status=status, distances=dists, lpips=lp)


def test_categories_aggregate_as_the_published_scripts():
    """MD is pooled over point pairs (the scripts append every pair's distance to one list), not a mean of
    per-sample means; IF is 1 - the mean LPIPS over samples; a category is the same over its samples; samples that
    were not evaluated count in `of` only."""
    rows = [_row("animals/a", "animals", [1.0, 3.0], 0.1), _row("animals/b", "animals", [8.0], 0.2),
            _row("art_work/c", "art_work", [2.0], 0.3), _row("art_work/d", "art_work", [], None, "missing")]
    agg = ev.aggregate(rows)
    assert agg["overall"]["md"] == pytest.approx(3.5)  # (1 + 3 + 8 + 2) / 4, not (2 + 8 + 2) / 3
    assert agg["overall"]["if"] == pytest.approx(0.8)
    assert (agg["overall"]["samples"], agg["overall"]["of"], agg["overall"]["pairs"]) == (3, 4, 4)
    cats = {c["category"]: c for c in agg["categories"]}
    assert [c["category"] for c in agg["categories"]] == ["art_work", "animals"]  # DragBench's order
    assert cats["animals"]["md"] == pytest.approx(4.0) and cats["animals"]["if"] == pytest.approx(0.85)
    assert cats["art_work"]["md"] == pytest.approx(2.0)
    assert (cats["art_work"]["samples"], cats["art_work"]["of"]) == (1, 2)


def _sample(folder, size, points, prompt="a red disc"):
    folder.mkdir(parents=True)
    img, _, _ = make_scene(size=64, seed=len(points))
    Image.fromarray(img).resize(size).save(folder / "original_image.png")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[8:56, 8:56] = 1
    with open(folder / "meta_data.pkl", "wb") as f:
        pickle.dump({"prompt": prompt, "points": points, "mask": mask}, f)


def _run(*args):
    from dragondiff.cli import main

    return main([str(a) for a in args])


def test_bench_dragbench_end_to_end(tmp_path, lpips_folder, capsys):
    """Edits the samples without a result (the batch), evaluates them, writes JSON + Markdown beside published
    numbers; then a partial folder gives a partial table with the missing and unreadable samples listed."""
    root, out = tmp_path / "DragBench", tmp_path / "out"
    _sample(root / "animals" / "s1", (64, 64), [(20, 30), (28, 30)])
    _sample(root / "animals" / "s2", (72, 64), [(16, 20), (20, 24), (40, 40), (44, 36)])
    _sample(root / "art_work" / "s3", (64, 64), [(30, 30), (34, 30)])
    common = ["--dift-model", TINY_MODEL, "--dift-ensemble", "2", "--lpips", lpips_folder, "--eval-device", "cpu"]
    code = _run("bench", "dragbench", root, "--outputs", out, "--model", TINY_MODEL, "--steps", "2",
                "--max-resolution", "64", "--threads", "1", "-q", *common)
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "dragbench-eval.json").read_text())
    assert (data["overall"]["samples"], data["overall"]["of"], data["overall"]["pairs"]) == (3, 3, 4)
    assert [c["category"] for c in data["categories"]] == ["art_work", "animals"]  # DragBench's order
    assert all(len(s["distances"]) == len(s["pairs"]) for s in data["samples"])
    assert 0 <= data["overall"]["md"] < 100 and 0 < data["overall"]["if"] <= 1
    assert data["settings"]["timestep"] == 261 and data["settings"]["up_block"] == 1
    table = (out / "dragbench-eval.md").read_text()
    assert "| Method | MD ↓ | IF ↑ | Source |" in table and "| DiffEditor | 28.46 | 0.890 |" in table
    assert "| DragonDiffusion | — | — |" in table and "not comparable" in table  # 3 of DragBench's 205
    # a partial folder: one result gone, one unreadable, one replaced by the original itself (another method's
    # result: no sidecar); --no-edit evaluates what is there and lists the rest
    (out / "animals/s1/dragged_image.png").unlink()
    (out / "animals/s2/dragged_image.png").write_bytes(b"not a png")
    shutil.copy(root / "art_work/s3/original_image.png", out / "art_work/s3/dragged_image.png")
    (out / "art_work/s3/dragged_image.json").unlink()
    capsys.readouterr()
    code = _run("bench", "dragbench", root, "--outputs", out, "--no-edit", "-q", *common)
    captured = capsys.readouterr()
    assert code == 1 and "2 samples not evaluated" in captured.err, captured.err
    data = json.loads((out / "dragbench-eval.json").read_text())
    assert (data["overall"]["samples"], data["overall"]["of"]) == (1, 3)
    assert data["overall"]["if"] == 1.0  # LPIPS of the original with itself is 0
    listed = {r["sample"]: r["status"] for r in data["not_evaluated"]}
    assert listed == {"animals/s1": "missing", "animals/s2": "unreadable"}
    assert "- animals/s1: missing" in captured.out and "animals/s2: unreadable" in captured.out
    # without --no-edit, a folder holding another method's results is not edited into
    code = _run("bench", "dragbench", root, "--outputs", out, "-q", *common)
    assert code == 2 and "--no-edit" in capsys.readouterr().err
    # malformed: --outputs a file; DIR without samples; LPIPS weights missing
    code = _run("bench", "dragbench", root, "--outputs", root / "animals/s1/meta_data.pkl", *common)
    assert code == 2 and "not a folder" in capsys.readouterr().err
    code = _run("bench", "dragbench", tmp_path / "out", "--outputs", out, *common)
    assert code == 2 and "no DragBench sample" in capsys.readouterr().err
    code = _run("bench", "dragbench", root, "--outputs", out, "--lpips", root, "--dift-model", TINY_MODEL)
    assert code == 2 and "alexnet-owt-7be5be79.pth" in capsys.readouterr().err
