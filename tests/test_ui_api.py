"""The web app's API through `gradio_client` (what Gradio's "Use via API" page points users to), against the app
running in this process on the tiny model: one named endpoint per task taking the task's fields, nothing else."""

import os
import socket
import time

import numpy as np
import pytest
from PIL import Image

from conftest import make_scene, require
from dragondiff.output import full_resolution
from dragondiff.tasks import TASKS


def _require():
    require("the API test", ("gradio", "gradio_client"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tiny_pipe):
    _require()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from dragondiff.ui.app import launch

    port = _free_port()
    app = launch(tiny_pipe, port=port, steps=2, quiet=True, block=False)  # as `dragondiff ui` serves it
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def test_one_named_endpoint_per_task_and_no_internal_ones(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {f"/{task}" for task in TASKS} and not api["unnamed_endpoints"]
    params = {p["parameter_name"] for p in api["named_endpoints"]["/move"]["parameters"]}
    assert params == {"image", "mask", "offset", "scale", "prompt", "preset", "num_inference_steps", "seed",
                      "max_resolution", "guidance_scale", "energy_scale"}
    paste = {p["parameter_name"] for p in api["named_endpoints"]["/paste"]["parameters"]}
    assert {"reference", "reference_mask", "offset"} <= paste and "mask" not in paste


def test_move_through_gradio_client(client, tiny_pipe, tmp_path):
    from gradio_client import handle_file

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "image.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    path, status = client.predict(image=handle_file(str(tmp_path / "image.png")),
                                  mask=handle_file(str(tmp_path / "mask.png")), offset=[24, 0], prompt="a red disc",
                                  num_inference_steps=2, max_resolution=128, api_name="/move")
    assert status.startswith("**move** done")
    got = np.asarray(Image.open(path).convert("RGB"))
    direct = tiny_pipe.move(img, disc, offset=(24, 0), prompt="a red disc", num_inference_steps=2,
                            max_resolution=128, progress=False)
    assert np.array_equal(got, np.asarray(full_resolution(direct, img)))  # the edit, not the input back
    assert not np.array_equal(got, img)
    with pytest.raises(Exception, match="mask"):
        client.predict(image=handle_file(str(tmp_path / "image.png")), offset=[24, 0], num_inference_steps=2,
                       max_resolution=128, api_name="/move")


def test_uploads_are_checked_and_named(client, tmp_path):
    """A file that is no image, or over the limits, is refused naming the upload and what is accepted."""
    from gradio_client import handle_file

    img, disc, _ = make_scene()
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(Exception, match="image: notes.txt is not an image.*accepted: PNG, JPEG, WebP, GIF or BMP"):
        client.predict(image=handle_file(str(tmp_path / "notes.txt")), mask=handle_file(str(tmp_path / "mask.png")),
                       offset=[24, 0], num_inference_steps=2, max_resolution=128, api_name="/move")
    Image.new("RGB", (6000, 4000)).save(tmp_path / "big.png")
    with pytest.raises(Exception, match=r"image: big.png is 6000x4000 \(24.0 megapixels\).* 16 megapixels"):
        client.predict(image=handle_file(str(tmp_path / "big.png")), mask=handle_file(str(tmp_path / "mask.png")),
                       offset=[24, 0], num_inference_steps=2, max_resolution=128, api_name="/move")


def test_stopping_the_server_removes_its_folders(tiny_pipe, tmp_path, monkeypatch):
    """The edits' folders (dragondiff-ui-* in the temp dir) go when the server stops."""
    _require()
    import tempfile

    from gradio_client import Client, handle_file

    from dragondiff.ui.app import launch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "image.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    port = _free_port()
    app = launch(tiny_pipe, port=port, steps=2, quiet=True, block=False)
    try:
        Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            image=handle_file(str(tmp_path / "image.png")), mask=handle_file(str(tmp_path / "mask.png")),
            offset=[24, 0], num_inference_steps=2, max_resolution=128, api_name="/move")
        made = list((tmp_path / "tmp").glob("dragondiff-ui-*/session-*/edit-*/result.png"))
        assert len(made) == 1
    finally:
        app.close()
    deadline = time.time() + 10
    while list((tmp_path / "tmp").glob("dragondiff-ui-*")) and time.time() < deadline:
        time.sleep(0.2)
    assert not list((tmp_path / "tmp").glob("dragondiff-ui-*"))


def test_face_through_gradio_client(client, tiny_pipe, tmp_path):
    """The face endpoint takes the photo and the landmarks as JSON (no detector needed); its result is the edit put
    back into the photo at full size, the same as the API's."""
    from gradio_client import handle_file

    from test_face import LANDMARKS, PHOTO, mouth_lowered

    api = client.view_api(return_format="dict", print_info=False)
    params = {p["parameter_name"] for p in api["named_endpoints"]["/face"]["parameters"]}
    assert {"image", "reference", "landmarks", "target_landmarks", "reference_landmarks", "groups", "face",
            "reference_face"} <= params and "mask" not in params
    Image.fromarray(PHOTO).save(tmp_path / "photo.png")
    targets = mouth_lowered(LANDMARKS)
    path, status = client.predict(image=handle_file(str(tmp_path / "photo.png")), landmarks=LANDMARKS.tolist(),
                                  target_landmarks=targets.tolist(), groups=["mouth"], num_inference_steps=2,
                                  max_resolution=128, api_name="/face")
    assert status.startswith("**face** done")
    got = np.asarray(Image.open(path).convert("RGB"))
    direct = tiny_pipe.reshape_face(PHOTO, landmarks=LANDMARKS, target_landmarks=targets, groups=("mouth",),
                                    num_inference_steps=2, max_resolution=128, progress=False)
    assert got.shape == PHOTO.shape and np.array_equal(got, np.asarray(direct.photo))
    assert not np.array_equal(got, PHOTO)
    with pytest.raises(Exception, match="reference: required"):
        client.predict(image=handle_file(str(tmp_path / "photo.png")), landmarks=LANDMARKS.tolist(),
                       num_inference_steps=2, max_resolution=128, api_name="/face")
