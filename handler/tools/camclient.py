"""HTTP client of the Grad-CAM endpoint (handler/tools/explain.py), and the clients' ``--token`` parsing.

Each photo travels as the request body with the options as headers (TorchServe drops query
strings, and its frontend takes a raw body for far less CPU than a multipart form); where an
option value does not fit a header, as a multipart form with the options as fields. A 503 (TorchServe's job
queue is full, or the model has no worker yet), a 507 (the worker died with the batch, or the
batch ran out of device memory) and a dropped connection are retried with full-jitter
exponential backoff, a bounded number of times: a prediction changes nothing on the server, so
a retry is safe. Answers that would repeat for every photo (the token refused, the model not
served, an option refused) raise :class:`Fatal` at once.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

__all__ = ["Client", "Fatal", "Result", "RETRY_STATUSES", "token_attached"]

RETRY_STATUSES = frozenset({503, 507})
_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 8.0
# TorchServe 0.12 keys expire token_expiration_min after they are made (60 by default), and an
# expired key gets the same answer as a wrong one.
_TOKEN_HINT = "a wrong key, or an expired one: TorchServe's keys last token_expiration_min, 60 minutes by default"


def token_attached(argv: list[str] | None) -> list[str]:
    """A command line with ``--token KEY`` as ``--token=KEY``: TorchServe's keys are URL-safe
    base64, one in 64 starts with '-', and argparse takes such a value for an option."""
    rest, out = list(sys.argv[1:] if argv is None else argv), []
    while rest:
        arg = rest.pop(0)
        out.append(f"{arg}={rest.pop(0)}" if arg == "--token" and rest else arg)
    return out


class Fatal(Exception):
    """Nothing can succeed (server unreachable, token refused, model or option unknown): exit 2."""


@dataclass
class Result:
    """The outcome of one request: the server's answer, or why there is none."""

    status: int | None = None  # HTTP status; None when there was no answer
    body: dict | None = None  # the JSON answer (success or the server's error)
    error: str | None = None  # one line for the user when not ok
    latency_ms: float = 0.0  # round trip of the last attempt
    attempts: int = 0
    retried: Counter = field(default_factory=Counter)  # why earlier attempts were retried

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def _server_error(r: requests.Response) -> tuple[dict | None, str]:
    """The JSON error body (ours or TorchServe's) and a one-line description of it."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:  # the handler's: error, message, status, field
        where = f" ({body['field']})" if body.get("field") else ""
        return body, f"{body['error']}{where}: {body.get('message', '')}"
    if isinstance(body, dict) and "type" in body:  # TorchServe's frontend: code, type, message
        return body, f"{body['type']}: {body.get('message', '')}"
    text = " ".join(r.text.split())[:200]
    return body if isinstance(body, dict) else None, f"{r.status_code} {r.reason}" + (f": {text}" if text else "")


def _fatal_answer(body: dict | None, what: str, url: str, model: str) -> Fatal | None:
    """The answers that would repeat for every photo: stop the run on the first."""
    kind = (body or {}).get("type")
    if kind == "InvalidKeyException":
        return Fatal(f"the server at {url} refused the token ({what}; {_TOKEN_HINT})")
    if kind == "ModelNotFoundException":
        return Fatal(f"the server at {url} does not serve the model {model!r} ({what}); pick one with --model")
    if (body or {}).get("error") == "invalid_option":
        return Fatal(f"the server refused an option: {what}")
    return None


class Client:
    """POSTs photos (raw bodies, options as headers; multipart where an option does not fit a
    header); retries what is worth retrying.

    One ``requests.Session`` per thread (keep-alive connections, no shared state).
    """

    def __init__(self, url: str, model: str, token: str | None, retries: int, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.timeout = timeout
        self.stop = threading.Event()  # set on a fatal answer: requests not yet sent are skipped
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def ping(self, token_source: str) -> str | None:
        """Check the server and token once before any photo; a warning, or None when healthy."""
        try:
            r = requests.get(f"{self.url}/ping", headers=self.headers, timeout=min(self.timeout, 30))
        except requests.ConnectionError as exc:
            raise Fatal(f"cannot reach the server at {self.url} ({_reason(exc)}); is it running? "
                        "`make serve` starts it") from exc
        except requests.Timeout as exc:
            raise Fatal(f"the server at {self.url} did not answer /ping in time") from exc
        body, what = _server_error(r) if r.status_code != 200 else (None, "")
        if (body or {}).get("type") == "InvalidKeyException":
            raise Fatal(f"the server at {self.url} refused the token from {token_source}: {what} ({_TOKEN_HINT})")
        if r.status_code == 200:
            return None
        if r.status_code == 500:  # TorchServe: a model has no READY worker yet; requests may 503
            return f"/ping says the server is not healthy yet ({what}); going on, 503s will be retried"
        raise Fatal(f"{self.url}/ping answered {what}; is --url a TorchServe inference address?")

    def _body(self, path: Path, data: bytes, fields: dict[str, str]) -> dict:
        """The photo as the request body and the options as headers, where every option fits a
        header (printable ASCII): TorchServe's frontend takes a raw body for a fraction of the CPU
        a multipart form costs it (3-4 ms against 9-12 ms for a 2 MB photo). A multipart form
        otherwise, which carries any value."""
        if all(v.isascii() and v.isprintable() and v == v.strip() for v in fields.values()):
            return {"data": data, "headers": {**self.headers, **fields, "Content-Type": "application/octet-stream"}}
        return {"files": {"image": (path.name, data)}, "data": fields, "headers": self.headers}

    def explain(self, path: Path, fields: dict[str, str]) -> Result:
        """One photo, with retries; never raises except :class:`Fatal`."""
        result = Result()
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.error = f"cannot read: {exc.strerror or exc}"
            return result
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                result.error = "skipped: the run stopped"
                return result
            result.attempts = attempt + 1
            started = time.perf_counter()
            retry_after = None
            try:
                r = self._session().post(f"{self.url}/predictions/{self.model}", timeout=self.timeout,
                                         **self._body(path, data, fields))
            except requests.Timeout:
                result.error = f"no answer in {self.timeout:g} s"
                return result
            except requests.ConnectionError as exc:
                reason = _reason(exc)
                result.status, result.body, result.error = None, None, f"{reason} (after {attempt + 1} attempts)"
                if attempt == self.retries and "refused" in reason:
                    self.stop.set()
                    raise Fatal(f"the server at {self.url} stopped answering: {reason}") from exc
            else:
                result.latency_ms = (time.perf_counter() - started) * 1000
                result.status = r.status_code
                if r.status_code == 200:
                    try:
                        result.body, result.error = r.json(), None
                    except ValueError:
                        result.error = f"200 but not JSON: {r.text[:120]!r}"
                    return result
                result.body, what = _server_error(r)
                fatal = _fatal_answer(result.body, what, self.url, self.model)
                if fatal:
                    self.stop.set()
                    raise fatal
                result.error = what
                if r.status_code not in RETRY_STATUSES:
                    return result
                reason = str(r.status_code)
                retry_after = r.headers.get("Retry-After")
                if attempt == self.retries:
                    result.error = f"{what} (after {attempt + 1} attempts)"
            if attempt < self.retries:
                result.retried[reason] += 1
                self.stop.wait(_backoff(attempt, retry_after))
        return result


def _reason(exc: Exception) -> str:
    """A short name for a connection failure: refused, reset, closed, ..."""
    text = repr(exc)
    for needle, name in (("Connection refused", "connection refused"), ("reset", "connection reset"),
                         ("RemoteDisconnected", "connection closed without an answer"),
                         ("Broken pipe", "connection closed while sending"),
                         ("Name or service not known", "unknown host"), ("No route to host", "no route to host")):
        if needle in text:
            return name
    return f"connection failed: {type(exc).__name__}"


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Full-jitter exponential backoff (AWS's "full jitter"), at least Retry-After when given."""
    delay = random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt + 1)))
    if retry_after and retry_after.strip().isdigit():
        delay = max(delay, min(float(retry_after), _BACKOFF_CAP_S))
    return delay
