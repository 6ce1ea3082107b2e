"""The handler in-process, driven through a real TorchServe context with a tiny seeded model."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DATA, ROOT, photo
from PIL import Image
from safetensors.torch import save_file
from ts.context import Context, RequestProcessor

from handler.cam import compute_cams, normalize_maps
from handler.images import decode_pixels, open_image
from handler.limits import RequestLimits
from handler.service import GradCamHandler

LABELS = ["circle", "square", "triangle"]


def _tinynet():
    from support.tinynet import tinynet_class

    TinyNet = tinynet_class()  # noqa: N806

    torch.manual_seed(0)
    return TinyNet(num_classes=3).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinynet_archive")
    save_file(_tinynet().state_dict(), str(folder / "model.safetensors"))
    (folder / "model_src").mkdir()
    shutil.copy(DATA / "tinynet" / "model.py", folder / "model_src" / "model.py")
    (folder / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(LABELS)}))
    return folder


def _config(**handler) -> dict:
    base = {"model": "model_src/model.py:TinyNet", "num_classes": 3, "target_layer": "features",
            "input_size": [64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "topk": 3}
    return {"batchSize": 8, "handler": {**base, **handler}}


def _context(model_dir, config: dict, gpu: int | None = None) -> Context:
    manifest = {"model": {"modelName": "tinynet", "serializedFile": "model.safetensors"}}
    return Context("tinynet", str(model_dir), manifest, 8, gpu, "0.12.0", model_yaml_config=config)


def _handler(model_dir, gpu: int | None = None, **handler) -> tuple[GradCamHandler, Context]:
    context = _context(model_dir, _config(**handler), gpu)
    service = GradCamHandler()
    service.initialize(context)
    return service, context


def _batch(service, context, items: list[dict], headers: list[dict] | None = None):
    headers = headers or [{} for _ in items]
    context.request_processor = [RequestProcessor(h) for h in headers]
    out = service.handle(items, context)
    assert len(out) == len(items)
    statuses = [context.get_response_status(i)[0] for i in range(len(items))]
    types = [context.get_response_content_type(i) for i in range(len(items))]
    assert types == ["application/json"] * len(items)
    return statuses, [json.loads(o) for o in out]


def _png(size=(80, 48), colour=(200, 30, 30)) -> bytes:
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2] = colour
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(model_dir):
    return _handler(model_dir)


def test_a_batch_answers_predictions_and_maps_equal_to_the_reference(served):
    service, context = served
    statuses, bodies = _batch(service, context, [{"body": _png()}, {"body": photo("chelsea.jpg")}])
    assert statuses == [200, 200]
    model = _tinynet()
    for body, image in zip(bodies, [_png(), photo("chelsea.jpg")]):
        assert body["batch_size"] == 2 and body["model"] == "tinynet" and body["target_layer"] == "features"
        assert [p["label"] for p in body["predictions"]] == [LABELS[p["class_id"]] for p in body["predictions"]]
        assert sorted(p["class_id"] for p in body["predictions"]) == [0, 1, 2]
        assert body["grid_size"] == [8, 8]
        # The same pixels through the reference path: decode at the scale needed (chelsea.jpg at
        # 1/4, see test_images.py for its parity with a full decode), resize, normalise, compute_cams.
        pixels = decode_pixels(open_image(image, RequestLimits()), (64, 64)).resized((64, 64), Image.Resampling.BICUBIC)
        x = (torch.tensor(pixels).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        probs = model(x).softmax(1)[0]
        assert body["predictions"][0]["class_id"] == int(probs.argmax())
        np.testing.assert_allclose([p["probability"] for p in body["predictions"]],
                                   probs.sort(descending=True).values.detach().numpy(), atol=1e-5)
        want = normalize_maps(compute_cams(model, "features", x, [int(probs.argmax())]))[0]
        np.testing.assert_allclose(body["cams"][0]["map"], want.numpy(), atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_answers_equal_the_cpu_answers(served, model_dir, monkeypatch):
    """gpu_id from TorchServe puts the model on that device; predictions, maps, heatmaps and
    overlays match the CPU worker's, bad requests still fail alone.

    The photos decode and encode on the CPU here, as the CPU worker's do: nvJPEG's decode and
    the device's resize give pixels a little off libjpeg's and Pillow's, and this small
    random-weight model's maps (channel weights of mixed signs that nearly cancel) move with
    them. With the device codecs on, an H200 run differed by up to 0.067 in a map; TF32 alone
    moves them by 0.0015 (emulated on the CPU). The device codecs are compared with their own
    tolerance in tests/test_images_cuda.py. TF32 off, as in the other CUDA tests."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    service, context = served
    gpu_service, gpu_context = _handler(model_dir, gpu=0, decode_device="cpu", encode_device="cpu")
    assert gpu_service.device == torch.device("cuda:0")
    assert next(gpu_service.pipeline.engine.model.parameters()).is_cuda
    items = [{"body": _png()}, {"image": photo("chelsea.jpg"), "cam_classes": "top2", "outputs": "map,heatmap,overlay"},
             {"body": b"not an image"}, {"image": _png((40, 90)), "cam_method": "gradcam++"}]
    want_status, want = _batch(service, context, items)
    got_status, got = _batch(gpu_service, gpu_context, items)
    assert got_status == want_status == [200, 200, 415, 200]
    for g, w in zip(got, want):
        if "error" in w:
            assert g["error"] == w["error"]
            continue
        assert [p["class_id"] for p in g["predictions"]] == [p["class_id"] for p in w["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in g["predictions"]],
                                   [p["probability"] for p in w["predictions"]], atol=1e-4)
        assert len(g["cams"]) == len(w["cams"])
        for gc, wc in zip(g["cams"], w["cams"]):
            np.testing.assert_allclose(gc["map"], wc["map"], atol=2e-3)
            for form in ("heatmap", "overlay"):
                if form in wc:
                    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(gc[form]))), dtype=int)
                    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(wc[form]))), dtype=int)
                    assert a.shape == b.shape and np.abs(a - b).mean() < 2, form


