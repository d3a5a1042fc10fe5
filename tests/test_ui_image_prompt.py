"""The web UI's image-prompt controls (IP-Adapter): shown in every tab's Advanced settings and taken by every API
endpoint only when the pipeline has an adapter loaded (`dragondiff ui --ip-adapter`), and passed into the edit."""

import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, TINY_MODEL, make_scene, require
from dragondiff.tasks import TASKS

ADAPTER = DATA / "ip-adapter" / "ip_sd15_64.bin"
ENCODER = DATA / "ip-adapter" / "image_encoder"


def _require():
    require("the UI image-prompt test", ("gradio", "gradio_client"))


@pytest.fixture(scope="module")
def ip_pipe():
    from dragondiff import DragonPipeline

    pipe = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype=torch.float32)
    return pipe.load_ip_adapter(ADAPTER, ENCODER, allow_pickle=True)


def _components(app) -> dict:
    """elem_id -> props of the app's components that have one."""
    return {c["props"]["elem_id"]: c["props"] for c in app.config["components"] if c["props"].get("elem_id")}


def test_controls_only_with_an_adapter(ip_pipe, tiny_pipe):
    _require()
    from dragondiff.limits import LIMITS
    from dragondiff.ui.app import build_app

    shown = _components(build_app(ip_pipe, steps=2))
    ip = LIMITS["ip_scale"]
    for task, info in TASKS.items():
        if info.ui is None:
            continue
        scale = shown[f"{task}-ip-scale"]
        assert (scale["minimum"], scale["maximum"], scale["value"]) == (ip.low, ip.high, info.settings["ip_scale"])
        assert shown[f"{task}-ip"]["value"] == "preset"
    plain = _components(build_app(tiny_pipe, steps=2))
    assert "move-load" in plain and not any(name.endswith(("-ip", "-ip-scale")) for name in plain)


def test_scale_and_switch_reach_the_edit_through_the_api(ip_pipe, tmp_path, monkeypatch):
    _require()
    import tempfile

    from gradio_client import Client, handle_file

    from dragondiff.ui.app import launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "image.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(ip_pipe, port=port, steps=2, quiet=True, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        api = client.view_api(return_format="dict", print_info=False)
        for task in TASKS:
            params = {p["parameter_name"] for p in api["named_endpoints"][f"/{task}"]["parameters"]}
            assert {"image_prompt", "ip_scale"} <= params, task
        common = dict(image=handle_file(str(tmp_path / "image.png")), mask=handle_file(str(tmp_path / "mask.png")),
                      offset=[24, 0], prompt="a red disc", num_inference_steps=2, max_resolution=128,
                      api_name="/move")
        _, on = client.predict(image_prompt="on", ip_scale=0.35, **common)
        _, off = client.predict(image_prompt="off", ip_scale=0.5, **common)
        with pytest.raises(Exception, match=r"image_prompt: expected one of \[.preset., .on., .off.\], got .maybe."):
            client.predict(image_prompt="maybe", **common)
        # the edits' sidecars, before the server's shutdown removes them
        sidecars = sorted((tmp_path / "tmp").glob("dragondiff-ui-*/session-*/edit-*/result.json"))
        specs = [json.loads(p.read_text())["spec"] for p in sidecars]
    finally:
        app.close()
    assert "image prompt 0.35" in on and "image prompt" not in off
    assert [(s["image_prompt"], s["ip_scale"]) for s in specs] == [(True, 0.35), (False, 0.5)]
