#!/usr/bin/env python3
"""Ask the Grad-CAM server for predictions and maps over gRPC.

Sends IMAGE to TorchServe's gRPC inference API (InferenceAPIsService.Predictions, port 7070 by
default) or, with --protocol v2, to KServe's Open Inference Protocol (GRPCInferenceService.ModelInfer,
on the same port when the server runs with ts_open_inference_protocol=true), and prints the
handler's JSON answer on stdout: the same JSON, options and maps as over HTTP.

Exit status: 0 answered; 1 the server answered with an error (the handler's JSON error, also
printed on stdout, or a gRPC status); 2 bad command line or unreadable image; 3 the server
cannot be reached. Every error is one line on stderr.

The gRPC stubs are generated from the protos inside the installed TorchServe's model-server.jar
(grpcio-tools), once, into .cache/grpc/ of this checkout, so they always match the server.

examples:
  # the server `make serve` started (address and token from config.properties and key_file.json)
  .venv/bin/gradcam-grpc tests/data/chelsea.jpg

  # options as in the HTTP API, one --option each
  .venv/bin/gradcam-grpc --address 127.0.0.1:7070 --token "$(scripts/ops/token.sh)" \\
      --model efficientnet_lite0 --option topk=3 --option outputs=map,heatmap tests/data/chelsea.jpg

  # KServe v2 (Open Inference Protocol) ModelInfer, options sent as named BYTES inputs
  .venv/bin/gradcam-grpc --protocol v2 --option topk=3 tests/data/chelsea.jpg
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from handler.tools.camclient import token_attached

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "grpc"
DEFAULT_MODEL = "efficientnet_lite0"
# The protos TorchServe 0.12 ships in its jar, and the Python modules protoc makes of them.
PROTOS = {"inference": "proto/inference.proto", "open_inference_grpc": "proto/open_inference_grpc.proto"}
MAX_MESSAGE = 64 * 1024 * 1024  # above TorchServe's max_response_size; gRPC's default is 4 MiB

EXIT_ANSWERED_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

__all__ = ["ClientError", "Answer", "load_stubs", "connect", "predict", "infer_v2", "main"]


class ClientError(Exception):
    """A failure to report on one line, with the exit status it means."""

    def __init__(self, message: str, exit_code: int = EXIT_ANSWERED_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Answer:
    """The handler's answer: its JSON text and, decoded, its object."""

    text: str
    body: object

    @property
    def error(self) -> str | None:
        """One line naming the handler's error, or None for a good answer."""
        body = self.body
        if isinstance(body, dict) and "error" in body and isinstance(body.get("status"), int):
            field = f" (field {body['field']})" if body.get("field") else ""
            return f"{body['status']} {body['error']}{field}: {body.get('message', '')}"
        return None


# ---------------------------------------------------------------------- stubs


def _jar() -> Path:
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise ClientError("TorchServe (the 'ts' package) is not installed: run scripts/ops/bootstrap.sh", EXIT_USAGE)
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise ClientError(f"TorchServe's frontend jar is missing: {jar}", EXIT_USAGE)
    return jar


