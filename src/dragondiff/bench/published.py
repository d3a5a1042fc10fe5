"""Published DragBench numbers of other methods, each with where it was read. Only numbers with a source are here.

Mean Distance (MD, pixels, lower is better) and Image Fidelity (IF = 1 - LPIPS, higher is better) over DragBench's
205 samples. Papers re-run baselines with their own settings, so the same method has different numbers in
different tables (DragDiffusion 33.70 vs 34.57); each row names its table. Read from the papers' tables as quoted
in the project's field notes (shared/field-notes.md §1.1, §2.1); check against the papers before quoting them.
"""

from __future__ import annotations

FLOWDRAG = "FlowDrag paper (KAIST), DragBench table"
GEODRAG = "GeoDrag paper, DragBench table"

# (method, MD, IF, source)
PUBLISHED: tuple[tuple[str, float | None, float | None, str], ...] = (
    ("DragDiffusion", 33.70, 0.89, FLOWDRAG),
    ("DragDiffusion", 34.57, 0.871, GEODRAG),
    ("DiffEditor", 28.46, 0.89, FLOWDRAG),
    ("FreeDrag", 35.00, 0.70, FLOWDRAG),
    ("FreeDrag", 30.80, 0.845, GEODRAG),
    ("DragNoise", 33.41, 0.63, FLOWDRAG),
    ("DragNoise", 33.84, 0.861, GEODRAG),
    ("GoodDrag", 22.96, 0.86, FLOWDRAG),
    ("FastDrag", 32.10, 0.850, GEODRAG),
    ("GeoDrag", 29.24, 0.847, GEODRAG),
    ("FlowDrag", 22.88, 0.82, FLOWDRAG),
)

# DragonDiffusion itself: no DragBench MD/IF was found in any table we could read (its paper reports face-landmark
# dragging on CelebA-HQ; DiffEditor quotes MD 13.94 there). The row is shown, empty, with this note.
NOT_FOUND = {"DragonDiffusion": "no DragBench MD/IF found in a citable table (its paper evaluates face landmarks "
                                "on CelebA-HQ: MD 13.94 as quoted by DiffEditor)"}
