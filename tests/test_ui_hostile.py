"""Hostile input to the web app's API, through `gradio_client` against a real server on the tiny model: file
parameters take only this server's uploads (no server path, link pointing out, `..`, other session's file or URL),
landmark fields take points (never a file name), bad values are refused by the parameter's name, and the server's
files (Gradio's uploads and cache included) go with the session and with the server."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import make_scene
from test_ui_api import _free_port, _require

REFUSED = "only files uploaded to this server are read"


@pytest.fixture(scope="module")
def server(tiny_pipe):
    _require()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from dragondiff.ui.app import launch

    port = _free_port()
    app = launch(tiny_pipe, port=port, steps=2, quiet=True, block=False)
    try:
        yield app, Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


@pytest.fixture
def raw_paths(monkeypatch):
    """gradio_client uploads every local file it is given; a path starting "RAW:" goes to the server as it is, as
    a hostile client sends it."""
    from gradio_client import client as gc

    upload = gc.Endpoint._upload_file

    def send(self, f, data_index):
        if f["path"].startswith("RAW:"):
            return {**f, "path": f["path"][4:]}
        return upload(self, f, data_index)

    monkeypatch.setattr(gc.Endpoint, "_upload_file", send)
    return lambda path: {"path": f"RAW:{path}", "meta": {"_type": "gradio.FileData"}}


@pytest.fixture
def files(tmp_path):
    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "image.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path


def _move(client, **kw):
    from gradio_client import handle_file

    args = dict(mask=handle_file(str(kw.pop("mask_file"))), offset=[4, 0], num_inference_steps=2,
                max_resolution=128)
    return client.predict(**{**args, **kw}, api_name="/move")


def test_file_parameters_take_only_this_servers_uploads(server, raw_paths, files):
    app, client = server
    cache = os.environ["GRADIO_TEMP_DIR"]  # this server's own upload folder
    assert cache.startswith(str(app.dragondiff_outputs.root))
    outside = files / "outside.png"
    Image.fromarray(make_scene()[0]).save(outside)
    os.makedirs(f"{cache}/planted", exist_ok=True)
    link = f"{cache}/planted/link.png"
    if not os.path.lexists(link):
        os.symlink(outside, link)  # a link in the upload folder pointing out
    other = app.dragondiff_outputs.session_folder("another-session") / "photo.png"
    Image.fromarray(make_scene()[0]).save(other)  # a file of another session's folder
    hostile = ["/etc/hostname", "/etc/no-such-file", str(outside), link, f"{cache}/planted/../../../etc/hostname",
               f"{cache}/../{other.parent.name}/photo.png", str(other), "https://example.com/photo.png",
               "file:///etc/hostname"]
    for path in hostile:
        with pytest.raises(Exception) as e:
            _move(client, image=raw_paths(path), mask_file=files / "mask.png")
        message = str(e.value)
        assert f"image: {REFUSED}" in message, (path, message)
        assert "hostname" not in message and "outside" not in message and "photo" not in message  # not echoed
    from gradio_client import handle_file

    with pytest.raises(Exception, match=f"mask: {REFUSED}"):  # every file parameter, not only the image
        client.predict(image=handle_file(str(files / "image.png")), mask=raw_paths("/etc/hostname"), offset=[4, 0],
                       api_name="/move")
    path, status = _move(client, image=handle_file(str(files / "image.png")), mask_file=files / "mask.png")
    assert status.startswith("**move** done")  # an upload still works


def test_the_same_message_whether_or_not_a_file_exists(server, raw_paths, files):
    _, client = server
    messages = []
    for path in ("/etc/hostname", "/etc/no-such-file-here"):
        with pytest.raises(Exception) as e:
            _move(client, image=raw_paths(path), mask_file=files / "mask.png")
        messages.append(str(e.value).replace(path, "P"))
    assert messages[0] == messages[1]


def test_landmarks_take_points_never_a_file(server, files):
    """A string in a landmark field is refused as a type, without reading it (the file's content never shows)."""
    from gradio_client import handle_file

    from test_face import LANDMARKS

    _, client = server
    secret = files / "secret.txt"
    secret.write_text("DUMMY_TOKEN=not-a-real-secret-123\n")
    Image.fromarray(make_scene()[0]).save(files / "photo.png")
    for field in ("landmarks", "target_landmarks", "reference_landmarks"):
        for value in (str(secret), "abc", {"file": str(secret)}, 5):
            kw = {"landmarks": LANDMARKS.tolist(), "target_landmarks": LANDMARKS.tolist(), field: value}
            with pytest.raises(Exception) as e:
                client.predict(image=handle_file(str(files / "photo.png")), **kw, num_inference_steps=2,
                               max_resolution=128, api_name="/face")
            message = str(e.value)
            assert f"{field}: expected a JSON list" in message, (field, value, message)
            assert "DUMMY_TOKEN" not in message and "not found" not in message


@pytest.mark.parametrize("name, value, expected", [
    ("num_inference_steps", -5, "num_inference_steps must be an integer in 1..1000, got -5"),
    ("max_resolution", 1e9, "max_resolution must be an integer in 64..2048, got 1000000000"),
    ("preset", "bogus", "preset must be one of"),
    ("seed", "abc", "seed must be an integer"),
    ("guidance_scale", 1e9, "guidance_scale must be a finite number in"),
    ("prompt", 5, "prompt"),
])
def test_bad_values_are_refused_by_name_without_a_traceback(server, files, capfd, name, value, expected):
    from gradio_client import handle_file

    _, client = server
    capfd.readouterr()
    with pytest.raises(Exception, match=expected):
        _move(client, image=handle_file(str(files / "image.png")), mask_file=files / "mask.png", **{name: value})
    assert "Traceback" not in capfd.readouterr().err


def test_face_groups_choice_is_named(server, files):
    from gradio_client import handle_file

    from test_face import LANDMARKS

    _, client = server
    Image.fromarray(make_scene()[0]).save(files / "photo.png")
    with pytest.raises(Exception, match="groups: unknown landmark group 'ears'"):
        client.predict(image=handle_file(str(files / "photo.png")), landmarks=LANDMARKS.tolist(),
                       target_landmarks=LANDMARKS.tolist(), groups=["ears"], num_inference_steps=2,
                       max_resolution=128, api_name="/face")


def test_a_pixel_bomb_is_refused_by_its_pixel_count(server, files):
    """A small PNG declaring 40000x40000 pixels: refused by the pixel limit (PIL's bomb guard fires first)."""
    import struct
    import zlib

    from gradio_client import handle_file

    _, client = server

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = files / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with pytest.raises(Exception, match=r"image: bomb.png is 1600.0 megapixels; accepted: .* 16 megapixels"):
        _move(client, image=handle_file(str(bomb)), mask_file=files / "mask.png")


def test_exif_orientation_is_applied_as_the_cli_does(tmp_path):
    """A JPEG stored sideways (orientation 6: turn 90 degrees clockwise) is read upright, as `load_image` does."""
    from dragondiff.inputs import load_image
    from dragondiff.ui.session import read_upload

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :8] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "side.jpg", exif=exif, quality=95)
    got = read_upload(tmp_path / "side.jpg")
    assert got.shape == (64, 32, 3)  # upright: turned
    assert got[:8].mean() > 200 and got[-8:].mean() < 50  # the band is now at the top
    assert np.array_equal(got, load_image(str(tmp_path / "side.jpg")))


