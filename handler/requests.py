"""A request as the protocol edge hands it to the pipeline, and the byte forms both edges share.

:mod:`handler.codec` (TorchServe's request items and KServe v1 instances) and :mod:`handler.oip`
(Open Inference Protocol v2, on either server) each turn what their server received into one
:class:`RawRequest`, once; the pipeline (:mod:`handler.pipeline`) validates its options and
decodes its image. No server, torch or PIL import here.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from handler.errors import InvalidInput

__all__ = ["RawRequest", "V2Reply", "decode_base64", "load_json"]


@dataclass(frozen=True)
class V2Reply:
    """How to answer a v2 request.

    Attributes:
        request_id: the request's ``id``, echoed; None when it had none.
        output: name of the output tensor (the image input's name).
        wrap: False when TorchServe's kservev2 envelope wraps the answer itself.
    """

    request_id: str | None
    output: str = "image"
    wrap: bool = True


@dataclass
class RawRequest:
    """One request as received: encoded image, options not yet validated, and its form.

    ``source`` is ``raw``, ``multipart``, ``json``, ``v1`` or ``v2``; ``reply`` is set for a v2
    request: how to frame its answer.
    """

    image_bytes: bytes
    options: dict[str, object]
    source: str
    reply: V2Reply | None = None


def decode_base64(text: str) -> bytes:
    """Bytes of standard or urlsafe base64, or of a ``data:...;base64,`` URL.

    Raises:
        InvalidInput: not base64, or empty.
    """
    text = text.strip()
    if text[:5].lower() == "data:":
        header, _, text = text.partition(",")
        if not header.lower().endswith(";base64"):
            raise InvalidInput("image data URL must be 'data:image/...;base64,<data>'", "image")
    text = "".join(text.split()).translate(str.maketrans("-_", "+/")).rstrip("=")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image is not valid base64: {exc}", "image") from exc
    if not data:
        raise InvalidInput("image is empty", "image")
    return data


def load_json(body: bytes | str) -> object:
    """A JSON body (UTF-8, a BOM allowed).

    Raises:
        InvalidInput: not UTF-8 or not JSON.
    """
    try:
        return json.loads(body.decode("utf-8-sig") if isinstance(body, bytes) else body)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"JSON body is not UTF-8: {exc}", "body") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}", "body") from exc
