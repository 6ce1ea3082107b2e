"""The README's commands, run verbatim: serve, every curl example, own models, stop."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CAT_CLASSES, ROOT, readme_blocks
from PIL import Image

pytestmark = pytest.mark.server

README = (ROOT / "README.md").read_text()
BLOCKS = readme_blocks()


def _bash(script: str, timeout: float = 600) -> str:
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"README command failed ({done.returncode}):\n{script}\n{done.stderr[-3000:]}"
    return done.stdout


def _curl(name: str) -> dict:
    return json.loads(_bash(BLOCKS["token"] + BLOCKS[name]))


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def readme_server():
    commands = re.search(r"```bash\n(make serve.*?)```", README, flags=re.S).group(1)
    serve = [line.split("#")[0].strip() for line in commands.splitlines() if line.startswith("make serve")]
    assert serve == ["make serve"] and "make test" in commands
    if _port_busy(8080):
        pytest.fail("127.0.0.1:8080 is in use: stop that server (make stop) to run the README test")
    try:
        _bash(serve[0])
        yield
    finally:
        _bash(BLOCKS["stop"])
        for leftover in ("overlay.jpg", "request.json", "gallery.png"):
            (ROOT / leftover).unlink(missing_ok=True)
        shutil.rmtree(ROOT / "explain-out", ignore_errors=True)


def test_readme_commands_work_verbatim(readme_server):
    raw = _curl("raw")
    assert raw["predictions"][0]["class_id"] in CAT_CLASSES and len(raw["predictions"]) == 5
    assert raw["cams"][0]["class_id"] == raw["predictions"][0]["class_id"] and len(raw["cams"][0]["map"]) == 7

    headers = _curl("raw-headers")
    assert len(headers["predictions"]) == 3 and headers["predictions"][0]["label"] == "Egyptian cat"

    multipart = _curl("multipart")
    assert [c["class_id"] for c in multipart["cams"]] == [p["class_id"] for p in multipart["predictions"][:2]]
    assert all("heatmap" in c and "map" in c for c in multipart["cams"])

    as_json = _curl("json")
    assert as_json["predictions"][0]["label"] == "espresso" and as_json["cams"][0]["method"] == "gradcam++"

    _bash(BLOCKS["token"] + BLOCKS["overlay"])
    overlay = Image.open(io.BytesIO((ROOT / "overlay.jpg").read_bytes()))
    assert overlay.format == "JPEG" and overlay.size == (451, 300)

    grpc = _curl("grpc")
    assert len(grpc["predictions"]) == 3 and grpc["predictions"][0]["label"] == "Egyptian cat"
    assert [c["class_id"] for c in grpc["cams"]] == [p["class_id"] for p in grpc["predictions"][:2]]
    np.testing.assert_allclose(grpc["cams"][0]["map"], multipart["cams"][0]["map"], atol=2e-3)

    v2 = _curl("v2-rest")
    assert v2["id"] == "cat-1" and v2["outputs"][0]["name"] == "image"
    answer = json.loads(v2["outputs"][0]["data"][0])
    assert len(answer["predictions"]) == 3 and answer["predictions"][0]["label"] == "Egyptian cat"

    lines = [line.split("\t") for line in _bash(BLOCKS["client"]).strip().splitlines()]
    by_photo = {Path(fields[0]).name: fields[1:] for fields in lines}
    assert sorted(by_photo) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    assert by_photo["chelsea.jpg"][:2] == ["ok", "Egyptian cat"] and by_photo["coffee.jpg"][:2] == ["ok", "espresso"]
    assert by_photo["astronaut.jpg"][0] == "ok"
    saved = json.loads((ROOT / "explain-out" / "chelsea.json").read_text())
    assert saved["cams"][0]["overlay_file"] == "chelsea.285.overlay.jpg"
    assert Image.open(ROOT / "explain-out" / "chelsea.285.overlay.jpg").size == (451, 300)
    _bash(BLOCKS["gallery"])
    assert Image.open(ROOT / "gallery.png").size == Image.open(ROOT / "docs" / "gallery_chelsea.png").size

    explain = _curl("explain")
    assert explain["predictions"][0]["class_id"] == raw["predictions"][0]["class_id"]
    assert explain["cams"][0]["map"] == raw["cams"][0]["map"]

    load = _bash(BLOCKS["load"])
    assert "| requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |" in load
    assert "Errors by status: none" in load and "Server batch sizes" in load

    for name, mar in (("own-torchvision", "resnet18_10"), ("own-timm", "resnet10t"), ("own-file", "tinynet")):
        _bash(BLOCKS[name])
        assert (ROOT / "model_store" / f"{mar}.mar").is_file()
    own = json.loads(_bash(BLOCKS["own-serve"]).strip().splitlines()[-1])
    assert own["predictions"][0]["label"] in {"circle", "square", "triangle"}
    assert len(own["predictions"]) == 3 and own["model"] == "tinynet"


def test_readme_kserve_commands_work_verbatim():
    """make serve-kserve, the v1 and v2 curl examples, make stop: as the README has them."""
    if _port_busy(8085) or _port_busy(8086):
        pytest.fail("127.0.0.1:8085 or 8086 is in use: stop that server (make stop) to run the README test")
    try:
        _bash(BLOCKS["serve-kserve"], timeout=900)
        v1 = json.loads(_bash(BLOCKS["kserve-v1"]))
        (answer,) = v1["predictions"]
        assert answer["predictions"][0]["class_id"] in CAT_CLASSES and len(answer["predictions"]) == 3
        assert len(answer["cams"][0]["map"]) == 7
        v2 = json.loads(_bash(BLOCKS["kserve-v2"]))
        assert v2["id"] == "cat-1" and v2["model_name"] == "efficientnet_lite0"
        assert json.loads(v2["outputs"][0]["data"][0])["predictions"] == answer["predictions"]
    finally:
        _bash(BLOCKS["stop"])
        (ROOT / "request.json").unlink(missing_ok=True)
    assert not _port_busy(8085) and not _port_busy(8086)
