"""Every model family archived with no ``--target-layer`` and served by a real TorchServe: the
automatic layer, layout and grid in the archive and the response, and maps equal to
pytorch-grad-cam's computed in-process on the same pixels. End to end as well: a ViT at 160 px
letterboxed (maps and ``grid_box`` against a reference), a CNN at 192x256, ``topk`` smaller
than a ``topN`` CAM request, archives without labels, and ``chefer`` and ``legrad`` on timm's and
torchvision's ViT against the papers' definitions.

Images are sent as PNGs at the model's input size (or letterboxed without resampling), so that
the reference sees exactly the served pixels.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, EAGER
from PIL import Image
from support.archiver_main import finish_batch, run_main, start_batch
from support.attention import chefer_reference, legrad_reference, timm_twin
from support.families import BY_KEY, FAMILIES, Family, pgc_maps, save_weights

from devkit.tslocal import LocalServer
from handler.vocab import ATTENTION_METHODS

pytestmark = pytest.mark.server

# Every model in a TorchServe costs seconds of CPU at each start (its venv, its worker importing
# torch and timm), so two archives prove two things each:
# - the timm ViT family row is served by vit160 (the same timm VisionTransformer, class token,
#   automatic layer blocks.11.norm1, built for 160 px): tests/test_layouts.py proves the picker
#   on the 224 px one, and every assertion of the row runs on vit160;
# - the CNN at a non-square size (and topk vs topN, archives without labels) is the convnext
#   family archived at 192x256 with --labels none: the convnext row (automatic stages.3) runs at
#   6x8. A torchvision CNN's automatic layer4 is served by the session's resnet18_10
#   (tests/test_archive.py).
VIT160 = BY_KEY["vit160"]
CNN = replace(BY_KEY["convnext"], key="convnext_192x256", size=(192, 256), grid=(6, 8),
              archive_args=("--input-size", "192", "256", "--labels", "none"))
ROWS = [VIT160 if f.key == "vit" else CNN if f.key == "convnext" else f for f in FAMILIES]
# Two TorchServes of four models each. A server creates its models' venvs one after another
# (seconds of one core each) before their workers load: the server of the four archives this
# process builds starts while another process (torch and timm imported once for its four) is
# still archiving the others for the second server.
_OWN_PROCESS = ("tv_vit", "swin", "maxvit", "levit")


class _Servers:
    """The family servers as one: each model is asked of the server that loaded it."""

    def __init__(self) -> None:
        self.by_model: dict[str, LocalServer] = {}

    def predict(self, model: str, **kwargs):
        return self.by_model[model].predict(model, **kwargs)


@pytest.fixture(scope="module")
def family_models() -> dict[str, torch.nn.Module]:
    """Each served model, seeded: the very weights its archive carries."""
    return {f.key: f.build() for f in ROWS}


@pytest.fixture(scope="module")
def family_server(tmp_path_factory, family_models):
    """One archive per served model, built by handler/tools/archive.py's main with no
    --target-layer, and the TorchServes that serve them."""
    store = tmp_path_factory.mktemp("family_store")
    weights = tmp_path_factory.mktemp("family_weights")
    jobs = []
    for f in ROWS:
        path = save_weights(family_models[f.key], weights / f"{f.key}.safetensors")
        kwargs = {k: v for k, v in f.kwargs.items() if k != "num_classes"}
        classes = ["--num-classes", str(f.kwargs["num_classes"])] if "num_classes" in f.kwargs else []
        jobs.append((f.key, ["-q", "--export-path", str(store), "--model", f.source, "--model-kwargs",
                             json.dumps(kwargs), "--weights", str(path), "--name", f.key, *classes,
                             *f.archive_args, *EAGER]))
    groups = ([key for key, _ in jobs if key not in _OWN_PROCESS], list(_OWN_PROCESS))
    started = time.monotonic()
    servers = _Servers()
    starting: list[tuple[LocalServer, Future]] = []
    pool = ThreadPoolExecutor(2)

    def serve(keys: list[str], done: dict) -> None:
        for key in keys:
            assert done[key].returncode == 0, f"archiving {key} failed:\n{done[key].stderr}"
        server = LocalServer(store, [f"{key}.mar" for key in keys], tmp_path_factory.mktemp("family_server"))
        starting.append((server, pool.submit(server.start)))
        servers.by_model.update(dict.fromkeys(keys, server))

    batch = start_batch([job for job in jobs if job[0] in _OWN_PROCESS], weights / "jobs.json")
    try:
        serve(groups[0], {key: run_main(argv) for key, argv in jobs if key in groups[0]})
        serve(groups[1], finish_batch(batch))
        print(f"\n{len(ROWS)} family archives built in {time.monotonic() - started:.0f}s")
        for _, future in starting:
            future.result()
        print(f"{len(ROWS)} models served in {time.monotonic() - started:.0f}s")
        yield servers
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.communicate()
        for server, future in starting:
            try:
                future.result()
            except Exception:  # raised above; start() has stopped it
                pass
            server.stop()
        pool.shutdown()


@pytest.fixture(scope="module")
def family_store(family_server) -> Path:
    return next(iter(family_server.by_model.values())).model_store


# --------------------------------------------------------------------------- helpers


def _handler_config(store, key: str) -> dict:
    with zipfile.ZipFile(store / f"{key}.mar") as mar:
        return yaml.safe_load(mar.read("model-config.yaml"))["handler"]


def _photo(width: int, height: int) -> np.ndarray:
    """The cat photo resized to ``width x height`` (uint8 HWC): the pixels both sides use."""
    image = Image.open(DATA / "chelsea.jpg").convert("RGB")
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _model_input(pixels: np.ndarray, config: dict) -> torch.Tensor:
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def _reference(family: Family, model: torch.nn.Module, x: torch.Tensor, classes, method: str = "gradcam"):
    """pytorch-grad-cam's low-res map per class for one image (a copy of the model: its backward
    fills .grad)."""
    twin = copy.deepcopy(model)
    layer = dict(twin.named_modules())[family.layer]
    batch = x.expand(len(classes), -1, -1, -1)
    return pgc_maps(twin, layer, batch, torch.as_tensor(classes), [method], family.pgc_reshape())[method]


def _check_maps(body: dict, want: torch.Tensor, atol: float = 6e-4) -> None:
    got = torch.tensor([cam["map"] for cam in body["cams"]], dtype=torch.float64)
    assert got.shape == want.shape
    assert (want.flatten(1).amax(dim=1) > 0.99).all(), "reference maps must be non-trivial"
    # The response rounds to 3 decimals.
    torch.testing.assert_close(got, want.double(), atol=atol, rtol=0)


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", ROWS, ids=[f.key for f in ROWS])
def test_family_is_served_with_its_automatic_layer(family_server, family_store, family_models, family):
    config = _handler_config(family_store, family.key)
    assert config["target_layer"] == family.layer, family.why
    assert config["layout"] == family.layout
    nlc = family.layout == "nlc"
    assert config["prefix_tokens"] == (family.prefix if nlc else None)
    assert config["grid"] == (list(family.grid) if nlc else None)
    assert config["input_size"] == list(family.size)

    h, w = family.size
    pixels = _photo(w, h)
    r = family_server.predict(family.key, files={"image": ("cat.png", _png(pixels))},
                              data={"cam_classes": "top2", "topk": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target_layer"] == family.layer and body["layout"] == family.layout
    gh, gw = family.grid
    assert body["grid_size"] == [gw, gh] and body["grid_box"] == [0.0, 0.0, float(gw), float(gh)]

    model = family_models[family.key]
    x = _model_input(pixels, config)
    with torch.no_grad():
        top = model(x).softmax(dim=1)[0].topk(3)
    assert [p["class_id"] for p in body["predictions"]] == top.indices.tolist()
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], top.values.numpy(), atol=1e-5)
    assert [c["class_id"] for c in body["cams"]] == top.indices[:2].tolist()
    _check_maps(body, _reference(family, model, x, top.indices[:2]))


@pytest.mark.parametrize("method", ATTENTION_METHODS)
@pytest.mark.parametrize("key", ["vit160", "tv_vit"])
def test_timm_and_torchvision_vits_serve_the_attention_methods(family_server, family_store, family_models, key,
                                                               method):
    """chefer and legrad from a real TorchServe on timm's ViT and on torchvision's: the maps equal
    the papers' definitions computed in-process in fp64, torchvision's on its timm twin (the same
    weights in timm's VisionTransformer, so the reference shares no code with the served path)."""
    family = next(f for f in ROWS if f.key == key)
    config = _handler_config(family_store, key)
    h, w = family.size
    pixels = _photo(w, h)
    r = family_server.predict(key, files={"image": ("cat.png", _png(pixels))},
                              data={"cam_method": method, "cam_classes": "top2"})
    assert r.status_code == 200, r.text
    body = r.json()
    gh, gw = family.grid
    assert [c["method"] for c in body["cams"]] == [method, method] and body["grid_size"] == [gw, gh]
    model = family_models[key]
    twin = (timm_twin(model) if key == "tv_vit" else copy.deepcopy(model)).double()
    x = _model_input(pixels, config).double()
    with torch.no_grad():
        assert [c["class_id"] for c in body["cams"]] == twin(x)[0].topk(2).indices.tolist()
    reference = chefer_reference if method == "chefer" else legrad_reference
    want = torch.stack([reference(twin, x[0], c["class_id"]).detach() for c in body["cams"]]).flatten(1)
    want = (want - want.amin(dim=1, keepdim=True)) / (want.amax(dim=1, keepdim=True) - want.amin(dim=1, keepdim=True))
    # Rounding (5e-4) plus the served fp32 against the fp64 reference: the maps' values are small
    # at random weights and min-max scaling carries fp32's error up to ~1.1e-4 (seen).
    _check_maps(body, want.view(-1, gh, gw), atol=1e-3)


# --------------------------------------------------------------------------- end to end


def test_vit_at_160_letterboxed_maps_and_grid_box(family_server, family_store, family_models):
    """A ViT built for 160 px (10x10 patches; the input size comes from --model-kwargs), a
    160x96 photo letterboxed without resampling: the image covers grid rows 2..8."""
    family = VIT160
    config = _handler_config(family_store, "vit160")
    assert config["input_size"] == [160, 160] and config["resize"] == "letterbox" and config["labels"] == ""
    pixels = _photo(160, 96)
    r = family_server.predict("vit160", files={"image": ("wide.png", _png(pixels))},
                              data={"outputs": "map,heatmap"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["layout"] == "nlc" and body["grid_size"] == [10, 10]
    assert body["image_size"] == [160, 96] and body["input_size"] == [160, 160]
    assert body["grid_box"] == [0.0, 2.0, 10.0, 8.0]

    canvas = np.empty((160, 160, 3), dtype=np.uint8)
    canvas[:] = np.round(np.asarray(config["mean"]) * 255).astype(np.uint8)
    canvas[32:128] = pixels
    x = _model_input(canvas, config)
    model = family_models["vit160"]
    with torch.no_grad():
        top1 = int(model(x).argmax())
    assert body["cams"][0]["class_id"] == top1
    want = _reference(family, model, x, [top1])
    _check_maps(body, want)
    # The heatmap is the grid_box part of the map, in the photo's frame.
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["cams"][0]["heatmap"]))))
    assert heat.shape == (96, 160)
    inside = want[0, 2:8].numpy()
    row, col = np.unravel_index(np.argmax(inside), inside.shape)
    y, x_ = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(y - (row + 0.5) * 16) <= 16 and abs(x_ - (col + 0.5) * 16) <= 16, ((y, x_), (row, col))


