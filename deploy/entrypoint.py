#!/usr/bin/env python3
"""The container's entry point: runs TorchServe in the foreground, answers the probes, drains.

Subcommands (the image runs ``serve``; Kubernetes probes and the preStop hook run the others in
the same container):

  serve      start TorchServe (``torchserve --start --foreground``) and stay its parent; scale
             workers to TS_WORKERS; on SIGTERM/SIGINT drain (wait until no request is in flight on
             the inference port, at most TS_DRAIN_TIMEOUT_S), then stop TorchServe.
  torchserve [--start] [--foreground] [--ncs] [--model-store DIR] [--ts-config FILE]
             ``serve`` with TorchServe's own command line, as KServe's TorchServe runtime passes it
             to the image (``torchserve --start --model-store=/mnt/models/model-store
             --ts-config=/mnt/models/config/config.properties``): the two paths replace
             TS_MODEL_STORE and TS_CONFIG_FILE, and TorchServe runs in the foreground all the same.
  ready      exit 0 when every model's workers are READY (and on a GPU when TS_EXPECT_GPU=true):
             the startup probe. TorchServe's /ping says Healthy while workers are still loading.
  drain      the preStop hook: wait TS_DRAIN_DELAY_S for the endpoint removal to reach every
             proxy, then until no request is in flight (at most TS_DRAIN_TIMEOUT_S).
  ping       exit 0 when TorchServe's /ping answers 200 (the image's HEALTHCHECK).
  inflight   print the number of requests in flight on the inference port.

Why a drain: TorchServe 0.12 does not drain on SIGTERM. Its shutdown hook closes the listening
sockets and the event loops at once, and requests in flight lose their connection. A request in
flight is counted from the kernel's view of the inference port: an established connection that
received data after it last sent any (Linux sock_diag over netlink; no privilege, no extra package).

Environment: TS_CONFIG_FILE (config.properties; default: the one beside this file),
TS_MODEL_STORE (default: the config's model_store), TS_LOG_CONFIG (log4j2 file; default: the one
beside this file), TS_WORKDIR (TorchServe's working directory; default /tmp/torchserve),
TS_WORKERS, TS_EXPECT_GPU, TS_DRAIN_DELAY_S (5), TS_DRAIN_TIMEOUT_S (130), TS_STOP_TIMEOUT_S (20).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["Settings", "inflight", "wait_idle", "check_ready", "serve", "torchserve_cli", "main"]

HERE = Path(__file__).resolve().parent
log = logging.getLogger("entrypoint")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, got {value!r}") from None


def _properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def _local_url(address: str) -> str:
    """http://0.0.0.0:8080 -> http://127.0.0.1:8080 (the probes run inside the container)."""
    parts = urlsplit(address)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{parts.scheme}://{host}:{parts.port}"


