"""KServe v2 requests in-process: the forms TorchServe 0.12 hands the handler, and the v2 reply."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from conftest import photo
from test_handler import _batch, _handler, _png, model_dir  # noqa: F401  (model_dir is a fixture)
from ts.context import RequestProcessor
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

from handler.codec import extract_request
from handler.errors import InvalidInput
from handler.oip import V2Reply, group_tensors, is_v2_body, parse_v2, split_binary, v2_response

IMAGE = photo("chelsea.jpg")
B64 = base64.b64encode(IMAGE).decode()


def _tensor(name: str, data: list, datatype: str = "BYTES", **extra) -> dict:
    return {"name": name, "shape": [len(data)], "datatype": datatype, "data": data, **extra}


def _binary(doc: dict, blobs: dict[str, list[bytes]]) -> tuple[bytes, str]:
    """tritonclient's binary form: JSON header, then each BYTES tensor as length-prefixed elements."""
    tails = []
    for tensor in doc["inputs"]:
        if tensor["name"] in blobs:
            tail = b"".join(struct.pack("<I", len(b)) + b for b in blobs[tensor["name"]])
            tensor["parameters"] = {"binary_data_size": len(tail)}
            tensor.pop("data", None)
            tails.append(tail)
    header = json.dumps(doc).encode()
    return header + b"".join(tails), str(len(header))


# ---------------------------------------------------------------------- parsing


def test_a_v2_body_gives_the_image_and_the_options_from_parameters_and_inputs():
    doc = {"id": "r-7", "parameters": {"topk": 3, "cam_method": "layercam", "binary_data_output": True},
           "inputs": [_tensor("image", [B64], parameters={"cam_method": "gradcam++"}),
                      _tensor("outputs", ["map,heatmap"]), _tensor("topk", [2], "INT64")]}
    raw = extract_request({"body": doc}, {"cam_classes": "top2"})
    assert raw.image_bytes == IMAGE and raw.source == "v2"
    # headers < request parameters < the image input's parameters < option inputs
    assert raw.options == {"cam_classes": "top2", "topk": 2, "cam_method": "gradcam++", "outputs": "map,heatmap"}
    assert raw.reply == V2Reply("r-7", "image", True)


def test_option_inputs_may_be_plain_text_or_base64_as_grpc_modelinfer_sends_them():
    grpc_json = {"id": "", "model_name": "m", "inputs": [
        _tensor("image", [B64]), _tensor("topk", [base64.b64encode(b"3").decode()]),
        _tensor("cam_classes", [base64.b64encode(b"281,Egyptian cat").decode()]), _tensor("outputs", ["heatmap"])]}
    raw = extract_request({"body": json.dumps(grpc_json).encode()}, {})
    assert raw.options == {"topk": "3", "cam_classes": "281,Egyptian cat", "outputs": "heatmap"}
    assert raw.reply == V2Reply(None, "image", True)  # an empty id is no id


def test_a_lone_bytes_input_is_the_image_whatever_its_name():
    request = parse_v2({"inputs": [_tensor("input-0", [B64])]})
    assert request.image_bytes == IMAGE and request.reply.output == "input-0" and request.options == {}


