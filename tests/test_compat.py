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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from conftest import DEFAULT, ROOT, peak, photo, readme_blocks, run_archiver

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


@pytest.fixture(scope="module")
def compat_store(model_store, tmp_path_factory) -> Path:
    """The session's default archive, one built for --device-type cpu, and one that needs a
    package this machine does not have (installable offline from a local wheelhouse)."""
    store = tmp_path_factory.mktemp("compat_store")
    (store / f"{DEFAULT}.mar").symlink_to(model_store / f"{DEFAULT}.mar")
    wheels = tmp_path_factory.mktemp("wheelhouse")
    _fixture_wheel(wheels)
    extra = wheels / "requirements-extra.txt"
    links = [f"--find-links {wheels}"]
    if (ROOT / ".venv" / "wheelhouse").is_dir():  # setuptools for TorchServe's model venv (bootstrap.sh)
        links.append(f"--find-links {ROOT / '.venv' / 'wheelhouse'}")
    extra.write_text("\n".join(["--no-index", *links, f"{FIXTURE_DEP}==1.0"]) + "\n")
    builds = {
        "lite0_cpu": ["--device-type", "cpu"],
        "needs_dep": ["--requirements", str(extra)],
    }
    with ThreadPoolExecutor(len(builds)) as pool:
        done = dict(zip(builds, pool.map(
            lambda kv: run_archiver("-q", "--export-path", str(store), "--name", kv[0], *kv[1]), builds.items())))
    for name, result in done.items():
        assert result.returncode == 0, f"building {name} failed:\n{result.stderr}"
    return store


def _plain_server(store: Path, models: list[str], workdir: Path, ready: list[str] | None = None, **settings):
    server = LocalServer(store, models, workdir, overrides=settings, plain=True)
    return server.start(ready=ready)


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


@pytest.fixture(scope="module")
def plain_default(compat_store, tmp_path_factory):
    """A plain config and nothing else: TorchServe's default metrics mode (log)."""
    server = _plain_server(compat_store, [f"{DEFAULT}.mar", "lite0_cpu.mar"], tmp_path_factory.mktemp("plain"))
    yield server
    server.stop()


def test_plain_config_serves_the_archive_and_logs_its_metrics(plain_default):
    _assert_cat(plain_default)
    assert "Traceback" not in (plain_default.workdir / "logs" / "model_log.log").read_text()
    # log mode, no auto-detection: the frontend drops model metrics its configuration does not
    # declare, and the handler serves on regardless.
    assert "GradcamBatches" not in (plain_default.workdir / "logs" / "model_metrics.log").read_text()


def test_an_archive_built_for_device_type_cpu_serves_on_a_plain_config(plain_default):
    body = _assert_cat(plain_default, "lite0_cpu")
    assert body["model"] == "lite0_cpu"


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


def test_prometheus_auto_detection_exports_every_handler_metric(compat_store, tmp_path):
    server = _plain_server(compat_store, [f"{DEFAULT}.mar"], tmp_path, metrics_mode="prometheus",
                           model_metrics_auto_detect="true")
    try:
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
    finally:
        server.stop()


def test_handler_metrics_match_the_projects_metrics_yaml():
    """metrics.yaml (the project's own server) declares exactly what the handler emits."""
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    ours = {(item["name"], kind, item["unit"], tuple(item["dimensions"]))
            for kind, items in declared.items() for item in items if item["name"].startswith("Gradcam")}
    assert ours == {(s.name, s.kind, s.unit, s.dimensions) for s in METRICS}


# --------------------------------------------------------------------------- serve-time packages


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


def test_a_missing_package_fails_the_load_with_one_clear_message(compat_store, tmp_path):
    """Also the plain prometheus-mode row: the other archive serves, without handler metrics."""
    server = _plain_server(compat_store, [f"{DEFAULT}.mar", "needs_dep.mar"], tmp_path, ready=[DEFAULT],
                           metrics_mode="prometheus")
    try:
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
    finally:
        server.stop()


def test_install_py_dep_per_model_installs_the_archives_requirements(compat_store, tmp_path):
    """Also the plain legacy-mode row."""
    server = _plain_server(compat_store, ["needs_dep.mar"], tmp_path, install_py_dep_per_model="true",
                           metrics_mode="legacy")
    try:
        body = _assert_cat(server, "needs_dep")
        assert body["model"] == "needs_dep"
        assert _wait_for(lambda: "ts_inference_requests_total" in _metrics_text(server))
        assert "Gradcam" not in _metrics_text(server)
        # Installed into the model's own venv (useVenv), which reuses the server's packages: only the
        # missing one is there, not timm or torch.
        installed = {p.name for p in Path(server.tmp).glob("models/*/venv/lib/python3*/site-packages/*/")}
        assert "gradcam_fixture_dep" in installed, sorted(installed)
        assert not installed & {"timm", "torch", "torchvision", "numpy"}, sorted(installed)
    finally:
        server.stop()
