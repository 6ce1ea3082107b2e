"""KServe's Open Inference Protocol (v2): the request forms the handler meets, and its reply.

A v2 inference request reaches the handler in one of these shapes (TorchServe 0.12):

- a whole v2 body ``{"id", "inputs": [...], "parameters": {...}}``, decoded or as JSON bytes:
  REST ``/v2/models/{m}/infer`` (or ``/predictions/{m}``), and gRPC ``ModelInfer``, which the
  frontend re-encodes as this JSON with BYTES contents in base64 and ``parameters`` dropped;
- the same with Triton's binary tensor extension: the JSON header, then raw tensor bytes, its
  length in the ``Inference-Header-Content-Length`` request header (tritonclient's default);
- with ``service_envelope=kservev2``: the input tensors of ONE request handed over as if they
  were a batch, each ``{"name", "shape", "datatype", "data"}`` with a BYTES ``data`` cut to its
  first element; :func:`group_tensors` puts them back together.

The image is the BYTES input (named ``image`` when there are several inputs), base64 in JSON.
Options come from the request's ``parameters``, the image input's ``parameters``, and inputs
named like an option (BYTES text, or integers), in increasing precedence. The answer is a v2
reply with one BYTES output, named like the image input, holding the handler's JSON text.
No TorchServe import here.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

from handler.errors import HandlerError, InvalidInput
from handler.requests import RawRequest, V2Reply, decode_base64
from handler.vocab import OPTION_NAMES

__all__ = ["ENVELOPE_TENSORS", "V2Reply", "group_tensors", "is_v2_body", "parse_v2", "split_binary", "v2_response"]

#: Key of the item :func:`group_tensors` makes: no JSON body or form field can produce it.
ENVELOPE_TENSORS = ("kservev2", "tensors")
_TENSOR_KEYS = {"name", "shape", "datatype", "data", "parameters"}


def _is_tensor(item: object) -> bool:
    return (isinstance(item, dict) and {"name", "datatype", "data"} <= item.keys() <= _TENSOR_KEYS
            and isinstance(item["name"], str))


def group_tensors(data: list) -> list:
    """Undo the kservev2 envelope's split: its items, all input tensors, become one request item.

    Any other batch comes back unchanged.
    """
    if data and all(_is_tensor(item) for item in data):
        return [{ENVELOPE_TENSORS: list(data)}]
    return data


def is_v2_body(doc: object) -> bool:
    """A decoded JSON body in v2 form: an object with an ``inputs`` list and no ``image`` key."""
    return isinstance(doc, dict) and isinstance(doc.get("inputs"), list) and not any(
        str(key).lower() == "image" for key in doc)


def split_binary(body: bytes, header_length: str) -> dict:
    """A v2 body with binary tensor data: the JSON header, each binary input's ``data`` filled in.

    A BYTES tensor's binary form is each element as a 4-byte little-endian length and its bytes.

    Raises:
        InvalidInput: a bad header length, JSON header or binary section (``v2_reply`` set).
    """
    try:
        return _split_binary(body, header_length)
    except HandlerError as err:
        err.v2_reply = V2Reply(None)
        raise


def _split_binary(body: bytes, header_length: str) -> dict:
    try:
        size = int(header_length)
        if not 0 < size <= len(body):
            raise ValueError(f"{size} is not within the body's {len(body)} bytes")
        doc = json.loads(body[:size].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"bad binary v2 request (Inference-Header-Content-Length): {exc}", "body") from exc
    if not is_v2_body(doc):
        raise InvalidInput("binary v2 request: the JSON header has no 'inputs' list", "body")
    offset = size
    for tensor in doc["inputs"]:
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        length = params.get("binary_data_size") if isinstance(params, dict) else None
        if length is None:
            continue
        if not isinstance(length, int) or length < 0 or offset + length > len(body):
            raise InvalidInput(f"binary v2 request: input {tensor.get('name')!r} overruns the body", "body")
        chunk, offset = body[offset:offset + length], offset + length
        if tensor.get("datatype") == "BYTES":
            elements, at = [], 0
            while at + 4 <= len(chunk):
                (n,) = struct.unpack_from("<I", chunk, at)
                elements.append(chunk[at + 4:at + 4 + n])
                at += 4 + n
            if at != len(chunk):
                raise InvalidInput(f"binary v2 request: input {tensor.get('name')!r} has a broken BYTES "
                                   "element", "body")
            tensor["data"] = elements
        else:
            tensor["data"] = chunk
    return doc


def _elements(tensor: dict) -> list:
    data = tensor.get("data")
    return data if isinstance(data, list) else [data]


def _text(value: object) -> object:
    """An option's BYTES element as text: plain text (REST) or base64 of it (gRPC ModelInfer,
    whose frontend base64-encodes BYTES contents)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"option value is not UTF-8 text: {exc}", "inputs") from exc
    if isinstance(value, str) and len(value) % 4 == 0 and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return value
        if decoded.isprintable():
            return decoded
    return value