class Settings:
    """What the subcommands need, read once from the environment and config.properties."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.config = Path(env.get("TS_CONFIG_FILE") or HERE / "config.properties")
        if not self.config.is_file():
            raise SystemExit(f"TS_CONFIG_FILE: no config.properties at {self.config}")
        props = _properties(self.config)
        self.props = props
        self.model_store = Path(env.get("TS_MODEL_STORE") or props.get("model_store", "model-store"))
        log_config = env.get("TS_LOG_CONFIG", str(HERE / "log4j2.xml"))
        self.log_config = Path(log_config) if log_config else None
        self.workdir = Path(env.get("TS_WORKDIR") or "/tmp/torchserve")
        if "inference_address" not in props or "management_address" not in props:
            raise SystemExit(f"{self.config} must set inference_address and management_address")
        self.inference_url = _local_url(props["inference_address"])
        self.management_url = _local_url(props["management_address"])
        self.inference_port = urlsplit(props["inference_address"]).port
        workers = env.get("TS_WORKERS", "")
        if workers and not (workers.isdigit() and int(workers) > 0):
            raise SystemExit(f"TS_WORKERS must be a positive whole number, got {workers!r}")
        self.workers = int(workers) if workers else None
        self.expect_gpu = env.get("TS_EXPECT_GPU", "").lower() in ("1", "true", "yes")
        self.drain_delay = _env_float("TS_DRAIN_DELAY_S", 5.0)
        self.drain_timeout = _env_float("TS_DRAIN_TIMEOUT_S", 130.0)
        self.stop_timeout = _env_float("TS_STOP_TIMEOUT_S", 20.0)
        self.token_auth = props.get("disable_token_authorization", "false").lower() != "true"


# ---------------------------------------------------------------------------------- in flight

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_INFO = 2
_TCP_ESTABLISHED = 1
# struct tcp_info offsets (linux/tcp.h): last_data_sent, last_data_recv (ms ago, u32);
# bytes_received (u64) and bytes_sent (u64, Linux 4.19+).
_LAST_SENT, _LAST_RECV, _BYTES_RECEIVED, _BYTES_SENT = 44, 52, 128, 200


def _pending(rqueue: int, info: bytes) -> bool:
    """Whether an established connection holds a request that has not been answered yet."""
    if rqueue > 0:
        return True
    if len(info) >= _BYTES_SENT + 8:
        received = struct.unpack_from("=Q", info, _BYTES_RECEIVED)[0]
        sent = struct.unpack_from("=Q", info, _BYTES_SENT)[0]
        if received and not sent:  # a request, no response yet (same millisecond as the handshake)
            return True
    if len(info) >= _LAST_RECV + 4:
        last_sent = struct.unpack_from("=I", info, _LAST_SENT)[0]
        last_recv = struct.unpack_from("=I", info, _LAST_RECV)[0]
        return last_recv < last_sent  # data arrived after the last response went out
    return False


def _dump_established(family: int) -> list[tuple[int, int, bytes]]:
    """(local port, receive queue, tcp_info) of every established TCP socket of this network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        # struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
        req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1),
                          1 << _TCP_ESTABLISHED) + bytes(48)
        nl.sendto(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
                  + req, (0, 0))
        found = []
        while True:
            data, off = nl.recv(1 << 16), 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    raise OSError("sock_diag dump failed")
                msg = data[off + 16:off + length]
                local_port = struct.unpack_from("!H", msg, 4)[0]  # inet_diag_msg.id.sport
                rqueue = struct.unpack_from("=I", msg, 60)[0]
                info, attr = b"", 72  # attributes follow the 72-byte inet_diag_msg
                while attr + 4 <= len(msg):
                    attr_len, attr_type = struct.unpack_from("=HH", msg, attr)
                    if attr_len < 4:
                        break
                    if attr_type == _INET_DIAG_INFO:
                        info = msg[attr + 4:attr + attr_len]
                    attr += (attr_len + 3) & ~3
                found.append((local_port, rqueue, info))
                off += (length + 3) & ~3
            if not data:
                return found


def inflight(port: int) -> int:
    """Requests in flight on a local TCP port: established connections with an unanswered request."""
    count = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        for local_port, rqueue, info in _dump_established(family):
            if local_port == port and _pending(rqueue, info):
                count += 1
    return count


def wait_idle(port: int, timeout: float, settle: float = 1.0, poll: float = 0.1) -> bool:
    """Wait until no request has been in flight on ``port`` for ``settle`` seconds; False on timeout."""
    deadline = time.monotonic() + timeout
    idle_since = None
    last_logged = None
    while True:
        now = time.monotonic()
        busy = inflight(port)
        if busy:
            idle_since = None
            if last_logged is None or now - last_logged >= 5:
                log.info("draining: %d request(s) in flight on port %d", busy, port)
                last_logged = now
        elif idle_since is None:
            idle_since = now
        if idle_since is not None and now - idle_since >= settle:
            return True
        if now >= deadline:
            log.warning("drain timeout after %.0fs: %d request(s) still in flight", timeout, busy)
            return False
        time.sleep(poll)


