"""One exception per failure kind, each carrying the HTTP status it maps to.

The glue module turns any :class:`HandlerError` into a JSON error body with its status
(see :func:`error_body`); everything else that escapes the pass is a server error.
"""

from __future__ import annotations

__all__ = [
    "HandlerError",
    "InvalidInput",
    "InvalidOption",
    "PayloadTooLarge",
    "UnsupportedMedia",
    "ResponseTooLarge",
    "ModelFailure",
    "DeviceOutOfMemory",
    "error_body",
]


class HandlerError(Exception):
    """Base of every error the handler answers on its own; should return its ``status``."""

    status = 500
    kind = "internal_error"
    #: Set by the KServe v2 parser (:mod:`handler.oip`): the error goes out framed as a v2 reply.
    v2_reply = None

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(HandlerError, ValueError):
    """The request body cannot be read as an image request; should return HTTP_400."""

    status = 400
    kind = "invalid_input"


class InvalidOption(HandlerError, ValueError):
    """An option is unknown or has a value out of its domain; should return HTTP_400."""

    status = 400
    kind = "invalid_option"


class UnsupportedMedia(HandlerError, ValueError):
    """The payload is not an image format the decoder supports; should return HTTP_415."""

    status = 415
    kind = "unsupported_media"


class PayloadTooLarge(HandlerError, ValueError):
    """The image is over the byte or pixel limits; should return HTTP_413."""

    status = 413
    kind = "payload_too_large"


class ResponseTooLarge(HandlerError):
    """The options ask for more output than the response size limit allows; should return HTTP_413."""

    status = 413
    kind = "response_too_large"


class ModelFailure(HandlerError, RuntimeError):
    """The forward or gradient pass failed for the whole batch; should return HTTP_500."""

    status = 500
    kind = "model_failure"


class DeviceOutOfMemory(ModelFailure):
    """The device ran out of memory for this batch; should return HTTP_507."""

    status = 507
    kind = "device_out_of_memory"


def error_body(error: HandlerError) -> dict:
    """JSON body of an error response: what failed, which field, and the status."""
    body = {"error": error.kind, "message": error.message, "status": error.status}
    if error.field is not None:
        body["field"] = error.field
    return body
