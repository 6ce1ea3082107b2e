"""The TorchServe adapter: TorchServe's context in, the pipeline's answers out.

What only TorchServe has lives here: its context (model folder, manifest, ``model-config.yaml``,
GPU id, request headers), per-request statuses and content types, its metric cache, and the
framing of Open Inference Protocol answers that its gRPC and kservev2 paths need. Decoding,
validation, the pass and rendering are the pipeline's (:mod:`handler.pipeline`), which the KServe
predictor calls the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from handler.codec import extract_request
from handler.errors import HandlerError
from handler.metrics import HandlerMetrics
from handler.oip import group_tensors, v2_response
from handler.pipeline import Answer, Archive, Pipeline
from handler.requests import RawRequest, V2Reply

__all__ = ["GradCamHandler"]

logger = logging.getLogger(__name__)

_JSON = "application/json"


def _device(context) -> torch.device:
    gpu_id = context.system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def _archive(context) -> Archive:
    """The archive as TorchServe unpacked it, with the server's batch size (which may differ from
    the archive's own ``batchSize`` when the server registers the model with another)."""
    props = context.system_properties
    yaml_config = getattr(context, "model_yaml_config", None) or {}
    model = context.manifest["model"]
    return Archive(
        model_dir=Path(props["model_dir"]),
        model_name=getattr(context, "model_name", None) or model["modelName"],
        weights=model.get("serializedFile", "model.safetensors"),
        version=str(model.get("modelVersion", "")),
        handler=dict(yaml_config.get("handler") or {}),
        batch_size=int(props.get("batch_size") or yaml_config.get("batchSize") or 1),
        max_batch_delay_ms=int(yaml_config.get("maxBatchDelay") or 100),
    )


def _headers(context, idx: int) -> dict[str, str]:
    """The request's HTTP headers (names lower-cased); form fields' entries are skipped."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, KeyError):
        return {}
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}


class GradCamHandler:
    """Predictions and Grad-CAM maps for a batch of TorchServe requests."""

    def __init__(self) -> None:
        self.initialized = False
        self.pipeline: Pipeline | None = None

    def initialize(self, context) -> None:
        """Build the warm pipeline from the archive TorchServe unpacked."""
        self.pipeline = Pipeline(_archive(context), _device(context))
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            self.pipeline.metrics = HandlerMetrics(metrics, self.pipeline.model_name)
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[str]:
        """Answer every request of the batch, each with its own status and JSON body.

        The protocol is read here, once per request (headers included: ``/explanations`` sets an
        ``explain`` header per request, and options may travel as headers); a request that cannot
        be read gets its error from the pipeline like any other bad request.
        """
        data = group_tensors(data)  # service_envelope=kservev2 splits one request into its tensors
        requests: list[RawRequest | HandlerError] = []
        for idx, item in enumerate(data):
            try:
                requests.append(extract_request(item, _headers(context, idx)))
            except HandlerError as err:
                requests.append(err)
        answers = self.pipeline.run(requests)
        return [self._respond(context, idx, answer, request)
                for idx, (answer, request) in enumerate(zip(answers, requests))]

    def _respond(self, context, idx: int, answer: Answer, request: RawRequest | HandlerError) -> str:
        if not answer.ok:
            context.set_response_status(answer.status, answer.error.kind, idx)
        context.set_response_content_type(idx, _JSON)
        reply = request.v2_reply if isinstance(request, HandlerError) else request.reply
        return self._framed(context, idx, answer, reply)

    def _framed(self, context, idx: int, answer: Answer, reply: V2Reply | None) -> str:
        """A v2 request's answer as a v2 reply: TorchServe's gRPC ModelInfer drops the worker on
        any other answer (GRPCJob.response reads ``id``, ``model_name``, ``outputs``)."""
        if reply is None or not reply.wrap:
            return answer.text
        version = str(context.manifest["model"].get("modelVersion", ""))
        error = answer.error.message if answer.error is not None else None
        return v2_response(answer.text, reply, self.pipeline.model_name, version, context.get_request_id(idx),
                           error)