def test_bad_requests_fail_alone_and_the_rest_match_their_single_answers(served):
    service, context = served
    good = {"body": _png()}
    _, (alone,) = _batch(service, context, [good])
    items = [good, {"body": b""}, {"image": _png(), "topk": b"0"}, {"body": b"not an image"},
             {"body": {"image": "!!!"}}, good]
    statuses, bodies = _batch(service, context, items)
    assert statuses == [200, 400, 400, 415, 400, 200]
    assert [b.get("field") for b in bodies[1:5]] == ["body", "topk", "image", "image"]
    assert all(b["batch_size"] == 6 for b in bodies)
    for body in (bodies[0], bodies[5]):
        assert [p["class_id"] for p in body["predictions"]] == [p["class_id"] for p in alone["predictions"]]
        np.testing.assert_allclose(body["cams"][0]["map"], alone["cams"][0]["map"], atol=1e-3)


def test_options_per_request_in_one_batch(served):
    service, context = served
    items = [
        {"image": _png(), "cam_classes": "square,2", "cam_method": "layercam", "outputs": "map,heatmap"},
        {"body": {"image": base64.b64encode(_png()).decode(), "topk": 1, "cam_classes": "none"}},
        {"body": _png()},
    ]
    statuses, bodies = _batch(service, context, items, headers=[{}, {}, {"TopK": "2", "outputs": "overlay"}])
    assert statuses == [200, 200, 200]
    first, second, third = bodies
    assert [(c["class_id"], c["label"], c["method"]) for c in first["cams"]] == [
        (1, "square", "layercam"), (2, "triangle", "layercam")]
    heat = Image.open(io.BytesIO(base64.b64decode(first["cams"][0]["heatmap"])))
    assert heat.mode == "L" and heat.size == (80, 48)
    assert len(second["predictions"]) == 1 and second["cams"] == []
    assert len(third["predictions"]) == 2
    assert set(third["cams"][0]) == {"class_id", "label", "method", "overlay"}
    overlay = Image.open(io.BytesIO(base64.b64decode(third["cams"][0]["overlay"])))
    assert overlay.format == "JPEG" and overlay.size == (80, 48)


