"""The nvJPEG routes on a CUDA device: decode and encode, their known traps, and a GPU worker
answering camera photos as the CPU worker does.

Skipped without a GPU (CI has none): scripts/ops/gpu_check.sh runs them on a lent GPU machine.
The same logic runs on the CPU, with torchvision's CPU codecs in nvJPEG's place, in
tests/test_images.py and tests/test_handler.py.
"""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_handler import _batch, _camera, _handler, _jpeg, _same_answers, model_dir, served  # noqa: F401
from test_images import _garbled_jpeg, _mean_abs, _photo

from handler.image_tensors import DeviceJpegRoute, resize_tensor
from handler.images import ImageDecoder, decode_image, image_pixels, open_image
from handler.limits import RequestLimits
from handler.render import DeviceJpegEncoder

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CUDA = torch.device("cuda:0")
LIMITS = RequestLimits()
BICUBIC = Image.Resampling.BICUBIC


def test_nvjpeg_decodes_camera_photos_like_pillow():
    exif = Image.Exif()
    exif[0x0112] = 6
    camera = _camera((4032, 2016))
    datas = [_jpeg(camera), _jpeg(camera.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()),
             _jpeg(_photo().convert("L"))]
    route = DeviceJpegRoute(CUDA)
    route.check()
    photos = route.decode([open_image(d, LIMITS) for d in datas], [(224, 224)] * 3)
    assert all(p is not None and p.pixels.device.type == "cuda" for p in photos)
    assert [p.size for p in photos] == [(4032, 2016), (4032, 2016), (451, 300)]
    for photo, data in zip(photos, datas):
        want = image_pixels(decode_image(data, LIMITS), (224, 224), BICUBIC)
        got = resize_tensor(photo.pixels, (224, 224), "bicubic").cpu().numpy()
        assert _mean_abs(got, want) < 2.0  # nvJPEG upsamples chroma its own way


def test_a_corrupt_jpeg_fails_only_itself_on_the_gpu():
    """A JPEG with a stray marker in its scan: libjpeg refuses it, nvJPEG decoded it without an
    error on an H200 (garbage where the marker sits). So the batch decoder never sends it to the
    device: the CPU route answers 400 for it alone, the others decode on the device. Handed to
    the device route anyway, it leaves the others' pixels as they are alone, whether nvJPEG
    rejects it (its batch is then decoded one by one) or not. (Truncated JPEGs never reach the
    device either: see test_which_images_the_device_route_takes.)"""
    sources = [open_image(_jpeg(_photo()), LIMITS), open_image(_garbled_jpeg(), LIMITS),
               open_image(_jpeg(_photo("coffee.jpg")), LIMITS)]
    route = DeviceJpegRoute(CUDA)
    photos = route.decode(sources, [(224, 224)] * 3)
    for i in (0, 2):
        (alone,) = route.decode([sources[i]], [(224, 224)])
        assert torch.equal(photos[i].pixels, alone.pixels) and photos[i].size == alone.size
    decoder = ImageDecoder(2, route)
    assert decoder.routes(sources) == ["device", "cpu", "device"]
    out = decoder.decode(sources, [(224, 224)] * 3)
    decoder.close()
    assert out[0].on_device and type(out[1]).__name__ == "InvalidInput" and out[2].on_device


def test_decoding_does_not_overwrite_memory_queued_kernels_still_read():
    """nvJPEG writes on its own stream into memory the caching allocator hands out; memory freed
    on the current stream while kernels there still read it must not be reused before they ran
    (vision PR #9606, not merged): the route synchronises the stream first."""
    camera = _jpeg(_camera((4032, 2016)))
    source = open_image(camera, LIMITS)
    ones = torch.ones(3 * 2016 * 4032, dtype=torch.uint8, device=CUDA)  # the decoded image's size
    total = torch.zeros((), dtype=torch.int64, device=CUDA)
    torch.cuda._sleep(200_000_000)  # the reads below start only after a while
    for _ in range(20):
        total += ones.sum(dtype=torch.int64)
    del ones  # back to the allocator while the reads are still queued
    (photo,) = DeviceJpegRoute(CUDA).decode([source], [(4032, 2016)])
    assert int(total) == 20 * 3 * 2016 * 4032
    want = np.asarray(decode_image(camera, LIMITS))
    assert _mean_abs(photo.pixels.permute(1, 2, 0).cpu().numpy(), want) < 2.0


def test_nvjpeg_encodes_overlays_that_decode_back():
    image = torch.from_numpy(np.asarray(_photo().resize((512, 340))).copy()).to(CUDA)
    encoder = DeviceJpegEncoder(CUDA)
    encoder.check()
    blank = torch.zeros((256, 128, 3), dtype=torch.uint8, device=CUDA)
    # A kernel still writing the image when encoding starts must be waited for.
    torch.cuda._sleep(100_000_000)
    bright = (image.float() * 0.5 + 64).to(torch.uint8)
    encoded = encoder.encode([bright, blank], 90)
    assert [t.device.type for t in encoded] == ["cuda", "cuda"]
    back = Image.open(io.BytesIO(encoded[0].cpu().numpy().tobytes()))
    assert back.format == "JPEG" and back.size == (512, 340)
    assert _mean_abs(np.asarray(back.convert("RGB")), bright.cpu().numpy()) < 3.0
    assert Image.open(io.BytesIO(encoded[1].cpu().numpy().tobytes())).size == (128, 256)


def test_a_gpu_worker_decodes_on_the_gpu_and_answers_as_the_cpu_worker(model_dir, served):  # noqa: F811
    service, context = served
    gpu, gpu_context = _handler(model_dir, gpu=0)
    assert gpu.decoder.device_route is not None and gpu.encoder is not None
    cpu_only, cpu_only_context = _handler(model_dir, gpu=0, decode_device="cpu", encode_device="cpu")
    assert cpu_only.decoder.device_route is None and cpu_only.encoder is None
    exif = Image.Exif()
    exif[0x0112] = 8
    camera = _camera((4032, 2016))
    items = [{"image": _jpeg(camera), "outputs": "map,overlay"},
             {"image": _jpeg(camera.transpose(Image.Transpose.ROTATE_270), exif=exif.tobytes()),
              "outputs": "map,heatmap,overlay"},
             {"body": _garbled_jpeg()},
             {"image": _jpeg(camera.convert("CMYK")), "outputs": "map,overlay"},
             {"body": _jpeg(_photo(), progressive=True)},
             {"body": _jpeg(_photo())[:20000]}]  # truncated: the CPU route answers it
    routes = gpu.decoder.routes([open_image(i.get("image", i.get("body")), LIMITS) for i in items])
    assert routes == ["device", "device", "cpu", "cpu", "cpu", "cpu"]  # the damaged scan: see above
    want_status, want = _batch(service, context, items)
    for worker, worker_context in ((gpu, gpu_context), (cpu_only, cpu_only_context)):
        got_status, got = _batch(worker, worker_context, items)
        assert got_status == want_status == [200, 200, 400, 200, 200, 400]
        _same_answers(got, want)
        for g in got:
            for cam in g.get("cams", []):
                if "overlay" in cam:
                    overlay = Image.open(io.BytesIO(base64.b64decode(cam["overlay"])))
                    assert overlay.format == "JPEG" and list(overlay.size) == g["frame_size"]


def test_decode_device_cuda_loads_on_a_gpu_worker(model_dir):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        service, _ = _handler(model_dir, gpu=0, decode_device="cuda", encode_device="cuda")
    assert service.pipeline.decoder.device_route.device == CUDA and service.pipeline.encoder.device == CUDA