# ---------------------------------------------------------------------------------- ready

def _get_json(url: str, settings: Settings, timeout: float = 5.0) -> object:
    headers = {}
    key_file = settings.workdir / "key_file.json"
    if settings.token_auth and key_file.exists():
        headers["Authorization"] = "Bearer " + json.loads(key_file.read_text())["management"]["key"]
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return json.load(resp)


def check_ready(settings: Settings) -> str | None:
    """None when every model's workers are READY (on a GPU if expected), else the reason."""
    try:
        models = _get_json(f"{settings.management_url}/models", settings)["models"]
    except (OSError, ValueError, KeyError) as exc:
        return f"management API not answering at {settings.management_url}: {exc}"
    if not models:
        return f"no model registered: is the model store {settings.model_store} empty?"
    for entry in models:
        name = entry["modelName"]
        try:
            described = _get_json(f"{settings.management_url}/models/{name}", settings)[0]
        except (OSError, ValueError, IndexError) as exc:
            return f"cannot describe {name}: {exc}"
        workers = described.get("workers", [])
        wanted = max(described.get("minWorkers", 1), settings.workers or 0)
        ready = [w for w in workers if w.get("status") == "READY"]
        if len(ready) < wanted:
            return f"{name}: {len(ready)} of {wanted} workers READY"
        if settings.expect_gpu and not all(w.get("gpu") for w in ready):
            return (f"{name}: workers run on the CPU but TS_EXPECT_GPU is set: TorchServe found no GPU "
                    "(nvidia-smi missing? NVIDIA_DRIVER_CAPABILITIES must include utility)")
    return None


def _scale_workers(settings: Settings, stop: threading.Event) -> None:
    """Set every model's worker count to TS_WORKERS once the server has registered them.

    An archive's model-config.yaml (minWorkers/maxWorkers) wins over config.properties in
    TorchServe 0.12, so the per-deployment count goes through the management API instead.
    """
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            models = _get_json(f"{settings.management_url}/models", settings)["models"]
        except (OSError, ValueError, KeyError):
            models = []
        if models:
            for entry in models:
                name, n = entry["modelName"], settings.workers
                url = f"{settings.management_url}/models/{name}?min_worker={n}&max_worker={n}"
                try:
                    with urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=30) as resp:
                        log.info("%s: scaling to %d workers (%d)", name, n, resp.status)
                except OSError as exc:
                    log.error("%s: scaling to %d workers failed: %s", name, n, exc)
            return
        stop.wait(1.0)
    log.error("no model registered within 600 s: TS_WORKERS=%s not applied", settings.workers)


# ---------------------------------------------------------------------------------- serve

