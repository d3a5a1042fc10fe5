"""What every task provides, and the grid geometry the tasks share.

A task is built by its registry entry's `build(spec, prep)` from a resolved spec and the prepared inputs. The
pipeline asks it for the images and prompts to invert and its z_T initialisation; the sampler (through its
`GuidedTask` contract) for its two energies, the region where the edit gradient applies, the regional-SDE region
and its memory-bank mode. How strongly it is guided is not the task's: that is the pipeline's `Guidance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..grid import Grid


def nearest(mask, size: tuple[int, int]) -> torch.Tensor:
    """Bool mask (H, W) -> (h, w) with PyTorch legacy nearest (the official resize for masks), thresholded > 0.5."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    return F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5


def centre_offset(canvas: int, out: int) -> int:
    """Index offset of a centred crop (canvas > out) or of centred zero padding (canvas < out)."""
    return (canvas - out) // 2 if canvas >= out else -((out - canvas) // 2)


def place(canvas: torch.Tensor, shift: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Translate a (..., Hc, Wc) canvas by shift=(dy, dx) and centre-crop/pad it to out_hw, filling with zeros.

    Same as the official torch.roll followed by a centred crop or pad wherever nothing wraps around; where the
    official roll would wrap content to the opposite border, we drop it
    instead: content wrapped to the far border is an artefact, never what a user asked for (docs/fidelity.md).
    """
    hc, wc = canvas.shape[-2:]
    out = canvas.new_zeros(canvas.shape[:-2] + tuple(out_hw))
    oy = centre_offset(hc, out_hw[0]) - shift[0]
    ox = centre_offset(wc, out_hw[1]) - shift[1]
    # out[y, x] = canvas[y + oy, x + ox] where valid
    y0, y1 = max(0, -oy), min(out_hw[0], hc - oy)
    x0, x1 = max(0, -ox), min(out_hw[1], wc - ox)
    if y0 < y1 and x0 < x1:
        out[..., y0:y1, x0:x1] = canvas[..., y0 + oy : y1 + oy, x0 + ox : x1 + ox]
    return out


def paired_cells(canvas_mask: torch.Tensor, shift: tuple[int, int], out_hw: tuple[int, int]):
    """Cells of a canvas mask and where `place` puts them, restricted to those that land inside out_hw.

    Returns (source (ys, xs), destination (ys, xs)) in the source's raster order, which `place` preserves, so the
    pairing equals the official boolean-index pairing when nothing is cut off.
    """
    ys, xs = torch.nonzero(canvas_mask, as_tuple=True)
    yd = ys - centre_offset(canvas_mask.shape[0], out_hw[0]) + shift[0]
    xd = xs - centre_offset(canvas_mask.shape[1], out_hw[1]) + shift[1]
    keep = (yd >= 0) & (yd < out_hw[0]) & (xd >= 0) & (xd < out_hw[1])
    return (ys[keep], xs[keep]), (yd[keep], xd[keep])


def cells_to_mask(cells, size: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[cells[0], cells[1]] = True
    return mask


def latent_region(feature_mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Feature-res bool mask -> (1, 1, h, w) float 0/1 at latent res (nearest takes every 2nd cell, > 0)."""
    return F.interpolate(feature_mask[None, None].float(), size=latent_hw, mode="nearest")


@dataclass(frozen=True)
class TaskInfo:
    """A task's registration: its typed parameters (fields, defaults, ranges: the only place they are written), the
    official demo's guidance settings for it, and its builder."""

    name: str
    build: Callable  # (resolved EditSpec, inputs.Prepared) -> Task
    params: type  # the task's frozen Params dataclass (tasks/params.py): EditSpec.params is one
    settings: dict  # the official demo's guidance_scale, energy_scale (slider units), gradient_coef, bank_steps
    doc: str = ""  # one sentence: what the task does (the CLI command's help starts with it)
    example: str = ""  # the arguments of an example command line after `dragondiff NAME` (shown in its --help)
    # What the edges need (UI, previews, benchmarks); nothing outside tasks/ branches on a task's name.
    images: int = 1  # 1, or 2 when it takes a reference image (with its reference_mask)
    user_mask: str | None = None  # the EditResult.masks key of the mask the user draws (tinted in previews)
    arrows: Callable | None = None  # (EditResult) -> [((x, y), (x, y)), ...] drawn on the preview's input
    ui: TaskUI | None = None  # its tab in the web UI
    bench: dict = field(default_factory=dict)  # benchmark case name -> BenchCase ("resize" is a move case)
    # Tasks that edit a crop of the photo (face: the aligned face): (resolved spec, photo HxWx3 uint8) -> Frame,
    # called before the inputs are prepared; the crop is what the edit works on, and the result is put back.
    frame: Callable | None = None


@dataclass(frozen=True)
class Frame:
    """The crop a task edits instead of the whole photo, and where it lies in the photo (`alignment`: an object
    with `paste_into(photo, crop at any size, weight of any size)`, e.g. `dragondiff.face.Alignment`); `data` is the task's own."""

    image: np.ndarray  # the crop, HxWx3 uint8 (prepared at the working size like any image)
    photo: np.ndarray  # the photo, HxWx3 uint8
    alignment: object
    data: dict = field(default_factory=dict)

    def paste(self, result: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        """The working-size result put back into the photo (weight: crop-sized, where the result replaces it)."""
        weight = np.ones(result.shape[:2], np.float32) if weight is None else weight
        return self.alignment.paste_into(self.photo, result, weight)


@dataclass(frozen=True)
class UIField:
    """A spec field the task's tab and API endpoint take as it is: checkboxes of `choices` (all ticked by default;
    the field is the ticked ones), or with no choices a text box (empty: the field's default)."""

    name: str
    label: str
    choices: tuple = ()


@dataclass(frozen=True)
class TaskUI:
    """A task's tab in the web UI: what the user brushes and clicks, and how the clicks become spec fields."""

    title: str
    mask_on_image: bool = True  # the user brushes the `mask` field on the image
    click_help: str | None = None  # how to click the points; None: the task takes no clicks
    # n clicked points -> None, or raises ValueError saying what is missing
    check_clicks: Callable[[int], None] = lambda n: None
    # (points [(x, y), ...] in image pixels, image_hw, reference_mask or None, reference_hw or None, scale) ->
    # the task's spec fields besides mask / reference / reference_mask
    clicks_to_fields: Callable[..., dict] = lambda points, **_: {}
    scale: bool = False  # a Scale slider (the `scale` field)
    # the fields clicks_to_fields makes, as the app's API endpoint takes them instead: name -> "number" | "json"
    api_fields: dict = field(default_factory=dict)
    example_prompt: Callable[[str], str] = lambda caption: caption  # an example scene's caption -> the prompt
    examples: bool = True  # the tab offers the bundled example scenes (False: its prompt starts as the task's own)
    # the label of an upload for the task's `reference` field without a mask (a reference photo), or None
    reference_upload: str | None = None
    fields: tuple = ()  # UIFields: further spec fields, as tab controls and API parameters
    # What a preview panel shows while the inputs change: (image, reference or None, {UIField name: value}) ->
    # {"handles": (N, 2) or None, "targets": (N, 2) or None (arrows from the handles), "boxes": [(x0, y0, x1, y1),
    # ...] numbered in the panel, "problem": str or None (said in the message area)}, in the image's pixels.
    preview: Callable[..., dict] | None = None
    # the label of a second result panel showing the result at the working size (a Frame task's edited crop)
    working_result: str | None = None


@dataclass(frozen=True)
class ExampleScene:
    """Two objects on a background, for the speed benchmark's edits: the image, the first object's mask, the
    second object's mask and a region around the first (a drag's editable mask); `size` its side in pixels."""

    image: np.ndarray
    object: np.ndarray
    other: np.ndarray
    region: np.ndarray
    size: int


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case of a task. The shapes benchmark draws case k of it from the seeds
    shapes.scenes.CASE_SEED_BASE + seed_offset + 1000·k (+ retries) and scores its output; the speed benchmark
    times `example`.

    make(seed, rng, scene) -> dict of bench.cases.Case fields (target, index, kwargs, and optionally reference,
        target_index, prompt) or None when the random scene does not fit the case (the next seed is tried).
    evaluate(case, output, colours, background, roundtrip) -> (metrics dict, bool mask of the background to
        compare, success before the background check); colours: the input objects' colours as rendered,
        roundtrip(scenes) -> the model's VAE reconstruction of those scenes (drawn at its working size, returned
        at the benchmark's 128 px).
    example(ExampleScene) -> spec fields of one edit of that scene.
    """

    seed_offset: int
    make: Callable
    evaluate: Callable
    example: Callable


def common_fields(spec, prep, reference: tuple[torch.Tensor, np.ndarray] | None = None,
                  prompt_reference: np.ndarray | None = None) -> dict:
    """The Task fields every task fills the same way. `reference`: the reference image's (pixels, working-size
    uint8 image) for two-image tasks, inverted with the base image as batch element 1. The image prompt shows the
    working image, and for two-image tasks also `prompt_reference` (default: the working-size reference)."""
    pixels, prompts, reference_image = prep.pixels, [spec.prompt], None
    prompt_images = [prep.image]
    if reference is not None:
        ref_pixels, reference_image = reference
        pixels = torch.cat([pixels, ref_pixels.to(pixels)])
        prompts.append(spec.params.reference_prompt)
        prompt_images.append(reference_image if prompt_reference is None else prompt_reference)
    return {"pixels": pixels, "inversion_prompts": prompts, "prompt": spec.prompt, "grid": prep.grid,
            "reference_image": reference_image, "prompt_images": prompt_images}


@dataclass
class Task:
    """Base class. Subclasses fill the fields and implement `init_latent` and `energies`."""

    name: str
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]: B = 1 (base) or 2 (base, reference)
    inversion_prompts: list[str]
    prompt: str  # edit prompt: sampling condition and feature-pass condition
    grid: Grid  # the edit's image / latent / feature sizes
    edit_region: torch.Tensor  # (1, 1, h, w) M: edit gradient inside, content gradient outside
    sde_region: torch.Tensor  # (1, 1, h, w) region of the regional SDE
    bank_mode: str  # inside the bank window (the spec's bank_steps); plain attention outside it
    reference_image: np.ndarray | None = None  # two-image tasks: the reference at the working size, as used
    prompt_images: list[np.ndarray] = field(default_factory=list)  # what the image prompt shows (uint8 RGB)
    union_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # what the result reports ("as used")
    flags: list[str] = field(default_factory=list)  # degenerate energy terms skipped, etc.
    paste_weight: np.ndarray | None = None  # tasks with a Frame: where the result replaces the photo (crop-sized)
    landmarks: dict | None = None  # tasks that drag landmarks: their handles / targets on the crop, as reported

    def init_latent(self, inverted_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From inv[T] (B, 4, h, w): the starting latent z_T (1, 4, h, w) and the step-0 reference latent (B, ...)."""
        return inverted_t[:1].clone(), inverted_t

    def energies(self, gen: list[torch.Tensor], refs: list[list[torch.Tensor]]):
        """(E_edit, E_content) from native generation features and native reference features per image.

        Either may be None when its selection is empty (then it contributes no gradient).
        """
        raise NotImplementedError
