"""Compatibility matrix, protocol rows: TorchServe's gRPC API and KServe's v2 (Open Inference
Protocol) against real servers on loopback, each answer compared with the HTTP one."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from conftest import DEFAULT, ROOT, photo, run_archiver
from tritonclient.utils import InferenceServerException

from devkit.tslocal import LocalServer, free_port
from handler.tools.grpc_client import ClientError, connect, infer_v2, load_stubs, predict

pytestmark = pytest.mark.server

CHELSEA = photo("chelsea.jpg")
OPTIONS = {"topk": "3", "cam_classes": "281,Egyptian cat", "cam_method": "gradcam++", "outputs": "map,heatmap"}
SINGLE = "lite0_b1"  # the default model archived with --batch-size 1, for the kservev2 envelope


@pytest.fixture(scope="module")
def stubs():
    return load_stubs()


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    """The project's config plus KServe's v2 gRPC service (REST v2 needs no setting)."""
    with LocalServer(model_store, [f"{DEFAULT}.mar"], tmp_path_factory.mktemp("protocols"),
                     overrides={"ts_open_inference_protocol": "true"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def envelope_server(tmp_path_factory):
    """service_envelope=kservev2, as KServe's TorchServe runtime configures it, serving the default
    model archived with --batch-size 1 (the envelope answers a batch once: tests/test_oip.py)."""
    store = tmp_path_factory.mktemp("envelope_store")
    run_archiver("-q", "--export-path", str(store), "--name", SINGLE, "--batch-size", "1", check=True)
    overrides = {"service_envelope": "kservev2", "ts_open_inference_protocol": "true"}
    with LocalServer(store, [f"{SINGLE}.mar"], tmp_path_factory.mktemp("envelope"), overrides=overrides) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(server) -> dict:
    """The HTTP answers the other protocols must match: default options, and OPTIONS."""
    answers = {}
    for name, fields in (("default", {}), ("options", OPTIONS)):
        r = server.predict(DEFAULT, files={"image": ("chelsea.jpg", CHELSEA)}, data=fields)
        assert r.status_code == 200, r.text
        answers[name] = r.json()
    assert [c["class_id"] for c in answers["options"]["cams"]] == [281, 285]
    return answers


def _same(got: dict, want: dict) -> None:
    """Same predictions, CAM targets, maps and geometry (batching moves floats a little)."""
    assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in want["predictions"]]
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    np.testing.assert_allclose([p["probability"] for p in got["predictions"]],
                               [p["probability"] for p in want["predictions"]], atol=1e-4)
    assert [(c["class_id"], c["method"], sorted(c)) for c in got["cams"]] == \
        [(c["class_id"], c["method"], sorted(c)) for c in want["cams"]]
    for g, w in zip(got["cams"], want["cams"]):
        np.testing.assert_allclose(g["map"], w["map"], atol=2e-3)
    for key in ("image_size", "grid_size", "grid_box", "frame_size", "model", "target_layer"):
        assert got[key] == want[key], key


def _http_error(server, fields: dict, image: bytes = CHELSEA) -> tuple[int, dict]:
    r = server.predict(DEFAULT, files={"image": ("x.jpg", image)}, data=fields)
    return r.status_code, r.json()


def _without_batch(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "batch_size"}


# ---------------------------------------------------------------------- TorchServe's gRPC API


def test_grpc_answers_with_the_http_json_and_honours_the_options(server, stubs, reference):
    with connect(server.grpc_address) as channel:
        default = predict(stubs, channel, DEFAULT, CHELSEA, {}, server.token)
        chosen = predict(stubs, channel, DEFAULT, CHELSEA, OPTIONS, server.token)
        # The input map reaches the handler as one request item: a lone "data" entry is a raw body.
        raw = stubs.inference_grpc.InferenceAPIsServiceStub(channel).Predictions(
            stubs.inference.PredictionsRequest(model_name=DEFAULT, input={"data": CHELSEA}),
            metadata=[("authorization", f"Bearer {server.token}")], timeout=60)
    assert default.error is None and chosen.error is None
    assert default.body["predictions"][0]["label"] == "Egyptian cat" and len(default.body["predictions"]) == 5
    _same(default.body, reference["default"])
    _same(json.loads(raw.prediction), reference["default"])
    assert len(chosen.body["predictions"]) == 3
    assert all(c["method"] == "gradcam++" and "heatmap" in c for c in chosen.body["cams"])
    _same(chosen.body, reference["options"])


def test_grpc_refuses_a_missing_or_wrong_token(server, stubs):
    with connect(server.grpc_address) as channel:
        for token in (None, "wrong", server.management_token):
            with pytest.raises(ClientError, match="refused the token: Token Authorization failed"):
                predict(stubs, channel, DEFAULT, CHELSEA, {}, token)
        raw_stub = stubs.inference_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            raw_stub.Predictions(stubs.inference.PredictionsRequest(model_name=DEFAULT, input={"data": CHELSEA}))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_bad_input_over_grpc_gets_the_http_error_json_and_the_worker_keeps_serving(server, stubs):
    """TorchServe 0.12's gRPC Predictions drops the handler's status code (GRPCJob.response):
    the call is OK and the error JSON, with its status, is the answer."""
    pids = server.worker_pids(DEFAULT)
    cases = [({"topk": "0"}, CHELSEA), ({"colour": "red"}, CHELSEA), ({"cam_classes": "unicorn"}, CHELSEA),
             ({}, CHELSEA[: len(CHELSEA) // 3]), ({}, b"hello")]
    with connect(server.grpc_address) as channel:
        for fields, image in cases:
            status, want = _http_error(server, fields, image)
            got = predict(stubs, channel, DEFAULT, image, fields, server.token)
            assert status in (400, 415) and got.body["status"] == status, (fields, got.text)
            assert _without_batch(got.body) == _without_batch(want)
            assert got.error.startswith(f"{status} {want['error']}")
        after = predict(stubs, channel, DEFAULT, CHELSEA, {"topk": "1"}, server.token)
    assert after.error is None and after.body["predictions"][0]["class_id"] == 285
    assert server.worker_pids(DEFAULT) == pids


def _client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "handler.tools.grpc_client", *args],
                          capture_output=True, text=True, timeout=120)


def test_grpc_client_prints_the_answer_and_fails_with_one_clear_line(server, reference):
    base = ["--address", server.grpc_address, "--model", DEFAULT]
    options = [arg for name, value in OPTIONS.items() for arg in ("--option", f"{name}={value}")]
    ok = _client(*base, "--token", server.token, *options, str(ROOT / "tests/data/chelsea.jpg"))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    _same(json.loads(ok.stdout), reference["options"])
    v2 = _client(*base, "--token", server.token, "--protocol", "v2", str(ROOT / "tests/data/chelsea.jpg"))
    assert v2.returncode == 0, v2.stderr
    _same(json.loads(v2.stdout), reference["default"])
    failures = [
        ((*base, "--token", server.token, "--option", "topk=0"), 1,
         "the server answered 400 invalid_option (field topk): topk must be between 1 and 1000, got 0"),
        ((*base, "--token", ""), 1, "the server refused the token"),
        (("--address", f"127.0.0.1:{free_port()}", "--token", "x"), 3, "cannot reach TorchServe's gRPC inference API"),
        ((*base, "--token", server.token, "--model", "nope"), 1, "INTERNAL: Model not found: nope"),
    ]
    for args, code, message in failures:
        done = _client(*args, str(ROOT / "tests/data/chelsea.jpg"))
        assert done.returncode == code, (args, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith("grpc_client: ") and message in line, line
        if "invalid_option" in message:  # the handler's error JSON is the answer, on stdout
            assert json.loads(done.stdout)["field"] == "topk"


# ---------------------------------------------------------------------- KServe v2, no envelope


def _triton_image(binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput("image", [1], "BYTES")
    element = CHELSEA if binary else base64.b64encode(CHELSEA)  # JSON carries BYTES as base64 text
    tensor.set_data_from_numpy(np.array([element], dtype=np.object_), binary_data=binary)
    return tensor


def _triton_answer(result) -> dict:
    (text,) = result.as_numpy("image")
    return json.loads(text)


def test_v2_rest_with_tritonclient_answers_like_http(server, reference):
    client = triton_http.InferenceServerClient(server.url.split("//")[1])
    auth = {"Authorization": f"Bearer {server.token}"}
    for binary in (False, True):  # JSON with base64, and tritonclient's default binary tensor form
        result = client.infer(DEFAULT, [_triton_image(binary)], headers=dict(auth), parameters=OPTIONS,
                              request_id="req-7")
        assert result.get_response()["id"] == "req-7" and result.get_response()["model_name"] == DEFAULT
        _same(_triton_answer(result), reference["options"])
    result = client.infer(DEFAULT, [_triton_image(False)], headers=dict(auth))
    _same(_triton_answer(result), reference["default"])
    with pytest.raises(InferenceServerException) as caught:
        client.infer(DEFAULT, [_triton_image(False)], headers=dict(auth), parameters={"topk": 0})
    assert caught.value.status() == "400" and caught.value.message() == "topk must be between 1 and 1000, got 0"


def test_v2_grpc_modelinfer_answers_like_http_and_survives_bad_input(server, stubs, reference):
    pids = server.worker_pids(DEFAULT)
    with connect(server.grpc_address) as channel:
        _same(infer_v2(stubs, channel, DEFAULT, CHELSEA, OPTIONS, server.token).body, reference["options"])
        # A non-v2 answer would make the frontend drop the worker: every error is a v2 reply too.
        for fields, image in (({"topk": "0"}, CHELSEA), ({}, b"hello")):
            status, want = _http_error(server, fields, image)
            got = infer_v2(stubs, channel, DEFAULT, image, fields, server.token)
            assert _without_batch(got.body) == _without_batch(want) and got.body["status"] == status
        _same(infer_v2(stubs, channel, DEFAULT, CHELSEA, {}, server.token).body, reference["default"])
        # What TorchServe 0.12 does with ModelInfer: parameters never reach the handler, and a BYTES
        # output comes back as its JSON literal (Gson toString: quoted and escaped).
        oip = stubs.oip
        image = oip.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[CHELSEA]))
        request = oip.ModelInferRequest(model_name=DEFAULT, id="g-1", inputs=[image],
                                        parameters={"topk": oip.InferParameter(int64_param=2)})
        reply = stubs.oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("authorization", f"Bearer {server.token}")], timeout=60)
    (output,) = reply.outputs
    raw = output.contents.bytes_contents[0]
    assert reply.id == "g-1" and output.name == "image" and raw.startswith(b'"{\\"predictions\\":')
    assert len(json.loads(json.loads(raw))["predictions"]) == 5
    assert server.worker_pids(DEFAULT) == pids


def test_tritonclient_grpc_cannot_call_torchserves_v2_service(server):
    """TorchServe 0.12 serves ModelInfer under its own proto package
    (org.pytorch.serve.grpc.openinference), not KServe's 'inference': KServe/Triton gRPC clients
    get UNIMPLEMENTED. Use grpc_client.py --protocol v2 (stubs from TorchServe's proto)."""
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([CHELSEA], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"UNIMPLEMENTED.*inference\.GRPCInferenceService/ModelInfer"):
        client.infer(DEFAULT, [tensor], headers={"authorization": f"Bearer {server.token}"})


def test_v2_requests_batch_like_any_other(server, stubs, reference):
    doc = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                      "data": [base64.b64encode(CHELSEA).decode()]}]}

    def rest(_):
        r = requests.post(f"{server.url}/v2/models/{DEFAULT}/infer", json=doc, headers=server.auth(), timeout=120)
        assert r.status_code == 200, r.text
        return json.loads(r.json()["outputs"][0]["data"][0])

    def over_grpc(_):
        with connect(server.grpc_address) as channel:
            return infer_v2(stubs, channel, DEFAULT, CHELSEA, {}, server.token).body

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: (rest if i % 2 else over_grpc)(i), range(16)))
    assert max(a["batch_size"] for a in answers) > 1
    for answer in answers:
        _same(answer, reference["default"])


