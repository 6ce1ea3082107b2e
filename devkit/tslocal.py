"""Start and stop a private TorchServe on free loopback ports (tests, benchmarks, load tests).

Each server gets its own working directory (its key_file.json and logs/), its own short temp
directory (pid file and worker sockets), free ports, and the settings of the repo's
``config.properties`` with only addresses, store and models replaced. It is stopped by its
process group, never by name.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

__all__ = ["LocalServer", "free_port", "ROOT"]

ROOT = Path(__file__).resolve().parent.parent
_ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")


def default_mar() -> Path:
    """model_store/efficientnet_lite0.mar, built (or rebuilt, as ``make serve`` does) when it is
    missing or older than the handler package or the archiver."""
    mar = ROOT / "model_store" / "efficientnet_lite0.mar"
    sources = [*(ROOT / "handler").glob("*.py"), *(ROOT / "handler" / "tools").glob("archive*.py")]
    if not mar.exists() or any(src.stat().st_mtime > mar.stat().st_mtime for src in sources):
        subprocess.run([sys.executable, "-m", "handler.tools.archive", "--force"], check=True)
    return mar


_issued: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bound(port: int) -> int | None:
    """The port a loopback socket gets when it binds ``port`` (0: the kernel's choice); None if taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]


def _port_slot() -> tuple[int, int]:
    """(this process's residue, the modulus) for :func:`free_port`: (0, 1) outside pytest-xdist."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0:
        return int(worker[2:]) % int(count), int(count)
    return 0, 1


def free_port() -> int:
    """A TCP port that is free on loopback right now, never the same one twice in a process.

    A server binds its ports seconds after they are picked (JVM start-up), so the port must stay
    free meanwhile. Ports the kernel hands out with ``bind(0)`` come from the ephemeral range, the
    same range every outgoing connection's source port comes from: a readiness poll or a client of
    another server could take one first (CI once saw TorchServe's gRPC port "already in use").
    So the port is drawn at random from the 10000 ports below that range, where only listeners
    go, and checked by binding it; the kernel's choice is the fallback for an unusual or crowded
    range.

    Processes that pick ports side by side (pytest-xdist workers: ``pytest -n 2``) each draw from
    their own residue class: two of them could otherwise pick one port within a JVM's start-up.
    The worker's number and the count come from ``PYTEST_XDIST_WORKER`` (``gw0``, ``gw1``...) and
    ``PYTEST_XDIST_WORKER_COUNT``.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    slot, slots = _port_slot()
    below = ([low - 10000 + slot + slots * rng.randrange(10000 // slots) for _ in range(200)]
             if low > 11024 else [])
    for wanted in itertools.chain(below, itertools.repeat(0)):  # endless: returns from inside
        port = _bound(wanted)
        if port is not None and port not in _issued:
            _issued.add(port)
            return port


def _properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


class LocalServer:
    """A TorchServe serving ``models`` (archive file names) from ``model_store``.

    Args:
        model_store: folder with the ``.mar`` files.
        models: archive file names to load at start-up.
        workdir: where the server runs (key_file.json, logs/).
        overrides: extra or replaced config.properties entries.
        env: extra environment variables for the server and its workers.
        plain: start from a plain config.properties (addresses, model store and models only, as a
            user's own server has) instead of the repo's.
        config: the config.properties to start from (default: the repo's).
        launcher: a command that starts TorchServe in the foreground instead of ``torchserve``
            (the container's entry point); it gets the config and store as TS_CONFIG_FILE and
            TS_MODEL_STORE, and its working directory as TS_WORKDIR.
    """

    def __init__(self, model_store: Path, models: list[str], workdir: Path,
                 overrides: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 config: Path | None = None, launcher: list[str] | None = None, plain: bool = False) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher
        self.props = {} if plain else _properties(config or ROOT / "config.properties")
        ports = {key: free_port() for key in _ADDRESS_KEYS}
        for key, port in ports.items():
            self.props[key] = f"http://127.0.0.1:{port}"
        self.props.update(
            grpc_inference_port=str(free_port()), grpc_management_port=str(free_port()),
            model_store=str(self.model_store), load_models=",".join(models),
        )
        if "metrics_config" in self.props:  # relative to the repo, where config.properties lives
            self.props["metrics_config"] = str(ROOT / self.props["metrics_config"])
        self.props.update(overrides or {})
        self.env = dict(env or {})
        self.url = self.props["inference_address"]
        self.management_url = self.props["management_address"]
        self.metrics_url = self.props["metrics_address"]
        self.proc: subprocess.Popen | None = None
        self.tmp = None

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 240.0, ready: list[str] | None = None) -> LocalServer:
        """Start in the foreground of a new process group and wait for the models' workers.

        Args:
            timeout: seconds to wait.
            ready: model names to wait for (default: every model loaded at start-up).
        """
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))
        # Short private temp dir: unix socket paths must stay under ~100 characters.
        self.tmp = tempfile.mkdtemp(prefix="gcs-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # archives are self-contained
        env.update(self.env)
        env.update(TEMP=self.tmp, TMPDIR=self.tmp)
        bindir = Path(sys.executable).parent
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        self.log = open(self.workdir / "torchserve.out", "wb")
        cmd = [str(bindir / "torchserve"), "--start", "--foreground", "--ts-config", str(config),
               "--model-store", str(self.model_store), "--ncs"]
        if self.launcher:
            cmd = list(self.launcher)
            env.update(TS_CONFIG_FILE=str(config), TS_MODEL_STORE=str(self.model_store),
                       TS_WORKDIR=str(self.workdir))
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready(timeout, ready)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float, ready: list[str] | None) -> None:
        deadline = time.monotonic() + timeout
        pending = list(ready) if ready is not None else [m.removesuffix(".mar") for m in self.models]
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"models {pending} not ready in {timeout:.0f}s:\n{self.log_tail()}")
            if not self.token_auth or (self.workdir / "key_file.json").exists():
                try:
                    pending = [m for m in pending if self.worker_status(m) != "READY"]
                except json.JSONDecodeError:  # the server is still writing key_file.json
                    pass
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server's whole process group (frontend and workers)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # A launcher runs TorchServe in a process group of its own: never leave that one behind.
        java = self.frontend_pid() if self.launcher else None
        if java is not None:
            try:
                os.killpg(os.getpgid(java), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
        self.log.close()

    def frontend_pid(self) -> int | None:
        """The pid of this server's TorchServe frontend (java) while it runs, from its pid file."""
        try:
            pid = int((Path(self.tmp) / ".model_server.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError, TypeError):
            return None
        return pid if b"org.pytorch.serve.ModelServer" in cmdline else None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ access

    def keys(self) -> dict:
        return json.loads((self.workdir / "key_file.json").read_text())

    @property
    def token(self) -> str:
        """The inference key, as clients send it: ``Authorization: Bearer <token>``."""
        return self.keys()["inference"]["key"]

    @property
    def grpc_address(self) -> str:
        """HOST:PORT of the gRPC inference API (and of KServe's v2 gRPC service when enabled)."""
        return f"{self.props.get('grpc_inference_address', '127.0.0.1')}:{self.props['grpc_inference_port']}"

    @property
    def management_token(self) -> str:
        return self.keys()["management"]["key"]

    @property
    def token_auth(self) -> bool:
        """Whether the server checks tokens (TorchServe's default; off with disable_token_authorization)."""
        return self.props.get("disable_token_authorization", "false").lower() != "true"

    def auth(self, management: bool = False) -> dict[str, str]:
        if not self.token_auth:
            return {}
        return {"Authorization": f"Bearer {self.management_token if management else self.token}"}

    def worker_status(self, model: str) -> str | None:
        try:
            headers = self.auth(True)
        except (OSError, ValueError, KeyError):  # key_file.json exists but is still being written
            return None
        try:
            r = requests.get(f"{self.management_url}/models/{model}", headers=headers, timeout=5)
        except requests.RequestException:
            return None
        if r.status_code != 200:
            return None
        try:
            workers = r.json()[0].get("workers", [])
        except (ValueError, IndexError, AttributeError):  # a management API still starting
            return None
        return workers[0]["status"] if workers else None

    def worker_pids(self, model: str) -> list[int]:
        r = requests.get(f"{self.management_url}/models/{model}", headers=self.auth(True), timeout=5)
        return [w["pid"] for w in r.json()[0].get("workers", [])]

    def predict(self, model: str, *, explain: bool = False, timeout: float = 120, **kwargs) -> requests.Response:
        """POST to /predictions (or /explanations) with the token; kwargs go to requests."""
        headers = {**self.auth(), **kwargs.pop("headers", {})}
        route = "explanations" if explain else "predictions"
        return requests.post(f"{self.url}/{route}/{model}", headers=headers, timeout=timeout, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("torchserve.out", "logs/model_log.log", "logs/ts_log.log"):
            path = self.workdir / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


class KServeLocal:
    """The KServe predictor (``python -m handler.kserve_server``) serving one archive on free
    loopback ports, in a process of its own (kserve's gRPC stubs and tritonclient's cannot share
    one: both register the ``inference`` proto package).

    Args:
        archive: a ``.mar`` file or an unpacked archive folder.
        workdir: where the archive is unpacked and the server's output goes.
        extra: more command-line arguments for the server.
    """

    def __init__(self, archive: Path, workdir: Path, extra: list[str] | None = None) -> None:
        self.archive = Path(archive)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "kserve.out"

    def start(self, timeout: float = 180.0) -> KServeLocal:
        """Start the server and wait until ``/v2/health/ready`` says so."""
        cmd = [sys.executable, "-m", "handler.kserve_server", str(self.archive), "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--workdir", str(self.workdir / "archives"), *self.extra]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the KServe predictor exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=2).json().get("ready"):
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the KServe predictor was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, and the exit code once it has finished (SIGKILL past ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> KServeLocal:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