def test_frames_keep_the_aspect_and_cap_the_long_side(served):
    service, context = served
    _, (body,) = _batch(service, context, [{"image": _png((1500, 300)), "outputs": "heatmap"}])
    heat = Image.open(io.BytesIO(base64.b64decode(body["cams"][0]["heatmap"])))
    assert heat.size == (512, 102) and body["frame_size"] == [512, 102]
    _, (thin,) = _batch(service, context, [{"image": _png((1, 50)), "outputs": "heatmap,overlay"}])
    assert Image.open(io.BytesIO(base64.b64decode(thin["cams"][0]["heatmap"]))).size == (1, 50)


def test_letterbox_reports_where_the_image_lies_on_the_grid(model_dir):
    service, context = _handler(model_dir, resize="letterbox")
    _, (body,) = _batch(service, context, [{"image": _png((128, 64)), "outputs": "map,heatmap"}])
    assert body["resize"] == "letterbox"
    assert body["grid_box"] == [0.0, 2.0, 8.0, 6.0]  # 64x32 of the 64x64 input, centred
    assert Image.open(io.BytesIO(base64.b64decode(body["cams"][0]["heatmap"]))).size == (128, 64)


def test_explain_header_gets_the_same_answer(served):
    service, context = served
    _, (plain,) = _batch(service, context, [{"body": _png()}])
    _, (explained,) = _batch(service, context, [{"body": _png()}], headers=[{"explain": "True"}])
    assert explained["cams"][0]["map"] == plain["cams"][0]["map"]


def test_a_failing_pass_fails_its_batch_only(model_dir, monkeypatch):
    service, context = _handler(model_dir)
    real = service.pipeline.engine.forward

    def _boom(x):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(service.pipeline.engine, "forward", _boom)
    statuses, bodies = _batch(service, context, [{"body": _png()}, {"body": b""}])
    assert statuses == [500, 400]
    assert bodies[0]["error"] == "model_failure" and "injected fault" in bodies[0]["message"]

    def _oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(service.pipeline.engine, "forward", _oom)
    statuses, bodies = _batch(service, context, [{"body": _png()}])
    assert statuses == [507] and bodies[0]["error"] == "device_out_of_memory"
    monkeypatch.setattr(service.pipeline.engine, "forward", real)
    statuses, _ = _batch(service, context, [{"body": _png()}])
    assert statuses == [200]


def test_a_response_over_the_limit_is_refused_not_sent(model_dir):
    service, context = _handler(model_dir, max_response_bytes=4096)
    statuses, bodies = _batch(service, context, [{"image": _png((400, 400)), "outputs": "heatmap"},
                                                 {"body": _png()}])
    assert statuses == [413, 200]
    assert bodies[0]["error"] == "response_too_large" and bodies[0]["field"] == "outputs"


def test_the_served_model_stays_frozen_and_hook_free(served):
    service, context = served
    _batch(service, context, [{"body": _png()}])
    model = service.pipeline.engine.model
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_a_bad_archive_config_fails_the_load(model_dir):
    with pytest.raises(ValueError, match="target layer 'featurez'.*closest: features"):
        _handler(model_dir, target_layer="featurez")
    with pytest.raises(ValueError, match="unknown handler config keys: colour"):
        _handler(model_dir, colour="red")
    with pytest.raises(ValueError, match="'malloc_trim_threshold_mib' must be 0 .* up to 2047"):
        _handler(model_dir, malloc_trim_threshold_mib=4096)


# A child process: RSS (MiB) before, with and after freeing a 64 MiB buffer whose pages are all
# touched; with glibc's defaults a block that large is its own mapping and goes back on free.
_MALLOC_PROBE = """
import ctypes, sys
from handler.host import tune_malloc
ok = tune_malloc(int(sys.argv[2]), int(sys.argv[3]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
held = rss()
libc.free(block)
print(ok, round(held - before), round(rss() - before))
"""


@pytest.mark.parametrize("thresholds, kept", [((0, 0), False), ((256, 1024), True)])
def test_malloc_tuning_keeps_freed_batch_memory(thresholds, kept):
    done = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, str(ROOT), *map(str, thresholds)],
                          capture_output=True, text=True, timeout=60, check=True)
    ok, held, after = done.stdout.split()
    assert ok == "True" and int(held) >= 60
    # Tuned, the freed 64 MiB stays in the heap for the next batch; untuned, it is unmapped.
    assert (int(after) >= 60) if kept else (int(after) <= 8), done.stdout