def _generate(sources: dict[str, bytes], out: Path) -> None:
    """Write the protos into ``out`` and compile them there with grpcio-tools' protoc."""
    import grpc_tools
    from grpc_tools import protoc

    # google/protobuf/*.proto ship with grpcio-tools; google/rpc/status.proto with
    # googleapis-common-protos, whose status_pb2 the generated code imports.
    status = importlib.util.find_spec("google.rpc.status_pb2")
    if status is None:
        raise ClientError("googleapis-common-protos is not installed: run scripts/ops/bootstrap.sh", EXIT_USAGE)
    includes = [out, Path(grpc_tools.__file__).parent / "_proto", Path(status.origin).parents[2]]
    files = []
    for module, member in PROTOS.items():
        (out / f"{module}.proto").write_bytes(sources[member])
        files.append(f"{module}.proto")
    args = ["protoc", *(f"-I{path}" for path in includes), f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise ClientError(f"protoc failed on {', '.join(files)} from TorchServe's jar", EXIT_USAGE)


def load_stubs(cache: Path = CACHE) -> SimpleNamespace:
    """The generated message and service modules, made once per jar and grpcio-tools version.

    Returns:
        ``inference`` / ``inference_grpc`` (TorchServe's inference API) and ``oip`` / ``oip_grpc``
        (KServe's Open Inference Protocol) modules.
    """
    from google import protobuf

    jar = _jar()
    with zipfile.ZipFile(jar) as archive:
        sources = {member: archive.read(member) for member in PROTOS.values()}
    digest = hashlib.sha256()
    for member in sorted(sources):
        digest.update(member.encode() + b"\0" + sources[member])
    tools = importlib.metadata.version("grpcio-tools")
    digest.update(f"grpcio-tools {tools} protobuf {protobuf.__version__}".encode())
    folder = cache / digest.hexdigest()[:16]
    if not (folder / "inference_pb2_grpc.py").exists():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="stubs-", dir=cache))
        try:
            _generate(sources, staging)
            try:
                staging.rename(folder)  # atomic: a parallel run either wins or finds it done
            except OSError:
                if not (folder / "inference_pb2_grpc.py").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # The generated *_grpc modules import their *_pb2 by its bare name: each module is loaded from
    # the folder and registered under that name, message modules first.
    names = ("inference_pb2", "open_inference_grpc_pb2", "inference_pb2_grpc", "open_inference_grpc_pb2_grpc")
    modules = {name: _load_module(name, folder / f"{name}.py") for name in names}
    return SimpleNamespace(
        folder=folder,
        inference=modules["inference_pb2"],
        inference_grpc=modules["inference_pb2_grpc"],
        oip=modules["open_inference_grpc_pb2"],
        oip_grpc=modules["open_inference_grpc_pb2_grpc"],
    )