def _java_pid(launcher: subprocess.Popen, tmpdir: str) -> int | None:
    """TorchServe's frontend (java) pid, from the pid file its launcher writes into $TEMP."""
    try:
        return int((Path(tmpdir) / ".model_server.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def serve(settings: Settings) -> int:
    """Run TorchServe until it exits (its exit status) or a stop signal (drain, stop, 0)."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    if not settings.model_store.is_dir():
        log.error("model store %s does not exist: bake archives into the image or mount a volume there",
                  settings.model_store)
        return 2
    tmpdir = os.environ.get("TEMP") or tempfile.gettempdir()
    env = dict(os.environ, TEMP=tmpdir, TMPDIR=tmpdir)
    env.setdefault("LOG_LOCATION", str(settings.workdir / "logs"))
    env.setdefault("METRICS_LOCATION", env["LOG_LOCATION"])
    cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
           "--ts-config", str(settings.config), "--model-store", str(settings.model_store), "--ncs"]
    if settings.log_config and settings.log_config.is_file():
        cmd += ["--log-config", str(settings.log_config)]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    log.info("starting TorchServe: %s", " ".join(cmd))
    # Its own session: the last resort below kills the launcher, java and workers as one group.
    launcher = subprocess.Popen(cmd, cwd=settings.workdir, env=env, start_new_session=True)
    if settings.workers:
        threading.Thread(target=_scale_workers, args=(settings, stop), daemon=True).start()

    is_init = os.getpid() == 1
    while not stop.is_set():
        if launcher.poll() is not None:
            log.error("TorchServe exited with %s", launcher.returncode)
            return launcher.returncode or 1
        if is_init:  # PID 1 adopts orphans: reap them (never the launcher, which Popen owns)
            _reap_orphans(launcher.pid)
        stop.wait(0.2)

    log.info("stop requested: waiting for requests in flight on port %d (at most %.0fs)",
             settings.inference_port, settings.drain_timeout)
    wait_idle(settings.inference_port, settings.drain_timeout)
    java = _java_pid(launcher, tmpdir)
    log.info("stopping TorchServe (java pid %s)", java)
    try:
        os.kill(java or launcher.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        launcher.wait(timeout=settings.stop_timeout)
    except subprocess.TimeoutExpired:
        log.warning("TorchServe did not stop in %.0fs: killing it", settings.stop_timeout)
    try:  # workers or a hung frontend left behind
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()
    log.info("stopped")
    return 0


def _reap_orphans(keep: int) -> None:
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == keep:
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                os.waitpid(int(entry.name), os.WNOHANG)
    except (OSError, ChildProcessError):
        pass


# ---------------------------------------------------------------------------------- CLI

_TS_FLAGS = ("--start", "--foreground", "--ncs", "--no-config-snapshots")
_TS_PATHS = {"--model-store": "TS_MODEL_STORE", "--ts-config": "TS_CONFIG_FILE"}


def torchserve_cli(args: list[str]) -> dict[str, str]:
    """The environment that TorchServe's own command line asks for: ``--model-store DIR`` and
    ``--ts-config FILE`` (or ``--model-store=DIR``...); ``--start``, ``--foreground`` and ``--ncs``
    are accepted and change nothing. Anything else raises ValueError naming it."""
    env, rest = {}, list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if arg in _TS_FLAGS:
            continue
        if name in _TS_PATHS:
            if not eq:
                if not rest or rest[0].startswith("--"):
                    raise ValueError(f"{name} needs a path")
                value = rest.pop(0)
            env[_TS_PATHS[name]] = value
            continue
        raise ValueError(f"unsupported TorchServe option {arg!r}: this image takes only "
                         f"{', '.join((*_TS_FLAGS, *_TS_PATHS))}")
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "serve"
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [entrypoint] %(message)s", stream=sys.stderr)
    if command == "torchserve":
        try:
            paths = torchserve_cli(argv[1:])
        except ValueError as exc:
            print(f"torchserve: {exc}", file=sys.stderr)
            return 2
        for key, value in paths.items():
            if os.environ.get(key, value) != value:
                log.warning("%s=%s from the command line replaces %s from the environment (the probes, "
                            "which read the environment, will not see it)", key, value, os.environ[key])
        os.environ.update(paths)
        command = "serve"
    settings = Settings()
    if command == "serve":
        return serve(settings)
    if command == "ready":
        reason = check_ready(settings)
        if reason:
            print(f"not ready: {reason}", file=sys.stderr)
            return 1
        return 0
    if command == "ping":
        try:
            with urllib.request.urlopen(f"{settings.inference_url}/ping", timeout=4) as resp:
                return 0 if resp.status == 200 else 1
        except OSError as exc:
            print(f"/ping failed: {exc}", file=sys.stderr)
            return 1
    if command == "drain":
        time.sleep(settings.drain_delay)  # let the endpoint removal reach every proxy first
        return 0 if wait_idle(settings.inference_port, settings.drain_timeout) else 1
    if command == "inflight":
        print(inflight(settings.inference_port))
        return 0
    print(f"unknown command {command!r}: use serve, torchserve, ready, ping, drain or inflight (--help)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
