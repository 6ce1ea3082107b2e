"""End to end through a real TorchServe on loopback, with the default pretrained model."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import CAT_CLASSES, DEFAULT, peak, photo
from PIL import Image

pytestmark = pytest.mark.server


def _alone(server, image: bytes, **fields) -> dict:
    r = server.predict(DEFAULT, files={"image": ("x.jpg", image)}, data=fields)
    assert r.status_code == 200, r.text
    return r.json()


def test_cat_is_a_cat_and_its_map_peaks_on_the_cat(server):
    r = server.predict(DEFAULT, files={"image": ("cat.jpg", photo("chelsea.jpg"))},
                       data={"outputs": "map,heatmap,overlay"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    top = body["predictions"]
    assert len(top) == 5
    assert top[0]["class_id"] in CAT_CLASSES
    assert top[0]["label"] == "Egyptian cat"
    assert top[0]["probability"] > 0.5
    assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
    (cam,) = body["cams"]
    assert cam["class_id"] == top[0]["class_id"] and cam["method"] == "gradcam"
    grid = np.array(cam["map"])
    assert grid.shape == (7, 7) and grid.min() == 0.0 and grid.max() == 1.0
    assert body["grid_size"] == [7, 7] and body["image_size"] == [451, 300]
    # The heatmap is in the photo's own frame; its hottest pixel lies on the cat's face.
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(cam["heatmap"]))))
    assert heat.shape == (300, 451) and heat.dtype == np.uint8
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 100 <= x <= 380 and 40 <= y <= 260, (x, y)
    # The grid peak, mapped through grid_size onto the image, lands in the same place.
    row, col = peak(cam["map"])
    assert 100 <= (col + 0.5) * 451 / 7 <= 380 and 40 <= (row + 0.5) * 300 / 7 <= 260
    overlay = Image.open(io.BytesIO(base64.b64decode(cam["overlay"])))
    assert overlay.format == "JPEG" and overlay.size == (451, 300) and overlay.mode == "RGB"


def test_every_input_form_gives_the_same_answer(server):
    image = photo("coffee.jpg")
    want = _alone(server, image, topk="3")
    raw_put = requests.put(f"{server.url}/predictions/{DEFAULT}", data=image,
                           headers={**server.auth(), "topk": "3"}, timeout=60)
    raw_post = server.predict(DEFAULT, data=image, headers={"Content-Type": "image/jpeg", "TopK": "3"})
    as_json = server.predict(DEFAULT, json={"image": base64.b64encode(image).decode(), "topk": 3})
    for r in (raw_put, raw_post, as_json):
        assert r.status_code == 200, r.text
        body = r.json()
        assert [p["class_id"] for p in body["predictions"]] == [p["class_id"] for p in want["predictions"]]
        assert body["predictions"][0]["label"] == "espresso"
        np.testing.assert_allclose(body["cams"][0]["map"], want["cams"][0]["map"], atol=2e-3)


def test_options_select_classes_methods_and_forms(server):
    body = _alone(server, photo("chelsea.jpg"), topk="2", cam_classes="281,Egyptian cat",
                  cam_method="gradcam++", outputs="heatmap")
    assert len(body["predictions"]) == 2
    assert [c["class_id"] for c in body["cams"]] == [281, 285]
    assert [c["label"] for c in body["cams"]] == ["tabby, tabby cat", "Egyptian cat"]
    assert all(c["method"] == "gradcam++" and "map" not in c and "heatmap" in c for c in body["cams"])
    none = _alone(server, photo("chelsea.jpg"), cam_classes="none")
    assert none["cams"] == [] and none["predictions"][0]["class_id"] == 285


def test_sixteen_concurrent_requests_batch_and_match_their_single_answers(server):
    names = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]
    alone = {n: _alone(server, photo(n)) for n in names}
    order = [names[i % 3] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda n: server.predict(DEFAULT, files={"image": (n, photo(n))}), order))
    assert [r.status_code for r in answers] == [200] * 16
    sizes = [r.json()["batch_size"] for r in answers]
    assert max(sizes) > 1, sizes
    for name, r in zip(order, answers):
        got, want = r.json(), alone[name]
        assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in want["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in got["predictions"]],
                                   [p["probability"] for p in want["predictions"]], atol=1e-4)
        np.testing.assert_allclose(got["cams"][0]["map"], want["cams"][0]["map"], atol=2e-3)


def test_a_broken_request_fails_alone_inside_its_batch(server):
    good = photo("chelsea.jpg")
    broken = good[: len(good) // 3]  # truncated JPEG
    for _ in range(5):  # until the broken one shares a batch with good ones
        payloads = [good] * 7 + [broken] + [good] * 7
        with ThreadPoolExecutor(15) as pool:
            answers = list(pool.map(
                lambda b: server.predict(DEFAULT, files={"image": ("x.jpg", b)}), payloads))
        codes = [r.status_code for r in answers]
        assert codes == [200] * 7 + [400] + [200] * 7, codes
        error = answers[7].json()
        assert error["error"] == "invalid_input" and error["field"] == "image"
        assert all(r.json()["predictions"][0]["class_id"] == 285 for i, r in enumerate(answers) if i != 7)
        if error["batch_size"] > 1:
            break
    else:
        pytest.fail("the broken request never shared a batch with good ones")


def test_explanations_endpoint_answers_with_the_same_maps(server):
    want = _alone(server, photo("chelsea.jpg"))
    r = server.predict(DEFAULT, explain=True, files={"image": ("x.jpg", photo("chelsea.jpg"))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"][0]["class_id"] == 285
    np.testing.assert_allclose(body["cams"][0]["map"], want["cams"][0]["map"], atol=2e-3)


def test_bad_requests_get_json_errors_naming_the_field(server):
    cases = [
        ({"files": {"image": ("x.jpg", photo("chelsea.jpg"))}, "data": {"topk": "0"}}, 400, "topk"),
        ({"files": {"image": ("x.jpg", photo("chelsea.jpg"))}, "data": {"cam_method": "magic"}}, 400,
         "cam_method"),
        ({"files": {"image": ("x.jpg", photo("chelsea.jpg"))}, "data": {"outputs": "video"}}, 400, "outputs"),
        ({"files": {"image": ("x.jpg", photo("chelsea.jpg"))}, "data": {"colour": "red"}}, 400, "colour"),
        ({"json": {"image": "not base64 !!"}}, 400, "image"),
        ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 400, "body"),
    ]
    for kwargs, status, field in cases:
        r = server.predict(DEFAULT, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.json()["field"] == field


def test_requests_without_the_token_are_refused(server):
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException.
    for headers in ({}, {"Authorization": "Bearer wrong"}, server.auth(management=True)):
        r = requests.post(f"{server.url}/predictions/{DEFAULT}", data=photo("chelsea.jpg"),
                          headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException", r.text
    assert requests.get(f"{server.url}/ping", timeout=30).status_code == 400
    assert json.loads(requests.get(f"{server.url}/ping", headers=server.auth(), timeout=30).text)["status"] \
        == "Healthy"


def _metric_rows(server, name: str) -> list[tuple[dict, float]]:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    rows = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("}", 1)
            pairs = dict(p.split("=", 1) for p in labels.rstrip(",").split(","))
            rows.append(({k: v.strip('"') for k, v in pairs.items()}, float(value)))
    return rows


def test_handler_metrics_reach_the_prometheus_endpoint(server):
    def batches_seen() -> float:
        return sum(int(labels["BatchSize"]) * count
                   for labels, count in _metric_rows(server, "GradcamBatches")
                   if labels["ModelName"] == DEFAULT)

    before = batches_seen()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: server.predict(
            DEFAULT, files={"image": ("x.jpg", photo("chelsea.jpg"))}, data={"topk": "0" if i == 5 else "3"}),
            range(16)))
    assert sorted(r.status_code for r in answers) == [200] * 15 + [400]
    # Every request counted once, in the batch it ran in (the frontend reads worker metrics
    # from the worker's log stream, so give it a moment).
    deadline = time.monotonic() + 60  # a poll: returns as soon as they are seen
    while batches_seen() - before < 16 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert batches_seen() - before == 16
    sizes = {int(labels["BatchSize"]) for labels, _ in _metric_rows(server, "GradcamBatches")}
    assert max(sizes) > 1 and sizes <= set(range(1, 9))
    rejected = {labels["Reason"]: n for labels, n in _metric_rows(server, "GradcamRejected")
                if labels["ModelName"] == DEFAULT}
    assert rejected.get("invalid_option", 0) >= 1
    assert any(n >= 15 for labels, n in _metric_rows(server, "GradcamMaps") if labels["ModelName"] == DEFAULT)
    for gauge in ("GradcamBatchSize", "GradcamDecodeTime", "GradcamPassTime", "GradcamRenderTime"):
        assert [v for labels, v in _metric_rows(server, gauge) if labels["ModelName"] == DEFAULT], gauge
