"""The KServe predictor: a real kserve ModelServer on loopback, called over REST v1, REST v2 and gRPC
v2 with tritonclient (a standard Open Inference Protocol client), answering as TorchServe does."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from conftest import DEFAULT, photo
from tritonclient.utils import InferenceServerException

from devkit.corpus import CAT_CLASSES, bad_cases, odd_cases
from devkit.tslocal import KServeLocal

pytestmark = pytest.mark.server

CHELSEA = photo("chelsea.jpg")
B64 = base64.b64encode(CHELSEA).decode()
OPTIONS = {"topk": "3", "cam_classes": "top2", "outputs": "map,heatmap"}


@pytest.fixture(scope="module")
def kserve(model_store, tmp_path_factory):
    with KServeLocal(model_store / f"{DEFAULT}.mar", tmp_path_factory.mktemp("kserve")) as srv:
        yield srv


@pytest.fixture(scope="module")
def torchserve_answer(server):
    r = server.predict(DEFAULT, files={"image": ("chelsea.jpg", CHELSEA)}, data=OPTIONS)
    assert r.status_code == 200, r.text
    return r.json()


def _v1(kserve, *instances, headers=None) -> requests.Response:
    return requests.post(f"{kserve.url}/v1/models/{DEFAULT}:predict", json={"instances": list(instances)},
                         headers=headers, timeout=120)


def _same(answer: dict, want: dict) -> None:
    """The same predictions, maps within 1e-6, the same heatmaps, the same geometry."""
    assert answer["predictions"] == want["predictions"]
    assert [c["class_id"] for c in answer["cams"]] == [c["class_id"] for c in want["cams"]]
    for got, ref in zip(answer["cams"], want["cams"]):
        np.testing.assert_allclose(got["map"], ref["map"], atol=1e-6)
        assert got.get("heatmap") == ref.get("heatmap")
    for key in ("model", "target_layer", "image_size", "grid_size", "grid_box", "frame_size"):
        assert answer[key] == want[key], key


def test_v1_answers_as_torchserve_does(kserve, torchserve_answer):
    r = _v1(kserve, {"image": B64, **OPTIONS})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    (answer,) = r.json()["predictions"]
    assert answer["predictions"][0]["class_id"] in CAT_CLASSES
    _same(answer, torchserve_answer)
    # KServe v1's {"b64": ...} form of bytes, and options as headers as on TorchServe
    r = _v1(kserve, {"image": {"b64": B64}}, headers={"topk": "3", "cam_classes": "top2", "outputs": "map,heatmap"})
    _same(r.json()["predictions"][0], torchserve_answer)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_rest_with_tritonclient_answers_as_torchserve_does(kserve, torchserve_answer, binary):
    client = triton_http.InferenceServerClient(kserve.url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready(DEFAULT)
    image = triton_http.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([CHELSEA if binary else B64.encode()], dtype=object), binary_data=binary)
    result = client.infer(DEFAULT, [image], request_id="r-1", parameters=OPTIONS)
    assert result.get_response()["id"] == "r-1"
    (text,) = result.as_numpy("image")
    _same(json.loads(text), torchserve_answer)


def test_v2_grpc_with_tritonclient_answers_as_torchserve_does(kserve, torchserve_answer):
    client = triton_grpc.InferenceServerClient(kserve.grpc_address)
    assert client.is_server_ready() and client.is_model_ready(DEFAULT)
    inputs = []
    for name, value in {"image": CHELSEA, **{k: v.encode() for k, v in OPTIONS.items()}}.items():
        tensor = triton_grpc.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=object))
        inputs.append(tensor)
    result = client.infer(DEFAULT, inputs, request_id="g-1")
    (text,) = result.as_numpy("image")
    _same(json.loads(text), torchserve_answer)
    bad = triton_grpc.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image at all"], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer(DEFAULT, [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert json.loads(info.value.message())["status"] == 415


def test_metadata_health_and_metrics(kserve):
    assert requests.get(f"{kserve.url}/v2/health/ready", timeout=5).json() == {"ready": True}
    assert requests.get(f"{kserve.url}/v2/health/live", timeout=5).status_code == 200
    meta = requests.get(f"{kserve.url}/v2/models/{DEFAULT}", timeout=5).json()
    assert meta["name"] == DEFAULT
    assert [i["name"] for i in meta["inputs"]] == ["image", "topk", "cam_classes", "cam_method", "outputs", "quality"]
    assert requests.get(f"{kserve.url}/v1/models/{DEFAULT}", timeout=5).json()["ready"] is True
    assert _v1(kserve, {"image": B64}).status_code == 200
    assert _v1(kserve, {"image": B64, "topk": 0}).status_code == 400
    text = requests.get(f"{kserve.url}/metrics", timeout=5).text
    assert f'GradcamBatches_total{{BatchSize="1",Level="Model",ModelName="{DEFAULT}"}}' in text
    assert f'GradcamRejected_total{{Level="Model",ModelName="{DEFAULT}",Reason="invalid_option"}}' in text
    assert "request_predict_seconds" in text  # kserve's own
    # The faithfulness score's histogram, by model and method (tests/test_quality.py: TorchServe's).
    scored = _v1(kserve, {"image": B64, "quality": True, "cam_method": "xgradcam"})
    assert scored.status_code == 200 and "quality" in scored.json()["predictions"][0]["cams"][0]
    text = requests.get(f"{kserve.url}/metrics", timeout=5).text
    assert f'GradcamQualityDrop_count{{Level="Model",Method="xgradcam",ModelName="{DEFAULT}"}} 1.0' in text


def test_listens_on_loopback_only(kserve):
    addresses = {c.laddr for c in psutil.Process(kserve.proc.pid).connections("inet") if c.status == "LISTEN"}
    assert {a.port for a in addresses} == {kserve.http_port, kserve.grpc_port}
    # gRPC's socket is dual-stack: 127.0.0.1 shows as ::ffff:127.0.0.1
    assert {a.ip.removeprefix("::ffff:") for a in addresses} == {"127.0.0.1"}


def test_concurrent_good_and_bad_requests_share_a_batch_each_with_its_own_status(kserve):
    def infer(i: int):
        image = B64 if i % 3 else base64.b64encode(b"garbage" * 20).decode()
        doc = {"id": f"m-{i}", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}
        return requests.post(f"{kserve.url}/v2/models/{DEFAULT}/infer", json=doc, timeout=120)

    for _ in range(3):  # batching depends on arrival: a few rounds until two requests met
        results: dict[int, requests.Response] = {}
        threads = [threading.Thread(target=lambda i=i, out=results: out.__setitem__(i, infer(i))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = []
        for i, r in results.items():
            body = r.json()
            assert body["id"] == f"m-{i}"
            answer = json.loads(body["outputs"][0]["data"][0])
            if i % 3:
                assert r.status_code == 200 and answer["predictions"][0]["class_id"] in CAT_CLASSES
            else:
                assert r.status_code == 415 and answer["error"] == "unsupported_media" and body["error"]
            sizes.append(answer["batch_size"])
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, sizes


def _instance(case) -> tuple[dict | list, dict]:
    """A corpus case (TorchServe's request forms) as a v1 instance and the headers it carries."""
    kwargs = case.kwargs
    if "files" in kwargs:
        return {"image": base64.b64encode(kwargs["files"]["image"][1]).decode(), **kwargs.get("data", {})}, {}
    if "json" in kwargs:
        return kwargs["json"], {}
    data = kwargs["data"]
    data = data.encode() if isinstance(data, str) else data
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "content-type"}
    return {"image": base64.b64encode(data).decode()}, headers


