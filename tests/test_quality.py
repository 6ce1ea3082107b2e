"""The faithfulness score (``quality=true``, handler/quality.py): imputation, definitions, one extra
forward, options, and on the default model, real maps against random regions of the same size."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import requests
import torch
from conftest import DATA, DEFAULT, photo
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torch import nn

from handler.cam import CamEngine, normalize_maps
from handler.codec import extract_request, header_options
from handler.config import ServeConfig
from handler.errors import InvalidOption
from handler.image_tensors import model_batch
from handler.images import Photo
from handler.limits import RequestLimits
from handler.options import LabelIndex, Options, parse_options
from handler.pipeline import Archive, Pipeline
from handler.quality import QualityScorer, _pyramid_kernel, impute
from handler.requests import RawRequest
from handler.vocab import QUALITY_KEYS

PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Pipeline:
    """The default model (its packaged pretrained weights) in a pipeline, in-process."""
    from handler.models import build_model
    from handler.tools.archive import DEFAULT_MODEL, PACKAGE_WEIGHTS, map_by_order, read_state_dict

    folder = tmp_path_factory.mktemp("lite0")
    model = build_model(DEFAULT_MODEL, 1000, {})
    state = map_by_order(read_state_dict(PACKAGE_WEIGHTS, DEFAULT_MODEL), model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = {"model": DEFAULT_MODEL, "num_classes": 1000, "labels": "", "input_size": [224, 224],
              "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    return Pipeline(Archive(folder, DEFAULT, handler=config, batch_size=8))


def _req(image: bytes, options: dict) -> RawRequest:
    return RawRequest(image, options, "json")


def _chelsea(size=(224, 224)) -> torch.Tensor:
    image = Image.open(DATA / "chelsea.jpg").convert("RGB").resize(size[::-1], Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _jumps(x: torch.Tensor) -> torch.Tensor:
    """|difference| between horizontal neighbours, channel mean: ``(H, W - 1)``."""
    return (x[0, :, :, 1:] - x[0, :, :, :-1]).abs().mean(0)


# --------------------------------------------------------------------------- imputation


def test_an_imputed_hole_has_no_edge_beyond_the_images_own():
    x = _chelsea()
    known = torch.ones((1, 1, 224, 224))
    known[..., 60:140, 80:160] = 0
    out = impute(x, known, _pyramid_kernel(4, "cpu"))
    assert torch.equal(out[known.expand_as(x) > 0], x[known.expand_as(x) > 0])  # known pixels untouched
    border = lambda t: torch.cat([_jumps(t)[60:140, 79], _jumps(t)[60:140, 159]]).mean()  # noqa: E731
    # Across the hole's left and right borders the imputed image jumps no more than the photo itself
    # does there; a constant fill (the mean grey) draws the square's outline, 4x larger.
    constant = x.clone()
    constant[..., 60:140, 80:160] = 0.5
    assert border(out) <= border(x)
    assert border(constant) > 3 * border(x)
    # Inside, it is smooth: a blur of the surroundings, not texture, not a constant.
    inside = out[0, :, 62:138, 82:158]
    assert _jumps(out)[62:138, 82:157].mean() < 0.25 * _jumps(x).mean()
    assert inside.std(dim=(1, 2)).min() > 0.01
    # Between the darkest and brightest surrounding pixels.
    assert x.amin() <= inside.amin() and inside.amax() <= x.amax()


def test_a_constant_is_imputed_exactly_on_any_shape():
    x = torch.full((2, 3, 10, 16), 0.3)
    known = torch.zeros((2, 1, 10, 16))
    known[0, :, 0, 0] = 1  # one known pixel fills the whole image
    known[1, :, 4:, 7:] = 1
    torch.testing.assert_close(impute(x, known, _pyramid_kernel(4, "cpu")), x)


def test_the_numbers_are_deterministic(lite0):
    body = lambda: json.loads(lite0.run([_req(photo("coffee.jpg"), {"quality": True})])[0].text)  # noqa: E731
    first, second = body(), body()
    assert first["cams"][0]["quality"] == second["cams"][0]["quality"]
    again = QualityScorer((224, 224), [0.5] * 3)
    torch.testing.assert_close(again.noise, lite0.scorer.noise, rtol=0, atol=0)  # the same seeded noise


# --------------------------------------------------------------------------- definitions


class _Mean(nn.Module):
    """logits ``[4 * mean(x), 0]``: two classes whose softmax is computed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[4 / 3] * 3, [0.0] * 3]))

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_the_numbers_are_the_confidences_of_the_papers_definitions():
    engine = CamEngine(_Mean(), "conv", input_size=(10, 10))
    scorer = QualityScorer((10, 10), [1.0] * 3, fraction=0.2, noise=0.0)
    region = torch.zeros((10, 10))
    region[2:6, 3:8] = 1  # 20 of the 100 pixels
    x = region.expand(1, 3, 10, 10).clone()  # ones in the region, zeros elsewhere
    probs = engine.model(x).softmax(dim=1)
    got = dict(zip(QUALITY_KEYS, scorer.score(engine, x, probs, [0], torch.tensor([0]), region[None],
                                              [(0, 0, 1, 1)])[0].tolist()))
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    confidence = sigmoid(4 * 0.2)
    kept = sigmoid(4.0)  # only ones known: imputed with ones
    removed = sigmoid(0.0)  # only zeros known: imputed with zeros
    want = {"confidence": confidence, "kept_confidence": kept, "drop": 0.0, "increase": 1.0,
            "removed_confidence": removed, "removed_drop": (confidence - removed) / confidence, "fraction": 0.2}
    assert got == pytest.approx(want, abs=1e-6)


