"""The web app's API through `gradio_client` (what Gradio's "Use via API" page points users to), against the app
running in this process on the tiny model: one named endpoint per task taking the task's fields, nothing else."""

import os
import socket

import numpy as np
import pytest
from PIL import Image

from conftest import make_scene, require
from dragondiff.output import full_resolution
from dragondiff.tasks import TASKS


def _require():
    require("the API test", ("gradio", "gradio_client"))


@pytest.fixture(scope="module")
def client(tiny_pipe):
    _require()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from dragondiff.ui.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(tiny_pipe, steps=2)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
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