def _option_value(tensor: dict) -> object:
    values = _elements(tensor)
    if tensor.get("datatype") == "BYTES":
        values = [_text(v) for v in values]
    return values[0] if len(values) == 1 else values


def _named(params: object) -> dict[str, object]:
    """The options among v2 parameters; other parameters (binary_data_output, priority...) are
    the protocol's, not the handler's."""
    if not isinstance(params, dict):
        return {}
    return {str(k).lower(): v for k, v in params.items() if str(k).lower() in OPTION_NAMES}


def parse_v2(doc: dict, options: dict[str, object] | None = None, wrap: bool = True) -> RawRequest:
    """A v2 request as the pipeline takes it: the image's bytes and the raw options.

    Args:
        doc: the v2 body (``inputs`` list, optional ``id`` and ``parameters``).
        options: options the request carried outside the body (headers), under the body's.
        wrap: whether the answer is framed as a v2 reply (False under TorchServe's envelope).

    Raises:
        InvalidInput: no image input, several, one that is not one BYTES element, or one that is
            not base64 in JSON; the error's ``v2_reply`` says how to frame it.
    """
    request_id = doc.get("id") if isinstance(doc.get("id"), str) and doc["id"].strip() else None
    reply = V2Reply(request_id, "image", wrap)
    try:
        image, found, reply = _parse(doc, reply)
        data = decode_base64(image) if isinstance(image, str) else bytes(image)
        if not data:
            raise InvalidInput("the v2 image input is empty", "image")
    except HandlerError as err:
        err.v2_reply = reply
        raise
    return RawRequest(data, {**(options or {}), **found}, "v2", reply)


def _parse(doc: dict, reply: V2Reply) -> tuple[str | bytes, dict[str, object], V2Reply]:
    options = _named(doc.get("parameters"))
    images, option_inputs = [], []
    for tensor in doc["inputs"]:
        if not _is_tensor(tensor):
            raise InvalidInput("every v2 input needs 'name', 'datatype' and 'data'", "inputs")
        (option_inputs if tensor["name"].lower() in OPTION_NAMES else images).append(tensor)
    if len(images) > 1:
        named = [t for t in images if t["name"].lower() == "image"]
        if len(named) != 1:
            names = ", ".join(repr(t["name"]) for t in images)
            raise InvalidInput(f"v2 request has several image inputs ({names}); send one BYTES input named "
                               "'image' per request, options as parameters or inputs named like them", "inputs")
        images = named
    if not images:
        raise InvalidInput("v2 request has no image input; send the encoded image as a BYTES input "
                           "named 'image'", "inputs")
    (image,) = images
    reply = V2Reply(reply.request_id, image["name"], reply.wrap)
    if image["datatype"] != "BYTES":
        raise InvalidInput(f"input {image['name']!r} is {image['datatype']}; send the encoded image "
                           "(JPEG, PNG...) as a BYTES element, base64 in JSON", "image")
    elements = _elements(image)
    if len(elements) != 1 or not isinstance(elements[0], (str, bytes, bytearray)):
        raise InvalidInput(f"input {image['name']!r} must hold exactly one encoded image, got "
                           f"{len(elements)} elements", "image")
    options.update(_named(image.get("parameters")))
    for tensor in option_inputs:
        options[tensor["name"].lower()] = _option_value(tensor)
    return elements[0], options, reply


def v2_response(text: str, reply: V2Reply, model_name: str, model_version: str, request_id: str | None,
                error: str | None = None) -> str:
    """The handler's JSON ``text`` as a v2 reply: one BYTES output holding it.

    ``error`` (the message of an error answer) also goes in a top-level ``error`` key, where v2
    REST clients look for it; gRPC ModelInfer forwards only the outputs.
    """
    body = {
        "id": reply.request_id or request_id or "",
        "model_name": model_name,
        "model_version": model_version or "",
        "outputs": [{"name": reply.output, "shape": [1], "datatype": "BYTES", "data": [text]}],
    }
    if error is not None:
        body["error"] = error
    return json.dumps(body, separators=(",", ":"))
