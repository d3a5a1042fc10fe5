"""Input validation: every bad input is refused with a clear error naming the offending argument, before any
model work; accepted input variants load identically; the working size follows the official rule; input files
are never modified."""

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, TINY_MODEL, make_scene
from dragondiff import inputs as io
from dragondiff.pipeline import DragonPipeline





class ModelWorkStarted(Exception):
    """Raised by the guard below: validation let a bad input through to the models."""


@pytest.fixture
def no_model(monkeypatch):
    """Make any model call fail loudly, so each test also proves its error comes before model work."""

    def boom(self, *args, **kwargs):
        raise ModelWorkStarted("validation should have failed before the models ran")

    from dragondiff.backbone import SD1Backbone

    for name in ("encode_image", "condition", "decode", "forward"):
        monkeypatch.setattr(SD1Backbone, name, boom)


@pytest.fixture
def pipe(tiny_pipe, no_model):
    return tiny_pipe


@pytest.fixture
def img_disc_square():
    return make_scene()


def _move(pipe, image, mask, offset=(20, 0), **kw):
    return pipe.move(image, mask, offset=offset, **{**FAST, **kw})


# ------------------------------------------------------------------------------------------------- masks


def test_empty_mask(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^mask: .*empty"):
        _move(pipe, img, np.zeros_like(disc))


def test_all_ones_mask(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^mask: .*whole image"):
        _move(pipe, img, np.ones_like(disc))


def test_mask_of_another_size(pipe, img_disc_square):
    img, _, _ = img_disc_square
    small = make_scene(size=64)[1]
    with pytest.raises(ValueError, match=r"^mask: mask is 64x64 but its image is 128x128"):
        _move(pipe, img, small)


def test_grey_masks_are_thresholded_at_half(pipe, img_disc_square):
    """Anti-aliased and JPEG masks are read at 50 %; values outside 0..255 are still refused by name."""
    from dragondiff.inputs import load_mask

    gradient = np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))  # 0..254
    assert np.array_equal(load_mask(gradient, "mask"), gradient >= 128)
    assert np.array_equal(load_mask(Image.fromarray(gradient), "mask"), gradient >= 128)  # 8-bit PIL the same
    soft = gradient.astype(np.float32) / 255
    assert np.array_equal(load_mask(soft, "mask"), soft >= 0.5)
    img, _, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^mask: mask values must lie in 0..255 .*from 0 to 300"):
        _move(pipe, img, gradient.astype(np.int32) + (gradient.astype(np.int32) == 254) * 46)
    with pytest.raises(ValueError, match=r"^mask: mask values must lie in 0..255 .*from -1"):
        _move(pipe, img, gradient.astype(np.int16) - (gradient == 0))