def _files_under(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_gradio_cache_goes_with_the_session_and_the_server(tiny_pipe, files, monkeypatch):
    """Uploads and results in Gradio's cache: removed when the client's session ends, and everything at shutdown."""
    _require()
    import tempfile

    from gradio_client import Client, handle_file

    from dragondiff.ui.app import launch

    monkeypatch.setattr(tempfile, "tempdir", str(files / "tmp"))
    (files / "tmp").mkdir()
    port = _free_port()
    app = launch(tiny_pipe, port=port, steps=2, quiet=True, block=False)
    try:
        cache = app.dragondiff_outputs.cache_folder()
        # (the client's downloads go to a folder of their own: only the server's files are looked for)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(files / "downloads"))
        path, _ = _move(client, image=handle_file(str(files / "image.png")), mask_file=files / "mask.png")
        held = sorted(p.name for p in _files_under(cache))
        assert held == ["image.png", "image.png", "mask.png"]  # the uploads and the result
        client.close()  # the session ends (its heartbeat stops)
        deadline = time.time() + 20
        while _files_under(cache) and time.time() < deadline:
            time.sleep(0.3)
        assert not _files_under(cache)

        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(files / "downloads"))
        _move(client, image=handle_file(str(files / "image.png")), mask_file=files / "mask.png")
        assert _files_under(cache)
    finally:
        app.close()
    deadline = time.time() + 10
    while cache.exists() and time.time() < deadline:
        time.sleep(0.2)
    # nothing of the server is left, Gradio's folder included (what stays in tmp is gradio_client's, client-side)
    assert not cache.exists() and not list((files / "tmp").glob("dragondiff-ui-*"))
    assert os.environ.get("GRADIO_TEMP_DIR") != str(cache)
