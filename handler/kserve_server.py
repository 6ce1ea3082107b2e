"""Serve an archive on KServe's own Python model server: ``python -m handler.kserve_server``.

The same ``.mar`` TorchServe serves (or its unpacked folder), under the same model name, with
the same request forms and answers, on kserve's ``ModelServer``: KServe v1 and Open Inference
Protocol v2 over REST on one port, v2 over gRPC on another, ``/metrics`` with the handler's own
metrics beside kserve's. Unlike kserve's default it listens on loopback unless ``--host`` says
otherwise (``ModelServer`` has no authentication of its own: in a cluster the gateway does it).

SIGTERM stops taking new connections and finishes the requests in flight (up to
``--grace-period`` seconds) before the process exits.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import tempfile
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from handler.errors import HandlerError, InvalidInput, error_body
from handler.metrics import METRICS, MetricsEmitter

__all__ = ["PrometheusMetrics", "main"]

logger = logging.getLogger("handler.kserve_server")


class PrometheusMetrics(MetricsEmitter):
    """The handler's metrics (:data:`handler.metrics.METRICS`, the names TorchServe exports) in
    prometheus_client's default registry, which kserve's ``/metrics`` serves."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        # Histograms keep prometheus_client's default buckets: TorchServe's (Java client) are the same.
        kinds = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}
        self.metrics = {spec.name: kinds[spec.kind](spec.name, f"{spec.name} ({spec.unit})", list(spec.dimensions))
                        for spec in METRICS}

    def _emit(self, name: str, value: float, extra: tuple[str, ...] = ()) -> None:
        metric = self.metrics[name].labels(self.model_name, "Model", *extra)
        if isinstance(metric, Counter):
            metric.inc(value)
        elif isinstance(metric, Histogram):
            metric.observe(value)
        else:
            metric.set(value)


_NUMERIC = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
            "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}