def test_letterbox_padding_is_neither_region_nor_imputed():
    scorer = QualityScorer((10, 10), [1.0] * 3, fraction=0.5, noise=0.0)
    maps = torch.rand((1, 10, 10), generator=torch.Generator().manual_seed(0))
    maps[0, :, :2] = 9  # the padding's map values are never picked
    region, image, (fraction,) = scorer.regions(maps, [(0.2, 0.0, 1.0, 1.0)])
    assert not region[..., :2].any() and not image[..., :2].any() and image[..., 2:].all()
    assert int(region.sum()) == 40 and fraction == 0.5
    x = torch.rand((1, 3, 10, 10), generator=torch.Generator().manual_seed(1))
    variants = scorer.variants(x, region, image)
    assert torch.equal(variants[:, :, :, :2], x.expand(2, 3, 10, 10)[:, :, :, :2])


def test_kept_and_removed_variants_of_a_batch_are_one_forward_call(lite0):
    calls = []
    handle = lite0.engine.model.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    try:
        images = [photo(name) for name in PHOTOS]
        plain = lite0.run([_req(b, {"cam_classes": "top2"}) for b in images])
        plain_calls, calls[:] = list(calls), []
        scored = lite0.run([_req(b, {"cam_classes": "top2", "quality": q})
                            for b, q in zip(images, (True, "true", "0"))])
    finally:
        handle.remove()
    assert plain_calls == [3]
    assert calls == [3, 2 * 2 * 2]  # the Grad-CAM pass, then 2 scored images x 2 maps x (kept, removed)
    assert all("quality" in cam for cam in json.loads(scored[0].text)["cams"])
    assert all("quality" not in cam for cam in json.loads(scored[2].text)["cams"])
    for a, b in zip(plain, scored):  # predictions and maps unchanged by scoring
        assert json.loads(a.text)["cams"][0]["map"] == json.loads(b.text)["cams"][0]["map"]


def test_more_variants_than_the_configured_maximum_go_in_chunks(lite0):
    calls = []
    scorer, lite0.scorer = lite0.scorer, QualityScorer((224, 224), [0.5] * 3, max_batch=3)
    handle = lite0.engine.model.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    try:
        lite0.run([_req(photo(name), {"quality": True}) for name in PHOTOS])
    finally:
        handle.remove()
        lite0.scorer = scorer
    assert calls == [3, 3, 3]


