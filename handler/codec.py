"""The protocol edge: what a server received, in one of the product's request forms, to a
:class:`~handler.requests.RawRequest`, once.

Request forms: a raw image body with options in headers, a multipart form, JSON with a base64
image (also KServe v1 ``instances``), and Open Inference Protocol v2 bodies, which
:mod:`handler.oip` reads. Options are validated later, by :mod:`handler.options`; the image is
decoded by :mod:`handler.images`. No server, torch or PIL import here.
"""

from __future__ import annotations

from handler.errors import InvalidInput, InvalidOption
from handler.oip import ENVELOPE_TENSORS, is_v2_body, parse_v2, split_binary
from handler.options import unknown_option
from handler.requests import RawRequest, decode_base64, load_json
from handler.vocab import OPTION_NAMES

__all__ = ["extract_request", "header_options", "request_from_json"]

_IMAGE_FIELDS = ("image", "file", "data")


def header_options(headers: dict | None) -> dict[str, object]:
    """The options a request carries as headers (names matched case-insensitively, other headers
    ignored), as either server hands its headers over."""
    options: dict[str, object] = {}
    for name, value in (headers or {}).items():
        if str(name).lower() in OPTION_NAMES:
            value = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
            options[str(name).lower()] = value.strip()
    return options


def request_from_json(doc: object, options: dict[str, object], source: str = "json") -> RawRequest:
    """A decoded JSON object ``{"image": <base64>, <option>: <value>...}``; the image may also be
    ``{"b64": <base64>}`` (KServe v1's convention for bytes). A v2 body goes to :mod:`handler.oip`.

    Raises:
        InvalidInput: not an object, or no base64 ``image`` in it.
        InvalidOption: a key that is not an option.
    """
    if is_v2_body(doc):
        return parse_v2(doc, options)
    if not isinstance(doc, dict):
        kind = type(doc).__name__
        raise InvalidInput(f"JSON body must be an object with an 'image' key, got {kind}", "body")
    fields = {str(key): value for key, value in doc.items()}
    image = next((fields.pop(key) for key in list(fields) if key.lower() == "image"), None)
    if isinstance(image, dict) and set(image) == {"b64"}:
        image = image["b64"]
    if not isinstance(image, str) or not image.strip():
        got = ", ".join(map(str, doc)) or "none"
        raise InvalidInput(
            f"JSON body needs 'image' as a base64 string (keys received: {got})", "image"
        )
    for name, value in fields.items():
        if name.lower() not in OPTION_NAMES:
            raise unknown_option(name)
        options[name.lower()] = value
    return RawRequest(decode_base64(image), options, source)


def _from_multipart(item: dict, options: dict[str, object]) -> RawRequest:
    fields = {str(key): value for key, value in item.items()}
    images = [key for key in fields if key.lower() in _IMAGE_FIELDS]
    if len(images) != 1:
        what, got = "several image fields" if images else "no 'image' field", images or fields
        raise InvalidInput(
            f"multipart form has {what} (fields received: {', '.join(got)})", "image"
        )
    image = fields.pop(images[0])
    for name, value in fields.items():
        if name.lower() not in OPTION_NAMES:
            raise unknown_option(name)
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidOption(f"{name} is not UTF-8 text", name) from exc
        options[name.lower()] = value.strip() if isinstance(value, str) else value
    if isinstance(image, str):  # a text field rather than a file: base64 or a data URL
        image = decode_base64(image)
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise InvalidInput("multipart 'image' field is empty", "image")
    return RawRequest(bytes(image), options, "multipart")


def extract_request(item: dict, headers: dict[str, str]) -> RawRequest:
    """Split one TorchServe request item into image bytes and raw options.

    Options come from headers (names matched case-insensitively, other headers ignored) and
    from the body (JSON keys or multipart fields); the body wins where both give one. A KServe
    v2 request (a v2 JSON body, Triton's binary form of it, or the input tensors that
    TorchServe's kservev2 envelope hands over, grouped by :func:`handler.oip.group_tensors`)
    gives its image and options the same way, and ``reply`` says how to frame the answer.

    Args:
        item: one element of TorchServe's ``data`` list.
        headers: request header name to value.

    Returns:
        The encoded image, the options as received, and ``source`` (raw, multipart, json or v2).

    Raises:
        InvalidInput: empty or unreadable body, or no image in it (for a v2 request, with
            ``v2_reply`` set).
        InvalidOption: an unknown option name in the JSON body or the form.
    """
    options = header_options(headers)
    content_type = binary_header = ""
    for name, value in (headers or {}).items():
        value = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        if str(name).lower() == "content-type":
            content_type = value.lower()
        elif str(name).lower() == "inference-header-content-length":
            binary_header = value.strip()
    if not isinstance(item, dict):
        item = {"body": item}
    if ENVELOPE_TENSORS in item:
        return parse_v2({"inputs": item[ENVELOPE_TENSORS]}, options, wrap=False)
    if set(item) - {"body", "data"}:
        return _from_multipart(item, options)
    body = item.get("body") if item.get("body") is not None else item.get("data")
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if body is None or (isinstance(body, (bytes, str)) and not body):
        raise InvalidInput("empty request body; send an image or a JSON object", "body")
    if not isinstance(body, (bytes, str)):  # TorchServe already decoded the JSON
        return request_from_json(body, options)
    if binary_header and isinstance(body, bytes):  # v2 with binary tensor data (tritonclient's default)
        return parse_v2(split_binary(body, binary_header), options)
    head = body.lstrip()[:1]
    head = head.decode("latin-1") if isinstance(head, bytes) else head
    if head in ("{", "[") or "json" in content_type:
        return request_from_json(load_json(body), options)
    if isinstance(body, str):
        raise InvalidInput(
            "request body is text, not an image; send image bytes or JSON with a base64 'image'",
            "body",
        )
    return RawRequest(body, options, "raw")


