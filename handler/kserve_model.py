"""The KServe adapter: the pipeline as a ``kserve.Model``, with dynamic batching inside it.

KServe's Python ``ModelServer`` owns the protocols (v1 and v2 REST on one port, v2 gRPC on
another) and hands ``predict`` a parsed request: a dict for v1, an ``InferRequest`` for v2. Here
each request becomes the same :class:`~handler.requests.RawRequest` the TorchServe handler makes
(:mod:`handler.codec`, :mod:`handler.oip`), waits in a queue, and shares one pipeline pass with
the requests that arrive within the archive's ``maxBatchDelay``, up to its ``batchSize``
(KServe's Python server has no batching of its own). The pass runs in one worker thread, so the
event loop keeps taking requests while a batch runs.

A bad request gets its own status and JSON error, as on TorchServe: REST answers it through
:class:`Rejected` (see :func:`rejected_response`), gRPC aborts with the matching status code and
the JSON error as its details.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, to_http_parameters

from handler.batcher import Batcher
from handler.codec import header_options, request_from_json
from handler.errors import HandlerError, InvalidInput, PayloadTooLarge
from handler.oip import parse_v2, v2_response
from handler.pipeline import Answer, Archive, Pipeline
from handler.requests import RawRequest, V2Reply, load_json
from handler.vocab import OPTION_NAMES

__all__ = ["GradCamModel", "Rejected", "rejected_response"]

logger = logging.getLogger(__name__)


class Rejected(Exception):
    """A request answered with an error status; the REST server turns it into that response."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


async def rejected_response(_request, exc: Rejected):
    """FastAPI exception handler: the error's own status and JSON body."""
    from fastapi.responses import Response

    return Response(content=exc.text, status_code=exc.status, media_type="application/json")


def _infer_doc(request: InferRequest) -> dict:
    """A kserve ``InferRequest`` as the v2 body :func:`handler.oip.parse_v2` reads.

    gRPC clients (tritonclient) send tensors in ``raw_input_contents``; kserve leaves ``data``
    empty for those, and ``as_numpy()`` reads them.
    """
    inputs = []
    for tensor in request.inputs:
        data = tensor.data
        if data is None or (isinstance(data, list) and not data):
            data = tensor.as_numpy().ravel().tolist()
        elif not isinstance(data, list):
            data = [data]
        params = tensor.parameters
        if params is not None and not isinstance(params, dict):
            params = to_http_parameters(params)
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape), "data": data}
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    params = request.parameters
    if params is not None and not isinstance(params, dict):
        params = to_http_parameters(params) if len(params) else {}
    return {"id": request.id or "", "parameters": params or {}, "inputs": inputs}


def _grpc_error(answer: Answer):
    """A gRPC abort for an error answer: the status code nearest its HTTP status."""
    from grpc_interceptor.exceptions import Internal, InvalidArgument, ResourceExhausted

    kind = {413: ResourceExhausted, 507: ResourceExhausted}.get(answer.status)
    if kind is None:
        kind = InvalidArgument if 400 <= answer.status < 500 else Internal
    return kind(answer.text)


class GradCamModel(kserve.Model):
    """An archive served by KServe's ``ModelServer``.

    Args:
        archive: the unpacked archive (:meth:`handler.pipeline.Archive.from_dir`).
        device: where the model runs.
        metrics: optional sink for the pipeline's metrics.
    """

    def __init__(self, archive: Archive, device: str = "cpu", metrics=None) -> None:
        super().__init__(archive.model_name, return_response_headers=True)
        self.archive = archive
        self.device = device
        self.metrics = metrics
        self.pipeline: Pipeline | None = None
        self.batcher: Batcher | None = None

    def load(self) -> bool:
        """Build the pipeline (warm: a dry batch, and every compiled batch size); then ready."""
        self.pipeline = Pipeline(self.archive, self.device, self.metrics)
        self.batcher = Batcher(self.pipeline.run, self.archive.batch_size, self.archive.max_batch_delay_ms / 1e3)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [1]},
                *({"name": name, "datatype": "BYTES", "shape": [1]} for name in OPTION_NAMES)]

    def get_output_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [1]}]

    async def predict(self, payload, headers: dict[str, str] | None = None, response_headers=None):
        """v2 (``InferRequest``): one image, answered as a v2 response with one BYTES output that
        holds the answer's JSON. v1 (dict): ``{"instances": [{"image": <base64>, <option>...}]}``,
        each instance a request of its own, answered as ``{"predictions": [<answer>...]}``."""
        if isinstance(payload, InferRequest):
            return await self._v2(payload, headers or {})
        return await self._v1(payload, headers or {}, response_headers)

    async def _v2(self, request: InferRequest, headers: dict[str, str]):
        options = header_options(headers)
        try:
            raw: RawRequest | HandlerError = parse_v2(_infer_doc(request), options)
            reply = raw.reply
        except HandlerError as err:
            raw, reply = err, err.v2_reply or V2Reply(request.id or None)
        answer: Answer = await self.batcher.submit(raw)
        if not answer.ok:
            if request.from_grpc:
                raise _grpc_error(answer)
            raise Rejected(answer.status, v2_response(answer.text, reply, self.name, self.archive.version,
                                                      request.id or None, answer.error.message))
        output = InferOutput(name=reply.output, shape=[1], datatype="BYTES", data=[answer.text])
        return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=self.name,
                             infer_outputs=[output], model_version=self.archive.version or None,
                             from_grpc=request.from_grpc,
                             # gRPC: the JSON in raw_output_contents, where tritonclient reads BYTES
                             # (its as_numpy() fails on bytes_contents under numpy 2).
                             use_binary_outputs=request.from_grpc)

    async def _v1(self, payload, headers: dict[str, str], response_headers: dict | None):
        if isinstance(payload, (bytes, str)):  # sent without a JSON content type
            try:
                payload = load_json(payload)
            except HandlerError as err:
                raise Rejected(err.status, self.pipeline.reject(err).text) from None
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            error = InvalidInput('a v1 request is {"instances": [{"image": "<base64>", ...}]}', "instances")
            raise Rejected(400, self.pipeline.reject(error).text)
        if len(instances) > self.archive.batch_size:
            error = PayloadTooLarge(f"{len(instances)} instances in one request; at most {self.archive.batch_size}",
                                 "instances")
            raise Rejected(413, self.pipeline.reject(error).text)
        options = header_options(headers)
        requests = []
        for instance in instances:
            try:
                requests.append(request_from_json(instance, dict(options), "v1"))
            except HandlerError as err:
                requests.append(err)
        answers = await asyncio.gather(*(self.batcher.submit(r) for r in requests))
        text = '{"predictions":[' + ",".join(a.text for a in answers) + "]}"
        failed = next((a for a in answers if not a.ok), None)
        if failed is not None:
            raise Rejected(failed.status, text)
        if response_headers is not None:
            response_headers["content-type"] = "application/json"
        return text.encode()


def load_model(path: str | Path, workdir: str | Path, name: str | None = None, device: str = "cpu",
               metrics=None) -> GradCamModel:
    """A loaded (warm) model from a ``.mar`` or its unpacked folder."""
    from handler.pipeline import unpack_archive

    archive = Archive.from_dir(unpack_archive(path, workdir), name)
    model = GradCamModel(archive, device, metrics)
    model.load()
    return model
