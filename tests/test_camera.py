"""Camera photos with the default pretrained model, through a real TorchServe.

A 12 MP photo (decoded at the DCT scale it needs) is answered as the same scene at web size;
progressive, EXIF-rotated and CMYK versions of it as the plain one; the answer stays in the
photo's own frame. Photos from devkit/camera_photos.py, made from tests/data/chelsea.jpg. And,
in-process, the scaled decode predicts as the full decode on 12 MP versions of every test photo.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CAT_CLASSES, DEFAULT, ROOT
from PIL import Image

from devkit.camera_photos import DATA, camera_pixels, camera_set, jpeg
from handler.images import decode_image, decode_pixels, image_pixels, open_image
from handler.limits import RequestLimits

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def camera(tmp_path_factory) -> dict:
    return camera_set(tmp_path_factory.mktemp("camera"))


@pytest.fixture(scope="module")
def answers(server, camera) -> dict[str, dict]:
    out = {}
    for name, path in camera.items():
        r = server.predict(DEFAULT, files={"image": (path.name, path.read_bytes())},
                           data={"cam_classes": "top1", "outputs": "map,heatmap,overlay"})
        assert r.status_code == 200, (name, r.text[:300])
        out[name] = r.json()
    return out


def _correlation(a: list, b: list) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_a_12mp_photo_answers_as_the_same_photo_at_web_size(answers):
    small, camera = answers["small"], answers["camera"]
    assert small["image_size"] == [640, 320] and camera["image_size"] == [4032, 2016]
    assert camera["predictions"][0]["class_id"] == small["predictions"][0]["class_id"]
    assert camera["predictions"][0]["class_id"] in CAT_CLASSES
    assert abs(camera["predictions"][0]["probability"] - small["predictions"][0]["probability"]) < 0.1
    assert _correlation(camera["cams"][0]["map"], small["cams"][0]["map"]) >= 0.95


@pytest.mark.parametrize("name", ["camera_progressive", "camera_rotated", "camera_cmyk"])
def test_progressive_rotated_and_cmyk_camera_photos_answer_as_the_plain_one(answers, name):
    plain, other = answers["camera"], answers[name]
    assert other["image_size"] == plain["image_size"] == [4032, 2016]
    assert other["frame_size"] == plain["frame_size"] == [512, 256]
    assert other["predictions"][0]["class_id"] == plain["predictions"][0]["class_id"]
    assert abs(other["predictions"][0]["probability"] - plain["predictions"][0]["probability"]) < 0.05
    assert _correlation(other["cams"][0]["map"], plain["cams"][0]["map"]) >= 0.98


def test_pictures_of_a_camera_photo_are_in_its_own_frame(answers):
    for name in ("camera", "camera_rotated", "camera_43"):
        body = answers[name]
        width, height = body["image_size"]
        assert body["frame_size"] == [512, round(512 * height / width)], name
        cam = body["cams"][0]
        heat = Image.open(io.BytesIO(base64.b64decode(cam["heatmap"])))
        overlay = Image.open(io.BytesIO(base64.b64decode(cam["overlay"])))
        assert heat.size == overlay.size == tuple(body["frame_size"]), name
    # The hottest pixel of the 12 MP photo's heatmap is where the web-sized photo's is (same scene).
    spots = {}
    for name in ("small", "camera", "camera_rotated"):
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(answers[name]["cams"][0]["heatmap"]))), float)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        spots[name] = (x / heat.shape[1], y / heat.shape[0])
    for name in ("camera", "camera_rotated"):
        assert np.hypot(*np.subtract(spots[name], spots["small"])) < 0.1, spots


@pytest.fixture(scope="module")
def lite0():
    """The default model with its pretrained weights, in-process."""
    from handler.models import build_model, load_state_dict_strict
    from handler.tools.archive import DEFAULT_MODEL, PACKAGE_WEIGHTS, map_by_order, read_state_dict

    model = build_model(DEFAULT_MODEL, 1000, {})
    load_state_dict_strict(model, map_by_order(read_state_dict(PACKAGE_WEIGHTS, DEFAULT_MODEL), model))
    return model.eval()


@pytest.mark.parametrize("name", ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"])
def test_the_scaled_decode_predicts_as_the_full_decode(lite0, name):
    """12 MP versions of the test photos: the model input decoded at 1/8 scale and decoded in full
    are within a grey level or two and give the same top-1 with close probabilities."""
    data = jpeg(camera_pixels(Image.open(DATA / name), (4032, 3024)))
    bicubic = Image.Resampling.BICUBIC
    fast = decode_pixels(open_image(data, RequestLimits()), (224, 224))
    assert fast.pixels.size == (504, 378)
    full = decode_image(data, RequestLimits())
    pixels = np.stack([fast.resized((224, 224), bicubic), image_pixels(full, (224, 224), bicubic)])
    assert np.abs(pixels[0].astype(int) - pixels[1]).mean() < 1.5
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        probs = lite0(x).softmax(dim=1)
    assert int(probs[0].argmax()) == int(probs[1].argmax())
    assert abs(float(probs[0].max()) - float(probs[1].max())) < 0.03


def test_the_load_test_sends_camera_photos(server, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load" / "loadtest.py"), "--camera", "--url", server.url,
         "--metrics-url", "",
         "--token", server.token, "--model", DEFAULT, "-u", "2", "--duration", "180", "--max-requests", "4", "-q",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == ["camera.jpg", "camera_progressive.jpg", "camera_rotated.jpg", "camera_43.jpg"]
    assert report["requests"] >= 1 and report["failures"] == 0 and report["errors_by_status"] == {}