# --- decoding: scale, threads, the device routes (run on the CPU here) ------------------------


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def _camera(size=(2016, 1008)) -> Image.Image:
    from devkit.camera_photos import camera_pixels

    return camera_pixels(Image.open(DATA / "chelsea.jpg"), size)


def _cpu_codecs():
    """torchvision's CPU JPEG decoder and encoder standing in for nvJPEG's."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    def decode(tensors):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(list(tensors), mode=ImageReadMode.RGB)

    def encode(images, quality):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return encode_jpeg(list(images), quality=quality)

    return decode, encode


def _same_answers(got: list[dict], want: list[dict], atol: float = 0.02) -> None:
    for g, w in zip(got, want):
        assert ("error" in g) == ("error" in w)
        if "error" in w:
            assert (g["error"], g["field"]) == (w["error"], w["field"])
            continue
        assert g["image_size"] == w["image_size"] and g["frame_size"] == w["frame_size"]
        assert g["predictions"][0]["class_id"] == w["predictions"][0]["class_id"]
        np.testing.assert_allclose([p["probability"] for p in g["predictions"]],
                                   [p["probability"] for p in w["predictions"]], atol=atol)
        np.testing.assert_allclose(g["cams"][0]["map"], w["cams"][0]["map"], atol=0.1)


def test_a_camera_photo_is_answered_in_its_own_frame(served):
    """Decoded at 1/8 scale, a 12 MP photo still reports its full displayed size and frames."""
    service, context = served
    exif = Image.Exif()
    exif[0x0112] = 6
    camera = _camera((4032, 2016))
    items = [{"image": _jpeg(camera), "outputs": "map,heatmap,overlay"},
             {"image": _jpeg(camera.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()),
              "outputs": "map,overlay"}]
    statuses, bodies = _batch(service, context, items)
    assert statuses == [200, 200]
    for body in bodies:
        assert body["image_size"] == [4032, 2016] and body["frame_size"] == [512, 256]
        overlay = Image.open(io.BytesIO(base64.b64decode(body["cams"][0]["overlay"])))
        assert overlay.size == (512, 256)
    heat = Image.open(io.BytesIO(base64.b64decode(bodies[0]["cams"][0]["heatmap"])))
    assert heat.size == (512, 256)
    assert bodies[0]["predictions"][0]["class_id"] == bodies[1]["predictions"][0]["class_id"]
    np.testing.assert_allclose(bodies[0]["cams"][0]["map"], bodies[1]["cams"][0]["map"], atol=0.05)


@pytest.mark.parametrize("threads", [0, 4])
def test_decode_threads_do_not_change_the_answers(model_dir, served, threads):
    service, context = served
    other, other_context = _handler(model_dir, decode_threads=threads)
    assert (other.pipeline.decoder._pool is None) == (threads == 0)
    items = [{"body": _jpeg(_camera())}, {"body": photo("coffee.jpg")}, {"body": photo("chelsea.jpg")[:9000]},
             {"body": _png((300, 200))}]
    want_status, want = _batch(service, context, items)
    got_status, got = _batch(other, other_context, items)
    assert got_status == want_status == [200, 200, 400, 200]
    assert got == want


def test_the_device_routes_answer_as_the_cpu_does(model_dir, served):
    """The nvJPEG decode and encode paths with the CPU codecs in nvJPEG's place: the same answers
    as the CPU route; a JPEG with a damaged scan goes the CPU route and fails alone (nvJPEG
    would decode it: see test_images.py's scan walk)."""
    from handler.image_tensors import DeviceJpegRoute
    from handler.images import ImageDecoder
    from handler.render import DeviceJpegEncoder

    service, context = served
    decode, encode = _cpu_codecs()
    device, device_context = _handler(model_dir)
    device.pipeline.decoder = ImageDecoder(2, DeviceJpegRoute("cpu", decode=decode))
    device.pipeline.encoder = DeviceJpegEncoder("cpu", encode=encode)
    exif = Image.Exif()
    exif[0x0112] = 8
    chelsea = Image.open(DATA / "chelsea.jpg")
    garbled = bytearray(photo("chelsea.jpg"))
    scan = garbled.index(b"\xff\xda")
    garbled[scan + 200 : scan + 260] = b"\xff" * 60
    items = [{"image": _jpeg(_camera()), "outputs": "map,overlay"},
             {"image": _jpeg(chelsea.transpose(Image.Transpose.ROTATE_270), exif=exif.tobytes()),
              "outputs": "map,heatmap,overlay", "cam_classes": "top2"},
             {"body": bytes(garbled)},
             {"image": _jpeg(chelsea.convert("CMYK")), "outputs": "map,overlay"},
             {"body": _jpeg(chelsea, progressive=True)},
             {"image": _png((90, 40)), "outputs": "map,overlay"},
             {"body": photo("chelsea.jpg")[:20000]}]  # truncated: never sent to the device
    routes = device.pipeline.decoder.routes([open_image(i.get("image", i.get("body")), RequestLimits()) for i in items])
    assert routes == ["device", "device", "cpu", "cpu", "cpu", "cpu", "cpu"]
    want_status, want = _batch(service, context, items)
    got_status, got = _batch(device, device_context, items)
    assert got_status == want_status == [200, 200, 400, 200, 200, 200, 400]
    assert "truncated" in got[6]["message"]
    assert got[2]["field"] == "image" and "corrupt" in got[2]["message"]
    _same_answers(got, want)
    for g, w in zip(got, want):
        for gc, wc in zip(g.get("cams", []), w.get("cams", [])):
            if "overlay" in wc:
                a = np.asarray(Image.open(io.BytesIO(base64.b64decode(gc["overlay"]))), dtype=int)
                b = np.asarray(Image.open(io.BytesIO(base64.b64decode(wc["overlay"]))), dtype=int)
                assert a.shape == b.shape == (g["frame_size"][1], g["frame_size"][0], 3)
                assert np.abs(a - b).mean() < 6


def test_codec_devices_need_a_cuda_worker(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this worker has a GPU")
    service, _ = _handler(model_dir)  # auto on a CPU worker: Pillow, and overlays encoded by Pillow
    assert service.pipeline.decoder.device_route is None and service.pipeline.encoder is None
    for key in ("decode_device", "encode_device"):
        with pytest.raises(ValueError, match=f"'{key}' is 'cuda' but this worker runs on cpu"):
            _handler(model_dir, **{key: "cuda"})
    with pytest.raises(ValueError, match="'decode_device' must be one of auto, cpu, cuda"):
        _handler(model_dir, decode_device="gpu")
    with pytest.raises(ValueError, match="'decode_threads' must be an integer in 0..64"):
        _handler(model_dir, decode_threads=-1)


def test_the_outputs_asked_for_do_not_change_the_answer(served):
    """A large JPEG is decoded for the model at the scale its input needs whatever the outputs:
    predictions and maps are the same with and without an overlay, whose background is decoded
    once more at its frame's scale (sharp at 512 px, not upscaled from the model's decode)."""
    service, context = served
    photo_bytes = _jpeg(_camera((2000, 1000)))
    _, (plain,) = _batch(service, context, [{"image": photo_bytes, "outputs": "map"}])
    _, (drawn,) = _batch(service, context, [{"image": photo_bytes, "outputs": "map,overlay"}])
    assert drawn["predictions"] == plain["predictions"]
    assert drawn["cams"][0]["map"] == plain["cams"][0]["map"]
    overlay = Image.open(io.BytesIO(base64.b64decode(drawn["cams"][0]["overlay"])))
    assert overlay.size == (512, 256) and drawn["frame_size"] == [512, 256]
    # Its background is the photo at 512 px, as sharp as a full decode resized to 512 px.
    want = Image.open(io.BytesIO(photo_bytes)).convert("L").resize((512, 256), Image.Resampling.BILINEAR)
    got = np.asarray(overlay.convert("L"), dtype=float)
    detail = np.abs(np.diff(np.asarray(want, dtype=float), axis=1)).mean()
    assert np.abs(np.diff(got, axis=1)).mean() > 0.5 * detail
