"""Hostile and odd input, bounded responses and access rules, against a real TorchServe."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import DEFAULT, ROOT, peak
from PIL import Image

from devkit.corpus import CAT_CLASSES, Case, bad_cases, good_request, odd_cases

pytestmark = pytest.mark.server

MAX_REQUEST = 25165824
CASES = bad_cases(MAX_REQUEST) + odd_cases()


@pytest.fixture(scope="module")
def baseline(server):
    r = server.predict(DEFAULT, **good_request())
    assert r.status_code == 200
    return {"answer": r.json(), "pids": server.worker_pids(DEFAULT)}


def _check(case: Case, r: requests.Response, baseline: dict) -> None:
    assert r.status_code == case.status, (case.name, r.status_code, r.text[:300])
    if case.status != 200:
        if case.field is not None:  # the handler's own JSON error
            assert r.headers["Content-Type"].startswith("application/json")
            body = r.json()
            assert body["field"] == case.field and body["status"] == case.status, (case.name, body)
            assert body["message"]
        return
    body = r.json()
    assert list(body["image_size"]) == list(case.image_size)
    assert len(body["predictions"]) == case.extra.get("topk", 5)
    assert body["cams"] and len(body["cams"][0]["map"]) == 7
    if case.cat:
        assert body["predictions"][0]["class_id"] in CAT_CLASSES, (case.name, body["predictions"][:2])
    for cam in body["cams"]:
        for form, fmt in (("heatmap", "PNG"), ("overlay", "JPEG")):
            if form in cam:
                picture = Image.open(io.BytesIO(base64.b64decode(cam[form])))
                assert picture.format == fmt
                assert picture.size == tuple(body["frame_size"])
    if case.name == "exif rotated jpeg":  # the displayed frame: the same map as the upright photo
        assert peak(body["cams"][0]["map"]) == peak(baseline["answer"]["cams"][0]["map"])
        np.testing.assert_allclose(body["cams"][0]["map"], baseline["answer"]["cams"][0]["map"], atol=0.08)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_alone(server, baseline, case):
    _check(case, server.predict(DEFAULT, **case.kwargs), baseline)


def test_every_case_mixed_into_a_batch_of_good_images(server, baseline):
    """Bad and odd requests, three at a time, sent together with three good ones: each gets its
    own answer and the good ones are answered as if alone."""
    want = baseline["answer"]
    shared = 0
    for start in range(0, len(CASES), 3):
        group = CASES[start:start + 3]
        calls = [good_request(), *(case.kwargs for case in group), good_request(), good_request()]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda kw: server.predict(DEFAULT, **kw), calls))
        good = [answers[0], *answers[-2:]]
        for case, r in zip(group, answers[1:-2], strict=True):
            _check(case, r, baseline)
            if case.field is not None:
                shared += r.json()["batch_size"] > 1
        for r in good:
            assert r.status_code == 200, ([c.name for c in group], r.text[:300])
            got = r.json()
            assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in want["predictions"]]
            np.testing.assert_allclose(got["cams"][0]["map"], want["cams"][0]["map"], atol=2e-3)
    with_field = sum(case.field is not None for case in CASES)
    assert shared >= with_field // 3, "bad requests rarely shared a batch: batching is not exercised"
    assert server.worker_pids(DEFAULT) == baseline["pids"], "the worker restarted"


def test_the_largest_response_any_options_give_fits_the_limits(server):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=95)
    r = server.predict(DEFAULT, files={"image": ("noise.jpg", buf.getvalue())},
                       data={"topk": "1000", "cam_classes": "top5", "outputs": "map,heatmap,overlay"})
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert len(body["predictions"]) == 1000 and len(body["cams"]) == 5
    assert body["frame_size"] == [512, 384]
    assert len(r.content) < 16 * 1024 * 1024 < MAX_REQUEST  # handler cap < server's max_response_size


def test_shipped_config_keeps_everything_on_loopback_and_locked():
    props = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                 if line and not line.startswith("#"))
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == "file://.*"
    assert "disable_token_authorization" not in props
    assert int(props["max_response_size"]) > 16 * 1024 * 1024


def test_management_needs_its_token_and_cannot_register_models(server):
    assert requests.get(f"{server.management_url}/models", timeout=30).status_code == 400
    assert requests.get(f"{server.management_url}/models", headers=server.auth(), timeout=30).status_code == 400
    listed = requests.get(f"{server.management_url}/models", headers=server.auth(True), timeout=30)
    assert listed.status_code == 200
    assert DEFAULT in {m["modelName"] for m in listed.json()["models"]}
    for url in ("https://example.com/evil.mar", "file:///tmp/evil.mar"):
        r = requests.post(f"{server.management_url}/models", params={"url": url},
                          headers=server.auth(True), timeout=30)
        assert r.status_code in (400, 403, 405), (url, r.status_code, r.text)
        assert "ModelAPI" in r.text or "not enabled" in r.text.lower() or "allowed" in r.text.lower(), r.text
    r = requests.delete(f"{server.management_url}/models/{DEFAULT}", headers=server.auth(True), timeout=30)
    assert r.status_code in (400, 403, 405), r.text
    assert server.worker_status(DEFAULT) == "READY"