CASES = [c for c in bad_cases(25165824) + odd_cases() if c.field is not None or c.status == 200]
# A raw text body becomes an instance whose image is that text: not an image format.
V1_STATUS = {"text body": 415}


def test_the_hostile_corpus_gets_its_statuses_alone_and_mixed_and_the_server_stays_up(kserve):
    for case in CASES:
        instance, headers = _instance(case)
        r = _v1(kserve, instance, headers=headers)
        status = V1_STATUS.get(case.name, case.status)
        assert r.status_code == status, (case.name, r.status_code, r.text[:300])
        (answer,) = r.json()["predictions"]
        if status == 200:
            assert list(answer["image_size"]) == list(case.image_size), case.name
            if case.cat:
                assert answer["predictions"][0]["class_id"] in CAT_CLASSES, case.name
        else:
            assert answer["status"] == status and answer["message"], (case.name, answer)
    # All of them in one request: each instance its own answer, in order.
    plain = [c for c in CASES if not _instance(c)[1]]
    r = _v1(kserve, *(_instance(c)[0] for c in plain[:8]))
    answers = r.json()["predictions"]
    assert [a.get("status", 200) for a in answers] == [V1_STATUS.get(c.name, c.status) for c in plain[:8]]
    assert requests.get(f"{kserve.url}/v2/health/ready", timeout=5).json() == {"ready": True}
    assert _v1(kserve, {"image": B64}).status_code == 200


def test_sigterm_finishes_the_requests_in_flight(model_store, tmp_path):
    srv = KServeLocal(model_store / f"{DEFAULT}.mar", tmp_path).start()
    statuses: list[int | str] = []

    def call():
        try:
            statuses.append(_v1(srv, {"image": B64, "outputs": "map,overlay"}).status_code)
        except requests.RequestException as exc:
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # SIGTERM once the requests are in (the server has accepted them)
    while time.monotonic() < deadline and len(
            [c for c in psutil.Process(srv.proc.pid).connections("inet")
             if c.status == "ESTABLISHED" and c.laddr.port == srv.http_port]) < 12:
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert statuses == [200] * 12, statuses
    assert srv.proc.wait(60) is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{srv.url}/v2/health/ready", timeout=2)