# ---------------------------------------------------------------------- KServe v2, kservev2 envelope


def test_the_kservev2_envelope_serves_a_batch_size_1_archive_with_options_as_inputs(envelope_server, stubs,
                                                                                     reference):
    client = triton_http.InferenceServerClient(envelope_server.url.split("//")[1])
    inputs = [_triton_image(False)]
    for name, value in OPTIONS.items():  # the envelope drops parameters: options travel as inputs
        tensor = triton_http.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_), binary_data=False)
        inputs.append(tensor)
    result = client.infer(SINGLE, inputs, headers={"Authorization": f"Bearer {envelope_server.token}"})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["image"]
    answer = _triton_answer(result)
    assert answer["model"] == SINGLE and answer["batch_size"] == 1
    _same({**answer, "model": DEFAULT}, reference["options"])
    with connect(envelope_server.grpc_address) as channel:
        got = infer_v2(stubs, channel, SINGLE, CHELSEA, OPTIONS, envelope_server.token)
        bad = infer_v2(stubs, channel, SINGLE, CHELSEA, {"topk": "0"}, envelope_server.token)
    _same({**got.body, "model": DEFAULT}, reference["options"])
    assert bad.body["error"] == "invalid_option" and bad.body["status"] == 400


def test_what_the_kservev2_envelope_breaks(envelope_server, stubs):
    """TorchServe 0.12's kservev2.py ignores 'parameters' and parses every body as v2 JSON (and
    answers a batch once: tests/test_oip.py): evidence for the README."""
    auth = envelope_server.auth()
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(CHELSEA).decode()]}
    doc = {"inputs": [image], "parameters": {"topk": 2}}
    r = requests.post(f"{envelope_server.url}/v2/models/{SINGLE}/infer", json=doc, headers=auth, timeout=120)
    assert r.status_code == 200 and len(json.loads(r.json()["outputs"][0]["data"][0])["predictions"]) == 5
    client = triton_http.InferenceServerClient(envelope_server.url.split("//")[1])
    with pytest.raises(InferenceServerException) as caught:  # the binary tensor form is not JSON
        client.infer(SINGLE, [_triton_image(True)], headers=dict(auth))
    assert caught.value.status() == "503"
    plain = envelope_server.predict(SINGLE, files={"image": ("x.jpg", CHELSEA)})
    assert plain.status_code == 503 and plain.json()["message"] == "Prediction failed"
    with connect(envelope_server.grpc_address) as channel, pytest.raises(ClientError, match="Prediction failed"):
        predict(stubs, channel, SINGLE, CHELSEA, {}, envelope_server.token)
