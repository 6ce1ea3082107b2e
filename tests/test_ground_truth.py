"""Explanation maps against ground truth: a tiny ViT and a tiny CNN trained here, in seconds, on the
seeded synthetic localisation set (devkit/synthetic.py), and the ranking that
scripts/bench/bench_faithfulness.py found at full size asserted on held-out images: chefer points
at the class-deciding object more often than Grad-CAM on the ViT, and Grad-CAM points at it on the
CNN; the same ViT as torchvision's VisionTransformer points as timm's does. Maps through the
product's own code path (devkit/faithfulness.py).

Deterministic: seeded sets, models and training order, one thread, deterministic algorithms. The
thresholds sit below what this machine measures (ViT: chefer 59-60%, Grad-CAM 47-48%, legrad 34%;
CNN: Grad-CAM 81%, at 48x48 px with a 6x6 grid, where chance is about 13%).
"""

from __future__ import annotations

import pytest
import torch

from devkit.faithfulness import explanation_maps, pointing_game
from devkit.synthetic import MEAN, STD, accuracy, make_set, single_thread, small_cnn, small_vit, train
from devkit.vit_twins import torchvision_twin
from handler.attention_cam import attention_explainer
from handler.cam import CamEngine
from handler.vocab import ATTENTION_METHODS

SIZE, CLASSES = 48, 3
SET = dict(size=SIZE, classes=CLASSES, object_size=(10, 13), distractors=1)
TOLERANCE = 4  # px, the benchmark's (Zhang et al.'s 15 px at 224, scaled)


@pytest.fixture(scope="module")
def trained():
    """Both models trained on one seeded set; the held-out set."""
    train_set = make_set(2000, seed=1, **SET)
    test_set = make_set(200, seed=2, **SET)
    with single_thread():
        vit = train(small_vit(size=SIZE, classes=CLASSES, dim=32, depth=2, heads=2, seed=0), train_set,
                    epochs=12, lr=3e-3, seed=0)
        cnn = train(small_cnn(classes=CLASSES, width=16, seed=0), train_set, epochs=12, lr=3e-3, seed=0)
    return vit, cnn, test_set


def _pointing(model, test_set, method: str) -> float:
    engine = CamEngine(model, input_size=(SIZE, SIZE), mean=MEAN, std=STD)
    explainer, why = attention_explainer(engine)
    if method in ATTENTION_METHODS:
        assert explainer is not None, why
    with single_thread():
        maps = explanation_maps(engine, explainer, test_set.normalized(), test_set.labels, method)
    return float(pointing_game(maps, test_set.boxes, TOLERANCE).float().mean())


def test_the_models_learned_the_task(trained):
    vit, cnn, test_set = trained
    assert accuracy(vit, test_set) >= 0.85
    assert accuracy(cnn, test_set) >= 0.75


def test_chefer_points_at_the_object_more_often_than_gradcam_on_the_vit(trained):
    vit, _, test_set = trained
    chefer, gradcam = _pointing(vit, test_set, "chefer"), _pointing(vit, test_set, "gradcam")
    assert chefer >= 0.5, chefer
    assert chefer >= gradcam + 0.05, (chefer, gradcam)


def test_legrad_points_above_chance_and_below_chefer_on_the_vit(trained):
    """The benchmark's other finding: legrad points far less often than chefer (63% against 98% at
    full size; here 34% against 59%), yet well above chance (about 13% here)."""
    vit, _, test_set = trained
    legrad, chefer = _pointing(vit, test_set, "legrad"), _pointing(vit, test_set, "chefer")
    assert legrad >= 0.25, legrad
    assert chefer >= legrad + 0.1, (chefer, legrad)


def test_torchvision_vit_twin_points_as_the_timm_vit_does(trained):
    """The trained ViT as torchvision's VisionTransformer (the same weights): its chefer, through
    the explicit attention path, points at the same objects as timm's unfused attention."""
    vit, _, test_set = trained
    twin = torchvision_twin(vit)
    with torch.no_grad(), single_thread():
        x = test_set.normalized()[:16]
        torch.testing.assert_close(twin(x), vit(x), atol=1e-4, rtol=0)
    assert _pointing(twin, test_set, "chefer") == pytest.approx(_pointing(vit, test_set, "chefer"), abs=0.01)


def test_gradcam_points_at_the_object_on_the_cnn(trained):
    _, cnn, test_set = trained
    assert _pointing(cnn, test_set, "gradcam") >= 0.7


def test_the_set_is_seeded_and_its_boxes_hold_the_red_object():
    a, b = make_set(8, seed=5, **SET), make_set(8, seed=5, **SET)
    torch.testing.assert_close(a.images, b.images, atol=0, rtol=0)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes)
    for i in range(8):
        x0, y0, x1, y1 = a.boxes[i].tolist()
        mask = a.masks[i]
        assert mask.any() and not mask[:y0].any() and not mask[y1:].any()
        assert not mask[:, :x0].any() and not mask[:, x1:].any()
        red = a.images[i, 0] - a.images[i, 1:].amax(dim=0) > 0.5
        assert torch.equal(red, mask), "only the class-deciding object is red"