def test_no_labels_means_class_ids(family_server):
    for model in (VIT160.key, CNN.key):
        r = family_server.predict(model, files={"image": ("cat.png", _png(_photo(64, 48)))})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["predictions"] and all(p["label"] == str(p["class_id"]) for p in body["predictions"])
        assert all(c["label"] == str(c["class_id"]) for c in body["cams"])


def test_cnn_at_192x256(family_server, family_store, family_models):
    family = CNN
    config = _handler_config(family_store, family.key)
    assert config["input_size"] == [192, 256] and config["layout"] == "nchw"
    pixels = _photo(256, 192)
    r = family_server.predict(family.key, files={"image": ("cat.png", _png(pixels))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grid_size"] == [8, 6] and body["input_size"] == [256, 192] and body["layout"] == "nchw"
    assert np.array(body["cams"][0]["map"]).shape == (6, 8)
    assert len(body["predictions"]) == 5
    x = _model_input(pixels, config)
    with torch.no_grad():
        top1 = int(family_models[family.key](x).argmax())
    _check_maps(body, _reference(family, family_models[family.key], x, [top1]))


def test_topk_smaller_than_a_top_n_cam_request(family_server, family_store, family_models):
    """topk=1 with cam_classes=top3: one prediction, and maps for the three best classes."""
    family = CNN
    config = _handler_config(family_store, family.key)
    pixels = _photo(256, 192)
    r = family_server.predict(family.key, files={"image": ("cat.png", _png(pixels))},
                              data={"topk": "1", "cam_classes": "top3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 1 and len(body["cams"]) == 3
    wider = family_server.predict(family.key, files={"image": ("cat.png", _png(pixels))}, data={"topk": "3"}).json()
    top3 = [p["class_id"] for p in wider["predictions"]]
    assert [c["class_id"] for c in body["cams"]] == top3
    assert body["predictions"][0]["class_id"] == top3[0]
    x = _model_input(pixels, config)
    with torch.no_grad():
        assert family_models[family.key](x)[0].topk(3).indices.tolist() == top3
    _check_maps(body, _reference(family, family_models[family.key], x, top3))