class V2BodyAsJson:
    """ASGI middleware before kserve's v2 REST route, which reads a body as JSON only when the
    request says ``Content-Type: application/json`` and fails (500) on the binary tensor extension
    with non-UTF-8 BYTES, tritonclient's default for an image (``InferRequest.from_bytes``). Here a
    v2 infer body without the extension is marked JSON, and one with it becomes the same request
    in JSON (BYTES as base64, which the image input accepts)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not (
                path.startswith("/v2/models/") and path.endswith("/infer")):
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        length = dict(scope["headers"]).get(b"inference-header-content-length")
        if length is None:
            scope = dict(scope, headers=[*((k, v) for k, v in scope["headers"] if k != b"content-type"),
                                         (b"content-type", b"application/json")])
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            text = _binary_as_json(bytes(body), length.decode("latin-1"))
        except HandlerError as err:
            return await _send_json(send, err.status, json.dumps(error_body(err)).encode())
        headers = [(k, v) for k, v in headers if k != b"inference-header-content-length"]
        scope = dict(scope, headers=[*headers, (b"content-type", b"application/json"),
                                     (b"content-length", str(len(text)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": text, "more_body": False}

        return await self.app(scope, replay, send)


def _binary_as_json(body: bytes, header_length: str) -> bytes:
    import numpy as np

    from handler.oip import split_binary

    doc = split_binary(body, header_length)
    for tensor in doc["inputs"]:
        data = tensor.get("data")
        if isinstance(tensor.get("parameters"), dict):
            tensor["parameters"].pop("binary_data_size", None)
        if tensor.get("datatype") == "BYTES" and isinstance(data, list):
            tensor["data"] = [base64.b64encode(e).decode("ascii") if isinstance(e, bytes) else e for e in data]
        elif isinstance(data, (bytes, bytearray)):
            dtype = _NUMERIC.get(tensor.get("datatype"))
            if dtype is None:
                raise InvalidInput(f"binary v2 request: input {tensor.get('name')!r} has datatype "
                                   f"{tensor.get('datatype')!r}; send it as JSON", "inputs")
            tensor["data"] = np.frombuffer(bytes(data), dtype=dtype).tolist()
    return json.dumps(doc).encode()


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m handler.kserve_server",
        description="Serve a Grad-CAM model archive (.mar, or its unpacked folder) on KServe's Python "
                    "ModelServer: v1 and v2 REST on --http-port, v2 gRPC on --grpc-port.",
        epilog="Example: python -m handler.kserve_server model_store/efficientnet_lite0.mar\n"
               "  curl -s 127.0.0.1:8085/v2/health/ready\n"
               "  curl -s -X POST 127.0.0.1:8085/v1/models/efficientnet_lite0:predict "
               "-d '{\"instances\": [{\"image\": \"<base64>\"}]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("archive", help="a .mar file or an unpacked archive folder")
    p.add_argument("--model-name", default=None, help="name to serve under (default: the archive's own)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address both ports listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--http-port", type=int, default=8085, help="REST v1 and v2 port (default 8085)")
    p.add_argument("--grpc-port", type=int, default=8086, help="gRPC v2 port (default 8086; 0 turns gRPC off)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda:0 where CUDA is available, else cpu)")
    p.add_argument("--workdir", default=None,
                   help="where a .mar is unpacked (default: a folder under the system temp directory)")
    p.add_argument("--grace-period", type=int, default=30,
                   help="seconds SIGTERM waits for requests in flight (default 30)")
    p.add_argument("--grpc-threads", type=int, default=4, help="gRPC server threads (default 4)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # kserve parses the process's argv when it is imported: it must not see ours.
    sys.argv = sys.argv[:1]
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "gradcam-serve-archives")
    workdir.mkdir(parents=True, exist_ok=True)

    from handler.kserve_model import GradCamModel
    from handler.pipeline import Archive, unpack_archive

    try:
        archive = Archive.from_dir(unpack_archive(args.archive, workdir), args.model_name)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the archive {args.archive}: {exc}", file=sys.stderr)
        return 2
    model = GradCamModel(archive, device, PrometheusMetrics(archive.model_name))
    logger.info("loading %s from %s on %s", archive.model_name, args.archive, device)
    model.load()
    _LoopbackModelServer(args.host, http_port=args.http_port, grpc_port=args.grpc_port or 8086,
                         enable_grpc=bool(args.grpc_port), grace_period=args.grace_period,
                         max_threads=args.grpc_threads).start([model])
    return 0


def _server_classes():
    """kserve's ModelServer and GRPCServer, bound to one host instead of every interface."""
    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer

    from handler.kserve_model import Rejected, rejected_response

    class HostGRPCServer(GRPCServer):
        def __init__(self, host: str, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._host = host

        async def start(self, max_workers):
            from concurrent import futures

            from grpc import aio
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
            from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
            from kserve.protocol.grpc.servicer import InferenceServicer

            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", 32 * 1024 * 1024),
                         ("grpc.max_receive_message_length", 32 * 1024 * 1024)],
            )
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            address = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
            self._server.add_insecure_port(address)
            logger.info("gRPC v2 on %s", address)
            await self._server.start()
            await self._server.wait_for_termination()

    class LoopbackModelServer(ModelServer):
        def __init__(self, host: str, **kwargs) -> None:
            super().__init__(**kwargs)
            self.host = host

        def start(self, models) -> None:
            import asyncio

            self._register_and_check_atleast_one_model_is_ready(models)
            app.add_exception_handler(Rejected, rejected_response)
            app.add_middleware(V2BodyAsJson)
            self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                           self.http_port, grace_period=self.grace_period,
                                           timeout_keep_alive=self.timeout_keep_alive)
            self._rest_server.config.host = self.host
            logger.info("REST v1/v2 on %s:%d", self.host, self.http_port)
            self.servers.append(self._rest_server.start())
            if self.enable_grpc:
                self._grpc_server = HostGRPCServer(self.host, self.grpc_port, self.dataplane,
                                                   self.model_repository_extension, kwargs={},
                                                   grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start(self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    return LoopbackModelServer


def _LoopbackModelServer(host: str, **kwargs):
    return _server_classes()(host, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
