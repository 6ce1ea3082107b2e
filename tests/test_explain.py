"""handler/tools/explain.py, run as users run it, against real TorchServe servers.

The session server answers a folder with good photos, a corrupt JPEG, a fake PNG, a text file
and a missing path; a private server with a one-job queue (``job_queue_size=1``) answers real
503s under concurrency and serves an archive whose target layer (``blocks.4``, 14x14) makes the
five CAM methods differ, for the gallery. The retry bound and a dropped connection are checked
against a small loopback stub, the only way to make a server give up or hang up on cue.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, DEFAULT, ROOT, photo, run_archiver
from PIL import Image, ImageOps

from devkit.tslocal import LocalServer, free_port
from handler.tools.gallery import CAPTION, gallery_size, panel_origin

pytestmark = pytest.mark.server

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def explain(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_TOKEN"}
    return subprocess.run([sys.executable, "-m", "handler.tools.explain", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parse(stdout: str) -> dict[str, list[str]]:
    """{path: the other tab-separated fields} of the per-photo lines."""
    rows = {}
    for text in stdout.splitlines():
        path, *fields = text.split("\t")
        assert path not in rows, f"two lines for {path}"
        rows[path] = fields
    return rows


def _hashed(path: Path) -> str:
    return f"{path.stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two good photos, a third under the same name in a subfolder, and three bad files."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    shutil.copy(DATA / "chelsea.jpg", root / "chelsea.jpg")
    shutil.copy(DATA / "coffee.jpg", root / "coffee.jpg")
    shutil.copy(DATA / "astronaut.jpg", root / "sub" / "chelsea.jpg")  # same stem, other photo
    (root / "corrupt.jpg").write_bytes(photo("chelsea.jpg")[:20000])  # truncated mid-scan
    (root / "fake.PNG").write_text("not a picture, whatever the name says")  # walked: an image extension
    (root / "notes.txt").write_text("not walked; sent only when named")
    shutil.copy(DATA / "chelsea.jpg", root / ".hidden.jpg")  # hidden: never walked
    return root


def test_folder_with_bad_files_reports_each_and_exits_1(server, folder, tmp_path):
    out = tmp_path / "out"
    missing = folder / "missing.jpg"
    done = explain(folder, folder / "notes.txt", missing, "--url", server.url, "--token", server.token,
                   "--out", out, "--outputs", "map,heatmap,overlay", "--concurrency", "4", "--progress")
    assert done.returncode == 1, done.stderr
    rows = parse(done.stdout)
    sub_cat, cat, coffee = folder / "sub" / "chelsea.jpg", folder / "chelsea.jpg", folder / "coffee.jpg"
    assert set(rows) == {str(p) for p in (cat, coffee, sub_cat, folder / "corrupt.jpg", folder / "fake.PNG",
                                          folder / "notes.txt", missing)}
    # Good photos: top-1 label, probability, latency; the same answer the server gives directly.
    astronaut = server.predict(DEFAULT, files={"image": ("a.jpg", photo("astronaut.jpg"))}).json()["predictions"][0]
    for path, label in ((cat, "Egyptian cat"), (coffee, "espresso"), (sub_cat, astronaut["label"])):
        status, got, probability, latency = rows[str(path)]
        assert (status, got) == ("ok", label)
        assert 0 < float(probability) <= 1 and re.fullmatch(r"\d+ ms", latency)
    assert float(rows[str(cat)][2]) > 0.5
    assert float(rows[str(sub_cat)][2]) == pytest.approx(astronaut["probability"], abs=1e-4)
    # Bad files: the status and the server's own error, named.
    assert rows[str(folder / "corrupt.jpg")][:2] == ["error", "400"]
    assert rows[str(folder / "corrupt.jpg")][2].startswith("invalid_input (image): image data is corrupt or truncated")
    for name in ("fake.PNG", "notes.txt"):
        assert rows[str(folder / name)][:2] == ["error", "415"]
        assert rows[str(folder / name)][2].startswith("unsupported_media (image): image is not a supported image")
    assert rows[str(missing)] == ["error", "-", "cannot read: No such file or directory"]
    # Progress went to stderr, the summary too.
    assert "7/7 photos" in done.stderr and "7 photos: 3 ok, 4 failed (400: 1, 415: 2, no answer: 1)" in done.stderr

    # Files: the two chelsea.jpg get hashed names; pictures decode, in the photo's frame.
    names = {cat: _hashed(cat), sub_cat: _hashed(sub_cat), coffee: "coffee"}
    assert names[cat] != names[sub_cat]
    for path, name in names.items():
        body = json.loads((out / f"{name}.json").read_text())
        assert body["client"]["source"] == str(path) and body["client"]["status"] == 200
        (cam,) = body["cams"]
        assert "heatmap" not in cam and "overlay" not in cam  # moved to files
        assert np.array(cam["map"]).shape == (7, 7)
        heatmap = Image.open(out / cam["heatmap_file"])
        overlay = Image.open(out / cam["overlay_file"])
        assert cam["heatmap_file"] == f"{name}.{cam['class_id']}.heatmap.png"
        assert cam["overlay_file"] == f"{name}.{cam['class_id']}.overlay.jpg"
        assert (heatmap.format, heatmap.mode, overlay.format, overlay.mode) == ("PNG", "L", "JPEG", "RGB")
        width, height = Image.open(path).size
        scale = min(1.0, 512 / max(width, height))  # the server caps pictures' long side at 512
        assert body["image_size"] == [width, height]
        frame = (round(width * scale), round(height * scale))
        assert heatmap.size == overlay.size == tuple(body["frame_size"]) == frame
        assert body["predictions"][0]["label"] == rows[str(path)][1]
    error = json.loads((out / "corrupt.json").read_text())
    assert (error["error"], error["field"], error["status"], error["client"]["status"]) == ("invalid_input", "image",
                                                                                          400, 400)
    assert json.loads((out / "missing.json").read_text())["client"]["error"].startswith("cannot read")
    written = {p.name for p in out.iterdir()}
    assert written == {"index.jsonl", "corrupt.json", "fake.json", "notes.json", "missing.json",
                       *(f for name in names.values() for f in (f"{name}.json",)),
                       *(json.loads((out / f"{n}.json").read_text())["cams"][0][k]
                         for n in names.values() for k in ("heatmap_file", "overlay_file"))}
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(e["file"] for e in index) == sorted(rows)
    assert {e["file"]: e["ok"] for e in index} == {p: fields[0] == "ok" for p, fields in rows.items()}


def test_good_photos_exit_0_with_json_lines_and_the_out_folder_is_not_walked(server, tmp_path):
    photos = tmp_path / "good"
    photos.mkdir()
    shutil.copy(DATA / "chelsea.jpg", photos / "CAT.JPG")
    shutil.copy(DATA / "coffee.jpg", photos / "coffee.jpeg")
    out = photos / "results"
    for _ in range(2):  # the second run must not send the first run's overlays
        done = explain(photos, "--url", server.url, "--token", server.token, "--out", out, "--jsonl", "--topk", "3",
                       "--cam-classes", "top2", "--cam-method", "gradcam++")
        assert done.returncode == 0, done.stderr
        entries = {Path(e["file"]).name: e for e in map(json.loads, done.stdout.splitlines())}
        assert set(entries) == {"CAT.JPG", "coffee.jpeg"}
    assert entries["CAT.JPG"]["label"] == "Egyptian cat" and entries["coffee.jpeg"]["label"] == "espresso"
    assert all(e["ok"] and e["status"] == 200 and e["attempts"] == 1 for e in entries.values())
    body = json.loads((out / "CAT.json").read_text())
    assert len(body["predictions"]) == 3 and len(body["cams"]) == 2  # options travelled as fields
    assert {c["method"] for c in body["cams"]} == {"gradcam++"}
    assert sorted(entries["CAT.JPG"]["outputs"]) == sorted(
        ["CAT.json", *(f"CAT.{c['class_id']}.overlay.jpg" for c in body["cams"])])  # default outputs: map,overlay
    assert "2 photos: 2 ok, 0 failed; 0 retries" in done.stderr


def _one_message(done: subprocess.CompletedProcess, text: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and text in done.stderr, done.stderr


def test_wrong_token_unreachable_server_unknown_model_and_bad_option_stop_at_once(server, folder, tmp_path):
    args = [folder, "--out", tmp_path]
    _one_message(explain(*args, "--url", server.url, "--token", "wrong"), "refused the token from --token")
    _one_message(explain(*args, "--url", f"http://127.0.0.1:{free_port()}", "--token", "x"),
                 "cannot reach the server at http://127.0.0.1:")
    # No --token: key_file.json of this checkout (absent, or another server's): refused, named.
    _one_message(explain(*args, "--url", server.url), "key_file.json")
    # Answers that would repeat for every photo stop the run at the first one.
    good = [DATA, "--out", tmp_path]
    _one_message(explain(*good, "--url", server.url, "--token", server.token, "--model", "nosuch"),
                 "does not serve the model 'nosuch' (ModelNotFoundException: Model not found: nosuch)")
    _one_message(explain(*good, "--url", server.url, "--token", server.token, "--cam-classes", "unicorn"),
                 "the server refused an option: invalid_option (cam_classes): unknown class name 'unicorn'")
    # A value no header carries goes as a multipart field, and reaches the server as it was.
    _one_message(explain(*good, "--url", server.url, "--token", server.token, "--cam-classes", "licorne ä"),
                 "the server refused an option: invalid_option (cam_classes): unknown class name 'licorne ä'")
    # chefer is a method the client knows; the CNN's server refuses it, saying why.
    _one_message(explain(*good, "--url", server.url, "--token", server.token, "--cam-method", "chefer"),
                 "the server refused an option: invalid_option (cam_method): cam_method 'chefer' does not apply "
                 "to this model: chefer/legrad explain a transformer through its attention")


def test_quality_adds_the_first_maps_kept_and_removed_confidence_to_each_line(server, tmp_path):
    photos = tmp_path / "q"
    photos.mkdir()
    shutil.copy(DATA / "chelsea.jpg", photos / "cat.jpg")
    done = explain(photos, "--url", server.url, "--token", server.token, "--out", tmp_path / "out", "--quality",
                   "--outputs", "map")
    assert done.returncode == 0, done.stderr
    (fields,) = [row.split("\t") for row in done.stdout.splitlines()]
    assert fields[1:3] == ["ok", "Egyptian cat"] and len(fields) == 6
    quality = json.loads((tmp_path / "out" / "cat.json").read_text())["cams"][0]["quality"]
    assert fields[5] == f"kept {quality['kept_confidence']:.2f} removed {quality['removed_confidence']:.2f}"
    assert 0 <= quality["removed_confidence"] < quality["confidence"]  # the cat's region carries the class


# ---------------------------------------------------------------------------- a server that answers 503


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """efficientnet_lite0 with its target layer at blocks.4 (14x14), behind a one-job queue."""
    store = tmp_path_factory.mktemp("busy_store")
    run_archiver("-q", "--target-layer", "blocks.4", "--name", "lite0_blocks4", "--export-path", str(store),
                 check=True)
    with LocalServer(store, ["lite0_blocks4.mar"], tmp_path_factory.mktemp("busy"),
                     overrides={"job_queue_size": "1"}) as srv:
        yield srv


def test_real_503s_from_a_full_queue_are_retried(busy_server, tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(12):  # more in flight than a batch (8) takes: the rest meet a full queue
        shutil.copy(DATA / ("chelsea.jpg", "coffee.jpg")[i % 2], photos / f"p{i:02d}.jpg")
    done = explain(photos, "--url", busy_server.url, "--token", busy_server.token, "--model", "lite0_blocks4",
                   "--out", tmp_path / "out", "--outputs", "map", "--concurrency", "12", "--retries", "12")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = parse(done.stdout)
    assert len(rows) == 12 and {f[1] for f in rows.values()} == {"Egyptian cat", "espresso"}
    retries = re.search(r"; (\d+) retries \(503: (\d+)\)", done.stderr)
    assert retries and int(retries.group(1)) == int(retries.group(2)) > 0, done.stderr
    index = [json.loads(x) for x in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert max(e["attempts"] for e in index) > 1


def _panel(gallery: Image.Image, heights: list[int], row: int, column: int, panel: int) -> np.ndarray:
    x, y = panel_origin(heights, row, column, panel)
    return np.asarray(gallery.crop((x, y, x + panel, y + heights[row])), dtype=np.float64)


def test_gallery_rows_are_the_photo_and_five_different_overlays(busy_server, tmp_path):
    panel = 160
    photos = [DATA / "chelsea.jpg", DATA / "astronaut.jpg"]
    out, picture = tmp_path / "out", tmp_path / "gallery.png"
    done = explain(*photos, "--url", busy_server.url, "--token", busy_server.token, "--model", "lite0_blocks4",
                   "--out", out, "--gallery", picture, "--panel", str(panel), "--retries", "12",
                   "--concurrency", "2")  # the queue holds one job: fewer 503s, a faster test
    assert done.returncode == 0, done.stdout + done.stderr
    assert parse(done.stdout)[str(photos[0])][:2] == ["ok", "Egyptian cat"]
    gallery = Image.open(picture)
    assert gallery.format == "PNG"
    heights = [ImageOps.contain(Image.open(p), (panel, panel)).height for p in photos]
    assert heights == [106, 160]  # 451x300 -> 160x106; 512x512 -> 160x160
    assert gallery.size == gallery_size(heights, 1 + len(METHODS), panel) == (8 + 6 * 168, 8 + 106 + 160 + 2 * (
        CAPTION + 8))
    gallery = gallery.convert("RGB")
    for row, path in enumerate(photos):
        # Column 0 is the photo itself, fitted; columns 1-5 the overlays, pairwise different.
        fitted = np.asarray(ImageOps.contain(Image.open(path).convert("RGB"), (panel, panel)), dtype=np.float64)
        shown = _panel(gallery, heights, row, 0, panel)
        left = (panel - fitted.shape[1]) // 2
        assert np.abs(shown[:, left:left + fitted.shape[1]] - fitted).mean() < 2
        overlays = [_panel(gallery, heights, row, c, panel) for c in range(1, 1 + len(METHODS))]
        for i in range(len(overlays)):
            assert np.abs(overlays[i] - shown).mean() > 10, (path.name, METHODS[i])  # an overlay, not the photo
            for j in range(i + 1, len(overlays)):
                assert np.abs(overlays[i] - overlays[j]).mean() > 3, (path.name, METHODS[i], METHODS[j])
        # Captions were drawn under every panel.
        x0, y0 = panel_origin(heights, row, 0, panel)
        caption = np.asarray(gallery.crop((x0, y0 + heights[row], gallery.width, y0 + heights[row] + CAPTION)))
        assert (caption < 128).any(axis=2).sum() > 6 * 40
    # The files written are the gradcam answer's.
    body = json.loads((out / "chelsea.json").read_text())
    assert body["cams"][0]["method"] == "gradcam" and "overlay_file" in body["cams"][0]


# ---------------------------------------------------------------------------- the retry policy on cue


class _Stub(http.server.BaseHTTPRequestHandler):
    """/ping is healthy; POSTs follow ``script``: 503, 'hangup' (close unanswered) or 200."""

    script: list = []
    posts = 0

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"status": "Healthy"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        step = cls.script[min(cls.posts, len(cls.script) - 1)]
        cls.posts += 1
        if step == "hangup":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            self.close_connection = True
            self.connection.close()
        elif step == 503:
            self._send(503, {"code": 503, "type": "ServiceUnavailableException", "message": "queue full"})
        else:
            self._send(200, {"predictions": [{"class_id": 7, "label": "stub", "probability": 0.5}], "cams": []})


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the hang-ups break the handler's final flush, on purpose


@pytest.fixture
def stub():
    server = _QuietServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.posts = 0
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_503_is_retried_a_bounded_number_of_times(stub, tmp_path):
    server, url = stub
    _Stub.script = [503]
    done = explain(DATA / "chelsea.jpg", "--url", url, "--token", "t", "--out", tmp_path, "--retries", "2")
    assert done.returncode == 1
    assert parse(done.stdout)[str(DATA / "chelsea.jpg")] == [
        "error", "503", "ServiceUnavailableException: queue full (after 3 attempts)"]
    assert _Stub.posts == 3
    assert "2 retries (503: 2)" in done.stderr


def test_a_dropped_connection_and_a_503_are_retried_then_answered(stub, tmp_path):
    server, url = stub
    _Stub.script = ["hangup", 503, 200]
    done = explain(DATA / "chelsea.jpg", "--url", url, "--token", "t", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert parse(done.stdout)[str(DATA / "chelsea.jpg")][:3] == ["ok", "stub", "0.5000"]
    assert _Stub.posts == 3
    assert re.search(r"; 2 retries \(503: 1, connection (reset|closed without an answer): 1\)", done.stderr)



@pytest.mark.parametrize("script, rest", [("handler.tools.explain", ["x.jpg"]),
                                          ("handler.tools.grpc_client", ["x.jpg"]), ("devkit.loadtest", [])])
def test_a_token_that_starts_with_a_dash_is_taken_as_the_token(script, rest):
    """TorchServe's keys are URL-safe base64: one in 64 starts with '-' (seen in a full run as
    'argument --token: expected one argument' from the README's gRPC command)."""
    module = importlib.import_module(script)
    assert module.parse_args(["--token", "-EEQWSl", *rest]).token == "-EEQWSl"
    assert module.parse_args([*rest, "--token=--x"]).token == "--x"
    assert module.parse_args([*rest, "--token", ""]).token == ""


def test_the_client_sends_raw_bodies_and_falls_back_to_a_form_for_values_no_header_carries():
    from handler.tools.camclient import Client

    client = Client("http://127.0.0.1:1", "m", "tok", retries=0, timeout=1)
    raw = client._body(Path("cat.jpg"), b"JPEG", {"topk": "3", "cam_classes": "285,tabby"})
    assert raw == {"data": b"JPEG", "headers": {"Authorization": "Bearer tok", "topk": "3", "cam_classes": "285,tabby",
                                                "Content-Type": "application/octet-stream"}}
    for value in ("Ägyptische Katze", "a\nb", " top1"):
        form = client._body(Path("cat.jpg"), b"JPEG", {"cam_classes": value})
        assert form == {"files": {"image": ("cat.jpg", b"JPEG")}, "data": {"cam_classes": value},
                        "headers": {"Authorization": "Bearer tok"}}, value