@pytest.mark.parametrize("inputs, message", [
    ([], "no image input"),
    ([_tensor("topk", ["3"])], "no image input"),
    ([_tensor("a", [B64]), _tensor("b", [B64])], "several image inputs ('a', 'b')"),
    ([_tensor("image", [1, 2, 3], "UINT8")], "'image' is UINT8; send the encoded image"),
    ([_tensor("image", [B64, B64])], "exactly one encoded image, got 2"),
    ([{"name": "image", "data": [B64]}], "needs 'name', 'datatype' and 'data'"),
])
def test_malformed_v2_requests_are_named_and_framed_as_v2(inputs, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        extract_request({"body": {"id": "x", "inputs": inputs}}, {})
    assert caught.value.v2_reply == V2Reply("x", "image", True)


def test_bad_base64_in_the_image_input_is_a_v2_error():
    with pytest.raises(InvalidInput, match="not valid base64") as caught:
        extract_request({"body": {"inputs": [_tensor("pic", ["not base64 !!"])]}}, {})
    assert caught.value.v2_reply.output == "pic"


def test_our_own_json_form_is_not_mistaken_for_v2():
    assert not is_v2_body({"image": B64, "inputs": []}) and is_v2_body({"inputs": []})
    raw = extract_request({"body": {"image": B64, "topk": 2}}, {})
    assert raw.source == "json" and raw.reply is None


def test_the_binary_tensor_extension_carries_raw_image_bytes():
    body, length = _binary({"inputs": [_tensor("image", []), _tensor("topk", [2], "INT64")],
                            "parameters": {"binary_data_output": True}}, {"image": [IMAGE]})
    raw = extract_request({"body": body}, {"Inference-Header-Content-Length": length})
    assert raw.image_bytes == IMAGE and raw.options == {"topk": 2} and raw.reply.wrap
    for bad_length in ("x", "0", str(len(body) + 1)):
        with pytest.raises(InvalidInput, match="Inference-Header-Content-Length") as caught:
            split_binary(body, bad_length)
        assert caught.value.v2_reply is not None
    with pytest.raises(InvalidInput, match="overruns the body"):
        split_binary(body[:-5], length)
    size = int(length)  # an element longer than its tensor's binary_data_size
    broken = body[:size] + struct.pack("<I", len(IMAGE) + 10) + body[size + 4:]
    with pytest.raises(InvalidInput, match="broken BYTES element"):
        split_binary(broken, length)


def test_envelope_tensors_are_grouped_back_into_one_request():
    tensors = [_tensor("image", [B64]), _tensor("topk", [2], "INT64")]
    tensors[0]["data"] = B64  # the kservev2 envelope cuts BYTES data to its first element
    grouped = group_tensors(tensors)
    assert len(grouped) == 1
    raw = extract_request(grouped[0], {})
    assert raw.image_bytes == IMAGE and raw.options == {"topk": 2} and raw.reply == V2Reply(None, "image", False)
    plain = [{"body": IMAGE}, {"data": IMAGE, "topk": b"2"}]
    assert group_tensors(plain) is plain


def test_the_v2_reply_holds_the_answer_as_one_bytes_element():
    text = json.dumps({"predictions": [], "cams": []})
    reply = json.loads(v2_response(text, V2Reply(None, "pic"), "m", "1.0", "ts-id", error="bad topk"))
    assert reply == {"id": "ts-id", "model_name": "m", "model_version": "1.0", "error": "bad topk",
                     "outputs": [{"name": "pic", "shape": [1], "datatype": "BYTES", "data": [text]}]}


# ---------------------------------------------------------------------- the handler


def test_v2_and_plain_requests_share_a_batch_each_answered_in_its_own_form(model_dir):  # noqa: F811
    service, context = _handler(model_dir)
    v2 = {"id": "v2-1", "inputs": [_tensor("image", [base64.b64encode(_png()).decode()])], "parameters": {"topk": 2}}
    bad = {"inputs": [_tensor("image", [base64.b64encode(_png()).decode()]), _tensor("topk", ["0"])]}
    statuses, bodies = _batch(service, context, [{"body": _png()}, {"body": v2}, {"body": bad}])
    assert statuses == [200, 200, 400]
    plain, reply, error = bodies
    assert reply["id"] == "v2-1" and reply["model_name"] == "tinynet" and [o["name"] for o in reply["outputs"]] == [
        "image"]
    answer = json.loads(reply["outputs"][0]["data"][0])
    assert len(answer["predictions"]) == 2 and answer["batch_size"] == 3
    assert answer["predictions"] == plain["predictions"][:2] and answer["cams"] == plain["cams"]
    inner = json.loads(error["outputs"][0]["data"][0])
    assert error["error"] == inner["message"] == "topk must be between 1 and 3, got 0"
    assert inner["error"] == "invalid_option" and inner["field"] == "topk" and inner["status"] == 400


def test_torchserves_kservev2_envelope_reaches_the_same_answer(model_dir):  # noqa: F811
    """TorchServe's own envelope, in-process: options as inputs reach the handler, parameters do not."""
    service, context = _handler(model_dir)
    plain = _batch(service, context, [{"body": _png()}])[1][0]
    envelope = KServev2Envelope(service.handle)
    doc = {"id": "e-1", "parameters": {"cam_classes": "none"},
           "inputs": [_tensor("image", [base64.b64encode(_png()).decode()]), _tensor("topk", ["2"])]}
    context.request_processor = [RequestProcessor({})]
    (reply,) = envelope.handle([{"body": doc}], context)
    assert reply["id"] == "e-1" and [o["name"] for o in reply["outputs"]] == ["image"]
    answer = json.loads(reply["outputs"][0]["data"][0])
    assert answer["predictions"] == plain["predictions"][:2]
    assert answer["cams"] == plain["cams"]  # cam_classes=none was a parameter: the envelope drops it


def test_torchserves_kservev2_envelope_answers_a_batch_once(model_dir):  # noqa: F811
    """kservev2.py parses request 0 only and returns ONE reply for the batch; TorchServe's worker
    then fails every request of it (ts/service.py: "number of batch response mismatched", 503).
    Hence the envelope needs an archive built with --batch-size 1."""
    service, context = _handler(model_dir)
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    requests = [{"body": {"id": f"r{i}", "inputs": [_tensor("image", [base64.b64encode(_png()).decode()])]}}
                for i in range(2)]
    replies = KServev2Envelope(service.handle).handle(requests, context)
    assert len(replies) == 1 and replies[0]["id"] == "r0"
