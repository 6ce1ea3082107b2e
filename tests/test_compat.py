"""The archive on TorchServes it does not control: plain configs in every metrics mode, a CPU
archive, and the archive's requirements.txt installed (or missing) per model.

Each server here starts from a plain ``config.properties`` (addresses, model store, models and the
one setting under test), as a user's own server or the official image has: no ``metrics.yaml`` of
this project, no ``install_py_dep_per_model`` unless the row is about it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from conftest import DEFAULT, EAGER, ROOT, peak, photo, readme_blocks
from support.archiver_main import run_main

from devkit.tslocal import LocalServer
from handler.deps import read_requirements
from handler.metrics import METRICS

pytestmark = pytest.mark.server

FIXTURE_DEP = "gradcam-fixture-dep"


def _fixture_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel nobody has installed, for the dependency-install rows."""
    import base64
    import hashlib
    import zipfile

    name, version = "gradcam_fixture_dep", "1.0"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {FIXTURE_DEP}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{path},{digest(text)},{len(text.encode())}\n" for path, text in files.items())
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{name}-{version}.dist-info/RECORD", record + f"{name}-{version}.dist-info/RECORD,,\n")
    return wheel


class _Servers:
    """Plain servers started in the background: a start is mostly one core's work at a time
    (TorchServe creates each model's venv, then the model's worker imports torch), so two or
    more starting at once keep both cores busy."""

    def __init__(self, store: Path, tmp_path_factory) -> None:
        self.store, self.tmp_path_factory = store, tmp_path_factory
        self.pool = ThreadPoolExecutor(4)
        self.started: dict[str, tuple[LocalServer, Future]] = {}

    def start(self, name: str, models: list[str], ready: list[str] | None = None, **settings) -> None:
        server = LocalServer(self.store, models, self.tmp_path_factory.mktemp(name), overrides=settings, plain=True)
        self.started[name] = (server, self.pool.submit(server.start, ready=ready))

    def get(self, name: str) -> LocalServer:
        """The server once it is ready (its start's exception if it failed)."""
        return self.started[name][1].result()

    def stop(self, name: str) -> None:
        server, future = self.started[name]
        try:
            future.result()
        except Exception:  # raised to the test that asked for it; start() has stopped it
            pass
        server.stop()

    def close(self) -> None:
        for name in self.started:
            self.stop(name)
        self.pool.shutdown()


@pytest.fixture(scope="module")
def servers(model_store, tmp_path_factory):
    """The store (the session's default archive, and needs_dep: it needs a package this machine
    does not have, installable offline from a local wheelhouse) and every server of the module.
    The two servers of the default archive start while needs_dep is built (the archiver's main,
    in this process), then the two that load needs_dep."""
    store = tmp_path_factory.mktemp("compat_store")
    (store / f"{DEFAULT}.mar").symlink_to(model_store / f"{DEFAULT}.mar")
    starts = _Servers(store, tmp_path_factory)
    try:
        # A plain config and nothing else: TorchServe's default metrics mode (log).
        starts.start("plain", [f"{DEFAULT}.mar"])
        starts.start("auto", [f"{DEFAULT}.mar"], metrics_mode="prometheus", model_metrics_auto_detect="true")
        wheels = tmp_path_factory.mktemp("wheelhouse")
        _fixture_wheel(wheels)
        extra = wheels / "requirements-extra.txt"
        links = [f"--find-links {wheels}"]
        if (ROOT / ".venv" / "wheelhouse").is_dir():  # setuptools for TorchServe's model venv (bootstrap.sh)
            links.append(f"--find-links {ROOT / '.venv' / 'wheelhouse'}")
        extra.write_text("\n".join(["--no-index", *links, f"{FIXTURE_DEP}==1.0"]) + "\n")
        # Built for --device-type cpu as well (one archive fewer to build and load): the install
        # row serves it, so it is also the row of a CPU archive on a plain config.
        done = run_main(["-q", "--export-path", str(store), "--name", "needs_dep", "--device-type", "cpu",
                         "--requirements", str(extra), *EAGER])
        assert done.returncode == 0, f"building needs_dep failed:\n{done.stderr}"
        starts.start("missing", [f"{DEFAULT}.mar", "needs_dep.mar"], ready=[DEFAULT], metrics_mode="prometheus")
        starts.start("install", ["needs_dep.mar"], install_py_dep_per_model="true", metrics_mode="legacy")
        yield starts
    finally:
        starts.close()