def test_nan_in_float_mask(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    m = disc.astype(np.float32)
    m[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^mask: mask contains NaN"):
        _move(pipe, img, m)


def test_mask_error_names_reference_region(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^reference_region: .*empty"):
        _move(pipe, img, disc, reference_region=np.zeros_like(disc))


# ------------------------------------------------------------------------------------------------ points


def _drag(pipe, img, points, mask, **kw):
    return pipe.drag(img, points, mask, **{**FAST, **kw})


@pytest.mark.parametrize(
    "points, where",
    [
        ([((130, 40), (50, 40))], r"points\[0\] handle"),  # x beyond the 128-px width
        ([((36, 44), (50, -1))], r"points\[0\] target"),  # negative y
        ([((36, 44), (45, 44)), ((36, 44), (50, 128))], r"points\[1\] target"),  # y == height
    ],
)
def test_points_outside_image(pipe, img_disc_square, points, where):
    img, disc, square = img_disc_square
    with pytest.raises(ValueError, match=where + r": point .* lies outside the 128x128 image"):
        _drag(pipe, img, points, disc | square)


@pytest.mark.parametrize(
    "points, where",
    [
        ([((36, 44), (50, 44), (60, 44))], r"points\[0\]: expected a \(handle, target\) pair"),  # 3 clicks
        ([((36, 44),)], r"points\[0\]: expected a \(handle, target\) pair"),  # one click
        ([(36, 44)], r"points\[0\] handle: expected an \(x, y\) pair"),  # a bare point, not a pair of points
        ([((36, 44), (50, 44)), ((36, 44),)], r"points\[1\]: expected"),  # second pair incomplete
        ([((36, 44, 0), (50, 44))], r"points\[0\] handle: expected an \(x, y\) pair"),  # 3-D point
        ([((36, 44), ("a", 44))], r"points\[0\] target: expected an \(x, y\) pair"),
    ],
)
def test_point_pairs_that_are_not_pairs(pipe, img_disc_square, points, where):
    img, disc, square = img_disc_square
    with pytest.raises(TypeError, match=where):
        _drag(pipe, img, points, disc | square)


@pytest.mark.parametrize("points", [[], (), None, "36,44 50,44"])
def test_empty_or_non_list_points(pipe, img_disc_square, points):
    img, disc, square = img_disc_square
    with pytest.raises(TypeError, match=r"^points: expected a non-empty list"):
        _drag(pipe, img, points, disc | square)


def test_non_finite_point(pipe, img_disc_square):
    img, disc, square = img_disc_square
    with pytest.raises(ValueError, match=r"points\[0\] target: coordinates must be finite"):
        _drag(pipe, img, [((36, 44), (math.nan, 44))], disc | square)


def test_drag_handle_and_target_in_same_cell(pipe, img_disc_square):
    img, disc, square = img_disc_square
    # 40 // 4 == 43 // 4 == 10: same 4-px feature cell at working size 128 (input_scale 1).
    with pytest.raises(ValueError, match=r"^points\[0\]: handle .* same 4-px feature cell"):
        _drag(pipe, img, [((40, 40), (43, 43))], disc | square)


def test_drag_target_outside_editable_mask(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^points\[0\]: target \(100, 10\) lies outside the editable mask"):
        _drag(pipe, img, [((36, 44), (100, 10))], disc)


def test_drag_mask_is_validated(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^mask: .*empty"):
        _drag(pipe, img, [((36, 44), (50, 44))], np.zeros_like(disc))


# -------------------------------------------------------------------------------------------- move geometry


def test_move_without_displacement(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^offset=\(0, 0\) with scale=1 is not an edit"):
        _move(pipe, img, disc, offset=(0, 0), scale=1)
    with pytest.raises(ValueError, match=r"^offset="):
        _move(pipe, img, disc, offset=(0.0, 0), scale=1.0)


@pytest.mark.parametrize("offset", [(1000, 0), (0, -200), (-128, 128)])
def test_move_object_leaves_image(pipe, img_disc_square, offset):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^offset=.* moves the whole object outside the image"):
        _move(pipe, img, disc, offset=offset)


@pytest.mark.parametrize("scale", [0, -1.0, math.nan, math.inf, 10.5, 100])
def test_bad_scale(pipe, img_disc_square, scale):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^scale must be in \(0, 10\]"):
        _move(pipe, img, disc, scale=scale)


@pytest.mark.parametrize("scale", [None, "2", True])
def test_non_numeric_scale(pipe, img_disc_square, scale):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"^scale must be a number"):
        _move(pipe, img, disc, scale=scale)


def test_string_point(pipe, img_disc_square):
    img, disc, square = img_disc_square
    with pytest.raises(TypeError, match=r"^points\[0\] handle: expected an \(x, y\) pair of numbers"):
        _drag(pipe, img, [("12", (45, 44))], disc | square)


@pytest.mark.parametrize("offset", [("a", 0), "ab", None, 5, (1, 2, 3), (object(), 1), "12", ("10", "0")])
def test_non_numeric_offset(pipe, img_disc_square, offset):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"^offset must be a \(dx, dy\) pair of numbers"):
        _move(pipe, img, disc, offset=offset)


def test_non_finite_offset(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^offset must be finite"):
        _move(pipe, img, disc, offset=(math.inf, 0))


# ------------------------------------------------------------------------------------------------- images


def test_unreadable_image_file(pipe, img_disc_square, tmp_path):
    _, disc, _ = img_disc_square
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"\x89PNG not really a png" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"^image: cannot read .*garbage\.png as an image"):
        _move(pipe, bad, disc)
    with pytest.raises(ValueError, match=r"^image: cannot read"):
        _move(pipe, str(bad), disc)  # str paths too
    with pytest.raises(ValueError, match=r"^image: cannot read"):
        _move(pipe, tmp_path, disc)  # a directory


def test_missing_files(pipe, img_disc_square, tmp_path):
    img, disc, _ = img_disc_square
    with pytest.raises(FileNotFoundError, match=r"^image: file not found"):
        _move(pipe, tmp_path / "nope.png", disc)
    with pytest.raises(FileNotFoundError, match=r"^mask: file not found"):
        _move(pipe, img, str(tmp_path / "nope_mask.png"))
    with pytest.raises(FileNotFoundError, match=r"^reference: file not found"):
        pipe.replace_appearance(img, disc, tmp_path / "ref.png", disc, **FAST)


@pytest.mark.parametrize("mode,how", [("RGBA", "flattened onto white"), ("LA", "flattened onto white"),
                                      ("P", "converted to RGB"), ("1", "converted to RGB"), ("CMYK", "converted")])
def test_alpha_palette_and_other_modes_are_converted_with_a_note(img_disc_square, mode, how, tmp_path):
    """What the web UI accepts, the API and CLI accept too: converted as the UI shows it, with a note."""
    from dragondiff.errors import InputNote
    from dragondiff.inputs import load_image

    img, _, _ = img_disc_square
    pil = Image.fromarray(img).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")  # PNG has no CMYK
    pil.save(path)
    for source in (pil, path):
        with pytest.warns(InputNote, match=rf"^image: '{mode}' image.*{how}"):
            out = load_image(source, "image")
        assert out.shape == img.shape and out.dtype == np.uint8
    if mode in ("RGBA", "LA"):  # fully opaque: nothing changes but the channel count
        expected = img if mode == "RGBA" else np.asarray(Image.fromarray(img).convert("L").convert("RGB"))
        assert np.array_equal(load_image(pil, "image"), expected)


def test_transparent_pixels_become_white(img_disc_square):
    from dragondiff.inputs import load_image

    img, disc, _ = img_disc_square
    rgba = np.dstack([img, np.where(disc, 0, 255).astype(np.uint8)])
    with pytest.warns(UserWarning):
        out = load_image(Image.fromarray(rgba, "RGBA"), "image")
    assert (out[disc] == 255).all() and np.array_equal(out[~disc], img[~disc])


def test_16_bit_image(img_disc_square, tmp_path):
    from dragondiff.inputs import load_image

    pil = Image.new("I;16", (128, 128), 1000)
    with pytest.warns(UserWarning, match=r"^image: 16-bit grey \('I;16'\) scaled to 8-bit RGB"):
        out = load_image(pil, "image")
    assert (out == 4).all()  # 1000 / 257 rounds to 4
    pil.save(tmp_path / "x16.png")
    with pytest.warns(UserWarning, match="16-bit grey"):
        assert (load_image(tmp_path / "x16.png", "image") == 4).all()
    with pytest.raises(ValueError, match=r"^image: a 32-bit float image"):
        load_image(Image.new("F", (16, 16), 0.5), "image")


def test_float_image_array(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^image: array dtype must be uint8"):
        _move(pipe, img.astype(np.float32) / 255.0, disc)


def test_2d_image_array(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^image: array must have shape HxWx3"):
        _move(pipe, img[..., 0], disc)
    with pytest.raises(ValueError, match=r"^image: array must have shape HxWx3"):
        _move(pipe, np.dstack([img, img[..., :1]]), disc)  # HxWx4


def test_image_of_wrong_type(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"^image: expected a PIL image"):
        _move(pipe, img.tolist(), disc)


def test_reference_image_is_named(pipe, img_disc_square):
    img, disc, square = img_disc_square
    with pytest.raises(ValueError, match=r"^reference: a 32-bit float image"):
        pipe.replace_appearance(img, disc, Image.new("F", (128, 128), 0.5), square, **FAST)


# ------------------------------------------------------------------------------------------------ options


def test_unknown_keyword(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*'num_steps'"):
        _move(pipe, img, disc, num_steps=2)


def test_unknown_preset(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^preset must be one of \['fast', 'official', 'paper'\].*'quick'"):
        _move(pipe, img, disc, preset="quick")


def test_sde_with_paper_preset(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^sde_strength=0.3: the 'paper' preset has no regional SDE"):
        _move(pipe, img, disc, preset="paper", sde_strength=0.3)


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan])
def test_sde_strength_out_of_range(pipe, img_disc_square, value):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^sde_strength must be a finite number in \[0, 1\]"):
        _move(pipe, img, disc, sde_strength=value)


@pytest.mark.parametrize("name", ["guidance_scale", "energy_scale", "gradient_coef", "w_edit", "w_content",
                                  "w_contrast", "w_inpaint"])
def test_negative_scales(pipe, img_disc_square, name):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number in \[0, "):
        _move(pipe, img, disc, **{name: -1.0})


@pytest.mark.parametrize("name", ["guidance_scale", "energy_scale"])
def test_non_numeric_scales(pipe, img_disc_square, name):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=rf"^{name} must be a number, got str"):
        _move(pipe, img, disc, **{name: "4"})
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        _move(pipe, img, disc, **{name: math.inf})


def test_scales_apply_to_every_task(pipe, img_disc_square):
    img, disc, square = img_disc_square
    with pytest.raises(ValueError, match=r"^guidance_scale"):
        _drag(pipe, img, [((36, 44), (50, 44))], disc | square, guidance_scale=-1)
    with pytest.raises(ValueError, match=r"^energy_scale"):
        pipe.replace_appearance(img, disc, img, square, energy_scale=-1, **FAST)
    with pytest.raises(ValueError, match=r"^energy_scale"):
        pipe.paste(img, img, square, offset=(-40, -40), energy_scale=-1, **FAST)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.0, True])
def test_bad_num_inference_steps(pipe, img_disc_square, steps):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^num_inference_steps must be an integer in 1\.\.1000"):
        _move(pipe, img, disc, num_inference_steps=steps)


@pytest.mark.parametrize("res", [32, 63, 2049, 4096])
def test_max_resolution_out_of_range(pipe, img_disc_square, res):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^max_resolution must be in 64\.\.2048"):
        _move(pipe, img, disc, max_resolution=res)


def test_max_resolution_not_int(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"^max_resolution must be an int"):
        _move(pipe, img, disc, max_resolution=128.0)


def test_bad_seed_and_callback(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"^seed must be an integer"):
        _move(pipe, img, disc, seed="42")
    with pytest.raises(TypeError, match=r"^callback_on_step_end must be callable"):
        _move(pipe, img, disc, callback_on_step_end=3)


def test_bad_bank_start(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(ValueError, match=r"^bank_start"), pytest.warns(DeprecationWarning, match="bank_steps"):
        _move(pipe, img, disc, bank_start=-1)
    with pytest.raises(TypeError, match=r"^bank_start: give bank_steps"):
        _move(pipe, img, disc, bank_start=3, bank_steps=(3, None))
    with pytest.raises(ValueError, match=r"^bank_steps first must be an integer in 0\.\.1000"):
        _move(pipe, img, disc, bank_steps=(-1, None))


@pytest.mark.parametrize("prompt", [123, ["a cup"], b"a cup"])  # None: the default (inversion prompt or "")
def test_wrong_prompt_type(pipe, img_disc_square, prompt):
    img, disc, square = img_disc_square
    with pytest.raises(TypeError, match=r"^prompt: expected a string"):
        _move(pipe, img, disc, prompt=prompt)
    with pytest.raises(TypeError, match=r"^prompt: expected a string"):
        _drag(pipe, img, [((36, 44), (50, 44))], disc | square, prompt=prompt)
    with pytest.raises(TypeError, match=r"^prompt: expected a string"):
        pipe.replace_appearance(img, disc, img, square, prompt=prompt, **FAST)


def test_wrong_reference_prompt_type(pipe, img_disc_square):
    img, disc, square = img_disc_square
    with pytest.raises(TypeError, match=r"^reference_prompt"):
        pipe.replace_appearance(img, disc, img, square, reference_prompt=123, **FAST)


# ---------------------------------------------------------------------------------- appearance and paste


def test_appearance_empty_reference_mask(pipe, img_disc_square):
    img, disc, square = img_disc_square
    with pytest.raises(ValueError, match=r"^reference_mask: .*empty"):
        pipe.replace_appearance(img, disc, img, np.zeros_like(square), **FAST)


def test_appearance_reference_mask_must_match_reference(pipe, img_disc_square):
    img, disc, square = img_disc_square
    ref = make_scene(size=64)[0]  # any reference size is allowed, but its mask must match it
    with pytest.raises(ValueError, match=r"^reference_mask: mask is 128x128 but its image is 64x64"):
        pipe.replace_appearance(img, disc, ref, square, **FAST)


@pytest.mark.parametrize("offset", [(1000, 0), (0, 500), (-300, -300)])
def test_paste_offset_outside(pipe, img_disc_square, offset):
    img, _, square = img_disc_square
    with pytest.raises(ValueError, match=r"^offset=.*lands outside the image"):
        pipe.paste(img, img, square, offset=offset, **FAST)


@pytest.mark.parametrize("scale", [0, 4.5, math.nan])
def test_paste_bad_scale(pipe, img_disc_square, scale):
    img, _, square = img_disc_square
    with pytest.raises(ValueError, match=r"^scale must be in \(0, 4\]"):
        pipe.paste(img, img, square, offset=(-40, -40), scale=scale, **FAST)


def test_paste_empty_reference_mask(pipe, img_disc_square):
    img, _, square = img_disc_square
    with pytest.raises(ValueError, match=r"^reference_mask: .*empty"):
        pipe.paste(img, img, np.zeros_like(square), offset=(-40, -40), **FAST)


# ------------------------------------------------------------------------------------ accepted variants


def test_mask_variants_load_identically(tmp_path):
    _, disc, _ = make_scene(size=96)
    u8 = disc.astype(np.uint8)
    Image.fromarray(u8 * 255).save(tmp_path / "mask.png")
    Image.fromarray(u8 * 255).convert("RGB").save(tmp_path / "mask_rgb.png")
    variants = {
        "PIL L 0/255": Image.fromarray(u8 * 255, mode="L"),
        "PIL 1": Image.fromarray(u8 * 255).convert("1"),
        "bool": disc,
        "uint8 0/1": u8,
        "uint8 0/255": u8 * 255,
        "float 0/1": disc.astype(np.float32),
        "HxWx1": u8[..., None] * 255,
        "path": tmp_path / "mask.png",
        "str path": str(tmp_path / "mask.png"),
        "RGB path": tmp_path / "mask_rgb.png",
    }
    for label, value in variants.items():
        out = io.load_mask(value, "mask", (96, 96))
        assert out.dtype == bool and out.shape == (96, 96), label
        np.testing.assert_array_equal(out, disc, err_msg=label)
    # The caller's array is copied, not aliased.
    out = io.load_mask(disc, "mask")
    out[:] = False
    assert disc.any()


def test_colour_mask_with_unequal_channels_is_refused():
    _, disc, square = make_scene(size=64)
    rgb = np.dstack([disc, square, disc]).astype(np.uint8) * 255
    with pytest.raises(ValueError, match=r"^reference_mask: a colour mask must have equal channels"):
        io.load_mask(rgb, "reference_mask")


def test_image_variants_load_identically(tmp_path):
    img, _, _ = make_scene(size=96)
    Image.fromarray(img).save(tmp_path / "image.png")
    variants = {
        "PIL RGB": Image.fromarray(img),
        "uint8 array": img,
        "path": tmp_path / "image.png",
        "str path": str(tmp_path / "image.png"),
        "non-contiguous array": np.asfortranarray(img),
    }
    for label, value in variants.items():
        out = io.load_image(value, "image")
        assert out.dtype == np.uint8 and out.shape == (96, 96, 3), label
        np.testing.assert_array_equal(out, img, err_msg=label)
    grey = io.load_image(Image.fromarray(img[..., 1]), "image")  # PIL L is replicated to RGB
    assert grey.shape == (96, 96, 3) and (grey == img[..., 1:2]).all()


def _official_working_size(h, w, max_res):
    """The official demo's rule, written out independently: area ~ max_res², sides rounded (np.round, halves
    to even) to multiples of 64."""
    ratio = math.sqrt(max_res * max_res / (h * w))
    return int(np.round(h * ratio / 64)) * 64, int(np.round(w * ratio / 64)) * 64


@pytest.mark.parametrize(
    "hw, max_res, expected",
    [
        ((512, 512), 768, (768, 768)),
        ((512, 512), 512, (512, 512)),
        ((128, 128), 128, (128, 128)),
        ((480, 640), 512, (448, 576)),  # 480*0.9238/64 = 6.93 -> 7; 640*0.9238/64 = 9.24 -> 9
        ((768, 1024), 768, (640, 896)),  # 768*0.866/64 = 10.39 -> 10; 1024*0.866/64 = 13.86 -> 14
        ((160, 160), 160, (128, 128)),  # 2.5 -> 2 (half to even; half-up would give 192)
        ((224, 224), 224, (256, 256)),  # 3.5 -> 4
    ],
)
def test_working_size_official_rule(hw, max_res, expected):
    assert _official_working_size(*hw, max_res) == expected  # the hand computation in the comments
    assert io.working_size(*hw, max_res) == expected


def test_working_size_is_used_by_the_pipeline(tiny_pipe):
    img, _, _ = make_scene(size=96)
    prep = tiny_pipe._prepare(img[:, :80], 128, 50)  # 96 high, 80 wide
    assert prep.size_hw == _official_working_size(96, 80, 128) == (128, 128)
    assert prep.input_scale == (128 / 80, 128 / 96) and prep.latent_hw == (16, 16)


def test_working_size_extreme_aspect():
    with pytest.raises(ValueError, match=r"^image: aspect ratio 2000x20 is too extreme"):
        io.working_size(20, 2000, 128)


def test_tiny_images_are_refused():
    with pytest.raises(ValueError, match=r"^image: image is 4x100; both sides must be at least 8"):
        io.load_image(np.zeros((100, 4, 3), np.uint8), "image")


# --------------------------------------------------------------------------------- inputs left untouched


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_input_files_and_arrays_are_not_modified(tiny_pipe, tmp_path):
    img, disc, square = make_scene()
    paths = {"image": tmp_path / "image.png", "mask": tmp_path / "mask.png", "region": tmp_path / "region.png"}
    Image.fromarray(img).save(paths["image"])
    Image.fromarray(disc.astype(np.uint8) * 255).save(paths["mask"])
    Image.fromarray(square.astype(np.uint8) * 255).save(paths["region"])
    before = {k: (_digest(p), p.stat().st_mtime_ns) for k, p in paths.items()}

    out = tiny_pipe.move(paths["image"], paths["mask"], offset=(20, 0), reference_region=paths["region"], **FAST)
    assert out.image.size == (128, 128)
    assert {k: (_digest(p), p.stat().st_mtime_ns) for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "mask.png", "region.png"]

    # Arrays passed in are not modified in place either.
    copies = img.copy(), disc.copy(), square.copy()
    tiny_pipe.replace_appearance(img, disc, img, square, **FAST)
    for a, b in zip((img, disc, square), copies):
        np.testing.assert_array_equal(a, b)


def test_generator_must_be_a_torch_generator(pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator"):
        _move(pipe, img, disc, generator=42)


def test_non_square_points_scale_each_axis_by_its_own_factor(tiny_pipe):
    """A 256x128 image at max_resolution 128 works at 192x64: x scales by 0.75, y by 0.5. A target inside the
    editable mask is accepted and lands where it was drawn (the width factor alone would put y at 75 > 63)."""
    img = np.full((128, 256, 3), 90, np.uint8)
    editable = np.zeros((128, 256), bool)
    editable[60:128, 150:256] = True
    out = tiny_pipe.drag(img, [((170, 90), (200, 100))], editable, max_resolution=128, num_inference_steps=2,
                         progress=False)
    assert out.input_scale == (0.75, 0.5) and out.image.size == (192, 64)
    # the target's 3x3 feature box is centred at (150, 50) working px -> feature cell (row 12, column 37)
    rows, cols = np.nonzero(out.masks["target_boxes"][0])
    assert (rows.mean(), cols.mean()) == (12, 37)
    rows, cols = np.nonzero(out.masks["handle_boxes"][0])
    assert (rows.mean(), cols.mean()) == (11, 31)  # handle (170, 90) -> (127.5, 45) px


# --- errors that used to come from deep inside torch or Python -------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(device="gpu"), ValueError, r"^device: 'gpu' is not a torch device"),
    (dict(device="cuda"), ValueError, r"^device: 'cuda' but this torch build or machine has no CUDA"),
    (dict(dtype="float64"), ValueError, r"^dtype: 'float64' is not supported"),
    (dict(dtype=torch.int8), ValueError, r"^dtype: torch.int8 is not supported"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_bad_device_or_dtype_named_at_load(kwargs, error, match):
    with pytest.raises(error, match=match):
        DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, **kwargs)


def test_dtype_by_name_and_failed_move_leaves_the_pipeline_as_it_was(pipe):
    bf16 = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.unet.parameters()).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda'"):
            pipe.to("cuda")
    assert pipe.device.type == "cpu" and next(pipe.unet.parameters()).device.type == "cpu"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scale=0.01), ValueError, r"^scale=0.01 shrinks the image below one feature cell"),
    (dict(num_inference_steps=1000), ValueError, r"^num_inference_steps=1000: .* use at most 999"),
    (dict(offset=(1e20, 0)), ValueError, r"^offset must be finite pixel distances"),
    (dict(seed=2**70), ValueError, r"^seed must be an integer in 0\.\."),
    (dict(prompt="a \ud800"), ValueError, r"^prompt: not valid text"),
    (dict(bank_device="gpu"), ValueError, r"^bank_device: 'gpu' is not a torch device"),
])
def test_bad_values_fail_before_model_work(pipe, img_disc_square, kwargs, error, match):
    img, disc, _ = img_disc_square
    with pytest.raises(error, match=match):
        _move(pipe, img, disc, **kwargs)


def test_one_pixel_mask_is_blamed_on_the_mask(pipe, img_disc_square):
    img, _, _ = img_disc_square
    dot = np.zeros((128, 128), bool)
    dot[61, 61] = True  # between the 4-px feature samples (0, 4, ..., 60, 64)
    with pytest.raises(ValueError, match=r"^mask: the object is smaller than one feature cell"):
        _move(pipe, img, dot)


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :40] = 255  # left half white
    im = Image.fromarray(wide)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    loaded = io.load_image(tmp_path / "photo.jpg")
    assert loaded.shape == (80, 40, 3)  # displayed upright: tall
    assert loaded[:40].mean() > 200 and loaded[40:].mean() < 50  # the white half is now on top


def test_long_prompt_warns_that_it_is_cut(tiny_pipe, img_disc_square):
    img, disc, _ = img_disc_square
    with pytest.warns(UserWarning, match=r"^prompt: longer than the text encoder's 77 tokens"):
        _move(tiny_pipe, img, disc, prompt="a red disc " * 40, num_inference_steps=1)