def _load_module(name: str, path: Path):
    """The module at ``path``, imported once under ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ---------------------------------------------------------------------- calls


def connect(address: str):
    """An insecure channel that accepts answers as large as TorchServe may send."""
    import grpc

    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    return grpc.insecure_channel(address, options=options)


def _metadata(token: str | None) -> list[tuple[str, str]]:
    # TorchServe's GRPCInterceptor reads the key from the "authorization" metadata entry.
    return [("authorization", f"Bearer {token}")] if token else []


def _rpc_error(exc, address: str, what: str) -> ClientError:
    import grpc

    code, details = exc.code(), (exc.details() or "").strip()
    # TorchServe's own failures name its Java exception on a second line; drop it.
    from_server = "org.pytorch.serve" in details
    details = details.splitlines()[0] if details else ""
    if code == grpc.StatusCode.UNAVAILABLE and not from_server:
        return ClientError(f"cannot reach {what} at {address} ({details}); is TorchServe running (make serve)?",
                           EXIT_UNREACHABLE)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ClientError(f"the server refused the token: {details} Pass the inference key with --token "
                           "(scripts/ops/token.sh prints it).")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ClientError(f"{address} does not serve {what} ({details}); KServe v2 over gRPC needs a TorchServe "
                           "started with ts_open_inference_protocol=true")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"no answer from {address} in time ({details})")
    return ClientError(f"the server failed the call: {code.name}: {details}")


def _answer(data: bytes) -> Answer:
    text = data.decode("utf-8", errors="replace")
    try:
        return Answer(text, json.loads(text))
    except json.JSONDecodeError as exc:
        raise ClientError(f"the server's answer is not JSON ({exc}): {text[:200]!r}") from exc


def predict(stubs, channel, model: str, image: bytes, options: dict[str, str], token: str | None = None,
            timeout: float = 120.0, address: str = "") -> Answer:
    """One call to TorchServe's InferenceAPIsService.Predictions.

    The image and each option are entries of the request's ``input`` map, which reach the handler
    as one request item (like multipart fields over HTTP).

    Raises:
        ClientError: a gRPC status other than OK, with the exit status it means.
    """
    import grpc

    request = stubs.inference.PredictionsRequest(
        model_name=model, input={"image": image, **{k: v.encode() for k, v in options.items()}})
    stub = stubs.inference_grpc.InferenceAPIsServiceStub(channel)
    try:
        reply = stub.Predictions(request, metadata=_metadata(token), timeout=timeout)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, address, "TorchServe's gRPC inference API") from exc
    return _answer(reply.prediction)


def _unquote(data: bytes) -> bytes:
    """TorchServe 0.12 writes a BYTES output element as its JSON literal (Gson's toString):
    a string arrives quoted and escaped; undo that."""
    if data[:1] == b'"':
        try:
            return json.loads(data).encode("utf-8")
        except (json.JSONDecodeError, AttributeError):
            pass
    return data


def infer_v2(stubs, channel, model: str, image: bytes, options: dict[str, str], token: str | None = None,
             timeout: float = 120.0, address: str = "") -> Answer:
    """One call to KServe's GRPCInferenceService.ModelInfer as TorchServe 0.12 serves it.

    The image is the BYTES input ``image``; each option is a BYTES input of its own name, since
    TorchServe 0.12 drops ModelInfer's ``parameters`` before the handler sees the request.

    Raises:
        ClientError: a gRPC status other than OK, or an answer without the ``image`` output.
    """
    import grpc

    oip = stubs.oip

    def tensor(name: str, value: bytes):
        contents = oip.InferTensorContents(bytes_contents=[value])
        return oip.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=[1], contents=contents)

    inputs = [tensor("image", image), *(tensor(k, v.encode()) for k, v in options.items())]
    stub = stubs.oip_grpc.GRPCInferenceServiceStub(channel)
    try:
        reply = stub.ModelInfer(oip.ModelInferRequest(model_name=model, inputs=inputs),
                                metadata=_metadata(token), timeout=timeout)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, address, "KServe's Open Inference Protocol over gRPC") from exc
    for output in reply.outputs:
        if output.datatype == "BYTES" and output.contents.bytes_contents:
            return _answer(_unquote(output.contents.bytes_contents[0]))
    names = ", ".join(o.name for o in reply.outputs) or "none"
    raise ClientError(f"the v2 answer has no BYTES output with the handler's JSON (outputs: {names})")


# ---------------------------------------------------------------------- command line


def _properties(path: Path) -> dict[str, str]:
    props = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                props[key.strip()] = value.strip()
    return props


def default_address() -> str:
    """grpc_inference_address:grpc_inference_port of this checkout's config.properties."""
    props = _properties(ROOT / "config.properties")
    return f"{props.get('grpc_inference_address', '127.0.0.1')}:{props.get('grpc_inference_port', '7070')}"


def default_token() -> str | None:
    """The inference key in this checkout's key_file.json (written by `make serve`), if any."""
    try:
        return json.loads((ROOT / "key_file.json").read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _option(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. topk=3), got {text!r}")
    return name.strip(), value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc, examples = __doc__.split("examples:")
    p = argparse.ArgumentParser(description=doc, epilog="examples:" + examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file (JPEG, PNG, GIF, WebP, BMP, TIFF), or - for standard input")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help=f"gRPC inference address (default: config.properties', now {default_address()})")
    p.add_argument("--token", default=None,
                   help="inference key, sent as 'authorization: Bearer KEY' (default: key_file.json's, "
                        "written by make serve; scripts/ops/token.sh prints it)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a request option: topk, cam_classes, cam_method, outputs or quality (repeatable)")
    p.add_argument("--protocol", choices=("torchserve", "v2"), default="torchserve",
                   help="torchserve: InferenceAPIsService.Predictions (default); v2: KServe's "
                        "GRPCInferenceService.ModelInfer (server needs ts_open_inference_protocol=true)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds to wait (default: 120)")
    return p.parse_args(token_attached(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    address = args.address or default_address()
    token = args.token if args.token is not None else default_token()
    try:
        try:
            image = sys.stdin.buffer.read() if args.image == "-" else Path(args.image).read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read the image {args.image}: {exc.strerror}", EXIT_USAGE) from exc
        stubs = load_stubs()
        call = infer_v2 if args.protocol == "v2" else predict
        with connect(address) as channel:
            answer = call(stubs, channel, args.model, image, dict(args.option), token, args.timeout, address)
        print(answer.text)
        if answer.error:
            raise ClientError(f"the server answered {answer.error}")
    except ClientError as exc:
        print(f"grpc_client: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