@pytest.fixture(scope="module")
def compat_store(servers) -> Path:
    return servers.store


def _assert_cat(server, model: str = DEFAULT) -> dict:
    r = server.predict(model, files={"image": ("cat.jpg", photo("chelsea.jpg"))}, data={"outputs": "map"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"][0]["label"] == "Egyptian cat"
    (cam,) = body["cams"]
    assert len(cam["map"]) == 7 and cam["class_id"] == 285
    row, col = peak(cam["map"])
    assert 1 <= row <= 5 and 1 <= col <= 5, (row, col)  # on the cat, not the border
    return body


def _metrics_text(server) -> str:
    return requests.get(f"{server.metrics_url}/metrics", timeout=30).text


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return predicate()


# --------------------------------------------------------------------------- plain configs
# (The servers start together in the background, fixture ``servers``; the tests run in an order
# that stops first the server whose worker cannot load.)


@pytest.fixture(scope="module")
def plain_default(servers):
    """A plain config and nothing else: TorchServe's default metrics mode (log)."""
    return servers.get("plain")


@pytest.fixture
def auto_server(servers):
    """A plain config in prometheus mode with model metrics auto-detected."""
    yield servers.get("auto")
    servers.stop("auto")


@pytest.fixture
def missing_server(servers):
    """A plain config in prometheus mode, the default archive and needs_dep (whose package is
    missing): stopped after its test, as TorchServe keeps restarting the worker that cannot load."""
    yield servers.get("missing")
    servers.stop("missing")


@pytest.fixture(scope="module")
def install_server(servers):
    """A plain config with install_py_dep_per_model=true, in legacy metrics mode, serving needs_dep."""
    return servers.get("install")


def test_every_archive_lists_its_packages_with_exact_versions(compat_store, model_store):
    from importlib import metadata
    from zipfile import ZipFile

    for mar, extra in ((model_store / f"{DEFAULT}.mar", set()), (model_store / "resnet18_10.mar", set()),
                       (model_store / "tinynet.mar", set()), (compat_store / "needs_dep.mar", {FIXTURE_DEP})):
        with ZipFile(mar) as zf:
            manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
            assert manifest["model"]["requirementsFile"] == "requirements.txt"
            lines = zf.read("requirements.txt").decode()
            config = yaml.safe_load(zf.read("model-config.yaml"))
        path = compat_store / f"{mar.stem}-requirements.txt"
        path.write_text(lines)
        pins = dict(read_requirements(path))
        base = {"numpy", "pillow", "safetensors", "pyyaml"}
        by_source = {"timm": {"timm", "torchvision"}, "torchvision": {"torchvision"}}
        want = base | by_source.get(config["handler"]["model"].split(":")[0], set()) | extra
        assert set(pins) == want, (mar.name, pins)
        for name, version in pins.items():
            if name != FIXTURE_DEP:
                assert version == metadata.version(name), (name, version)
        assert config["useVenv"] is True


def test_a_missing_package_fails_the_load_with_one_clear_message(missing_server):
    """Also the plain prometheus-mode row: the other archive serves, without handler metrics."""
    server = missing_server
    log = server.workdir / "logs" / "model_log.log"
    message = (f"this archive needs {FIXTURE_DEP}==1.0, not installed for this TorchServe worker: "
               "set install_py_dep_per_model=true")
    assert _wait_for(lambda: message in log.read_text(), timeout=60), log.read_text()[-3000:]
    assert server.worker_status("needs_dep") != "READY"
    # The other archive on the same server is not affected.
    _assert_cat(server)
    # The frontend's own request metrics are exported; the handler's are not declared in this
    # server's metrics configuration, so prometheus mode leaves them out.
    assert _wait_for(lambda: "ts_inference_requests_total" in _metrics_text(server))
    assert "Gradcam" not in _metrics_text(server)
    assert "Traceback" not in "".join(line for line in log.read_text().splitlines(True)
                                      if "efficientnet_lite0" in line)


def test_plain_config_serves_the_archive_and_logs_its_metrics(plain_default):
    _assert_cat(plain_default)
    assert "Traceback" not in (plain_default.workdir / "logs" / "model_log.log").read_text()
    # log mode, no auto-detection: the frontend drops model metrics its configuration does not
    # declare, and the handler serves on regardless.
    assert "GradcamBatches" not in (plain_default.workdir / "logs" / "model_metrics.log").read_text()


def test_the_readme_curl_examples_work_against_a_plain_config_server(plain_default, tmp_path):
    blocks = readme_blocks()
    token = plain_default.token
    for name in ("raw", "raw-headers", "multipart", "json", "explain"):
        # Verbatim but for the server's address and token: this server is not `make serve`'s.
        script = (blocks["token"] + blocks[name]).replace("$(scripts/ops/token.sh)", token)
        script = script.replace("http://127.0.0.1:8080", plain_default.url).replace("request.json",
                                                                                    str(tmp_path / "request.json"))
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        body = json.loads(done.stdout)
        assert body["predictions"][0]["label"] in ("Egyptian cat", "espresso"), (name, body["predictions"][0])
        assert body["cams"] and "map" in body["cams"][0], name


def test_prometheus_auto_detection_exports_every_handler_metric(auto_server):
    server = auto_server
    _assert_cat(server)
    r = server.predict(DEFAULT, files={"image": ("x.jpg", photo("chelsea.jpg"))}, data={"topk": "0"})
    assert r.status_code == 400
    r = server.predict(DEFAULT, files={"image": ("x.jpg", photo("chelsea.jpg"))}, data={"quality": "true"})
    assert r.status_code == 200 and "quality" in r.json()["cams"][0]  # the histogram's first value
    wanted = {spec.name for spec in METRICS}
    exported = r"^(Gradcam\w+?)(?:_bucket|_count|_sum)?\{"  # a histogram's series carry suffixes
    assert _wait_for(lambda: wanted <= set(re.findall(exported, _metrics_text(server), re.M))), (
        _metrics_text(server))
    assert re.search(r'^GradcamBatches\{.*BatchSize="1".*\} 3\.0$', _metrics_text(server), re.M)
    assert re.search(r'^GradcamRejected\{.*Reason="invalid_option".*\} 1\.0$', _metrics_text(server), re.M)


def test_handler_metrics_match_the_projects_metrics_yaml():
    """metrics.yaml (the project's own server) declares exactly what the handler emits."""
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    ours = {(item["name"], kind, item["unit"], tuple(item["dimensions"]))
            for kind, items in declared.items() for item in items if item["name"].startswith("Gradcam")}
    assert ours == {(s.name, s.kind, s.unit, s.dimensions) for s in METRICS}


# --------------------------------------------------------------------------- serve-time packages


def test_install_py_dep_per_model_installs_the_archives_requirements(install_server):
    """Also the plain legacy-mode row."""
    server = install_server
    body = _assert_cat(server, "needs_dep")
    assert body["model"] == "needs_dep"
    assert _wait_for(lambda: "ts_inference_requests_total" in _metrics_text(server))
    assert "Gradcam" not in _metrics_text(server)
    # Installed into the model's own venv (useVenv), which reuses the server's packages: only the
    # missing one is there, not timm or torch.
    installed = {p.name for p in Path(server.tmp).glob("models/*/venv/lib/python3*/site-packages/*/")}
    assert "gradcam_fixture_dep" in installed, sorted(installed)
    assert not installed & {"timm", "torch", "torchvision", "numpy"}, sorted(installed)


def test_an_archive_built_for_device_type_cpu_serves_on_a_plain_config(install_server, compat_store):
    """needs_dep is built with --device-type cpu (fixture ``servers``)."""
    with zipfile.ZipFile(compat_store / "needs_dep.mar") as mar:
        assert yaml.safe_load(mar.read("model-config.yaml"))["deviceType"] == "cpu"
    body = _assert_cat(install_server, "needs_dep")
    assert body["model"] == "needs_dep"