# --------------------------------------------------------------------------- options and config


def _parse(value) -> Options:
    return parse_options({"quality": value}, Options(), LabelIndex(None, 10), 10, RequestLimits())


@pytest.mark.parametrize("value, want", [(True, True), (False, False), ("true", True), (" On ", True),
                                         ("YES", True), ("1", True), (1, True), ("off", False), ("0", False),
                                         (0, False), ("no", False), (None, False)])
def test_quality_values(value, want):
    assert _parse(value).quality is want


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, ["true"], {"a": 1}])
def test_a_bad_quality_value_is_an_invalid_option(value):
    with pytest.raises(InvalidOption, match="quality must be true or false") as info:
        _parse(value)
    assert info.value.field == "quality" and info.value.status == 400


def test_quality_travels_as_field_json_key_header_and_v2_parameter():
    import base64

    image = photo("chelsea.jpg")
    b64 = base64.b64encode(image).decode()
    forms = {
        "field": extract_request({"image": image, "quality": b"true"}, {}),
        "json": extract_request({"body": json.dumps({"image": b64, "quality": True}).encode()}, {}),
        "header": extract_request({"body": image}, {"Quality": "on", "content-type": "image/jpeg"}),
        "v2 parameter": extract_request({"body": json.dumps({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
            "parameters": {"quality": True}}).encode()}, {}),
        "v2 input": extract_request({"body": json.dumps({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]},
            {"name": "quality", "datatype": "BOOL", "shape": [1], "data": [True]}]}).encode()}, {}),
    }
    for form, raw in forms.items():
        assert _parse(raw.options["quality"]).quality is True, form
    assert header_options({"QUALITY": b"false"}) == {"quality": "false"}


def test_a_bad_quality_gets_its_400_and_the_batch_its_200s(lite0):
    answers = lite0.run([_req(photo("chelsea.jpg"), {"quality": "perhaps"}),
                         _req(photo("coffee.jpg"), {"quality": "yes"})])
    assert [a.status for a in answers] == [400, 200]
    error = json.loads(answers[0].text)
    assert (error["status"], error["error"], error["field"]) == (400, "invalid_option", "quality")
    assert "quality must be true or false" in error["message"]


def test_the_region_fraction_is_set_per_archive_and_validated():
    assert ServeConfig.from_dict({}).quality.quality_fraction == 0.4
    assert ServeConfig.from_dict({"quality_fraction": 0.25, "quality": True}).quality.quality_fraction == 0.25
    for bad in (0, 1, 1.5, -0.1, "0.2", True):
        with pytest.raises(ValueError, match="'quality_fraction' must be a number between 0 and 1"):
            ServeConfig.from_dict({"quality_fraction": bad})
    with pytest.raises(ValueError, match="'quality' must be true or false"):
        ServeConfig.from_dict({"quality": "yes"})
    from handler.tools.archive import parse_args

    assert parse_args(["--quality-fraction", "0.3"]).quality_fraction == 0.3
    with pytest.raises(SystemExit):
        parse_args(["--quality-fraction", "1"])


def test_the_archive_fraction_reaches_the_answer(lite0):
    scorer, lite0.scorer = lite0.scorer, QualityScorer((224, 224), [0.5] * 3, fraction=0.1)
    try:
        body = json.loads(lite0.run([_req(photo("chelsea.jpg"), {"quality": True})])[0].text)
    finally:
        lite0.scorer = scorer
    assert body["cams"][0]["quality"]["fraction"] == pytest.approx(0.1, abs=1e-4)


# --------------------------------------------------------------------------- the default model


def _views() -> list[Image.Image]:
    """Each test photo whole, mirrored and in four 75% crops: 18 views."""
    views = []
    for name in PHOTOS:
        image = Image.open(DATA / name).convert("RGB")
        w, h = image.size
        views += [image, ImageOps.mirror(image)]
        views += [image.crop((x, y, x + int(w * 0.75), y + int(h * 0.75)))
                  for x in (0, w - int(w * 0.75)) for y in (0, h - int(h * 0.75))]
    return views


def test_real_maps_keep_more_confidence_than_random_regions_of_the_same_size(lite0):
    engine, scorer = lite0.engine, lite0.scorer
    views = _views()
    pixels, boxes = model_batch([Photo.of(v) for v in views], lite0.layout, engine.device)
    x = engine.prepare(pixels)
    cam_pass = engine.forward(x)
    probs = cam_pass.logits.detach().softmax(dim=1)
    rows, classes = list(range(len(views))), probs.argmax(dim=1)
    maps = normalize_maps(engine.cams(cam_pass, rows, classes, ["gradcam"] * len(views)))
    real = scorer.score(engine, x, probs, rows, classes, maps, boxes)
    # Random regions of the same size: the map's cells shuffled, four seeded draws.
    generator = torch.Generator().manual_seed(1)
    cells = maps.flatten(1)
    shuffled = [cells[:, torch.randperm(cells.shape[1], generator=generator)].view_as(maps) for _ in range(4)]
    random = torch.stack([scorer.score(engine, x, probs, rows, classes, m, boxes) for m in shuffled]).mean(0)
    kept, drop = QUALITY_KEYS.index("kept_confidence"), QUALITY_KEYS.index("drop")
    wins = (real[:, kept] > random[:, kept]).float().mean().item()
    assert wins >= 0.9, (real[:, kept], random[:, kept])
    # Average Drop: about a third of the confidence for the real maps, nearly all of it for random ones.
    assert real[:, drop].mean() < 0.45 and random[:, drop].mean() > 0.8


# --------------------------------------------------------------------------- metrics


def test_the_drop_histogram_on_torchservess_metric_cache():
    import sys
    from pathlib import Path

    from conftest import ROOT
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.metrics.metric_type_enum import MetricTypes

    from handler.metrics import HandlerMetrics

    for config in (ROOT / "metrics.yaml", Path(sys.modules["ts"].__file__).parent / "configs" / "metrics.yaml"):
        cache = MetricsCacheYamlImpl(config_file_path=str(config))
        cache.initialize_cache()
        cache.model_name = "m"
        metrics = HandlerMetrics(cache, "m")
        metrics.quality("gradcam", 0.25)
        histogram = cache.get_metric("GradcamQualityDrop", MetricTypes.HISTOGRAM)
        assert histogram.metric_type == MetricTypes.HISTOGRAM
        assert histogram.dimension_names == ["ModelName", "Level", "Method"]


@pytest.mark.server
def test_the_drop_histogram_reaches_torchserves_prometheus_endpoint(server):
    r = server.predict(DEFAULT, files={"image": ("coffee.jpg", photo("coffee.jpg"))},
                       data={"quality": "true", "cam_method": "layercam"})
    assert r.status_code == 200, r.text
    quality = r.json()["cams"][0]["quality"]
    assert set(quality) == set(QUALITY_KEYS) and 0 < quality["confidence"] <= 1

    def rows() -> tuple[str, list[str]]:
        text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
        return text, [line for line in text.splitlines() if line.startswith("GradcamQualityDrop_count{")
                      and f'ModelName="{DEFAULT}"' in line and 'Method="layercam"' in line]

    # The frontend reads worker metrics from the worker's log stream, not from the answer's
    # socket: the series can appear a moment after the answer. Poll, returning once it is there.
    deadline = time.monotonic() + 60
    text, counts = rows()
    while not counts and time.monotonic() < deadline:
        time.sleep(0.2)
        text, counts = rows()
    assert len(counts) == 1 and float(counts[0].rsplit(" ", 1)[1]) >= 1, text
    assert any(line.startswith("GradcamQualityDrop_bucket{") and 'Method="layercam"' in line
               for line in text.splitlines())
