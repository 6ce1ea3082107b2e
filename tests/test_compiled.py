"""The compiled serve path, engine level: maps equal the eager engine's for every method, several
classes per image, CNNs frozen and not, token and channels-last layouts, the default model on
photos. tests/test_compiled_workers.py serves compiled workers; tests/test_compiled_processes.py
starts fresh processes (restarts, shipped kernels, the fx-trace race).

Compiling costs seconds per graph on a CPU (a C++ build each): each test compiles only the batch
sizes it uses, at a small input size, with small models where the architecture's size proves
nothing. The tests of a file share one inductor cache in a temporary folder (never the user's
~/.cache: support.compiled.kernel_cache).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from support.compiled import SIZE, best_classes, kernel_cache, seeded_model  # noqa: F401 (fixture)
from test_cam import _calibrated

from handler.cam import METHODS, CamEngine, normalize_maps
from handler.compiled import CompiledPass

# Every test here compiles: `make test-fast` leaves them out (-m "not compile").
pytestmark = pytest.mark.compile


def test_compiled_maps_of_the_default_model_on_photos_equal_eager_within_1e_5():
    """The served model with its real weights, the test photos, each photo's best two or three
    classes under all five methods."""
    from PIL import Image
    from test_cam import DATA, _pretrained_lite0

    from handler.images import image_pixels

    model = _pretrained_lite0()
    photos = [Image.open(DATA / name).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    pixels = torch.from_numpy(np.stack([image_pixels(p, (224, 224), Image.Resampling.BICUBIC) for p in photos]))
    kwargs = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "batched_targets": False}
    eager = CamEngine(copy.deepcopy(model), "bn2", **kwargs)
    compiled = CamEngine(copy.deepcopy(model), "bn2", **kwargs)
    CompiledPass(compiled, batch_size=4, freeze=True)
    x = eager.prepare(pixels)
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = best_classes(eager.model, x, rows)
    assert classes[0] == 285 and classes[2] == 967  # Egyptian cat, espresso
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    want = normalize_maps(eager.cams(eager.forward(x), rows, classes, methods))
    got = normalize_maps(compiled.cams(compiled.forward(x), rows, classes, methods))
    assert float(want.amax()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, layer, batch_mode, freeze", [
    ("resnet10", "layer4", "buckets", True), ("mobilenet_v2_short", "features", "dynamic", True),
    ("resnet10", "layer4", "buckets", False),
])
def test_compiled_maps_equal_eager_for_every_method_and_several_classes(arch, layer, batch_mode, freeze):
    """Both passes are compared with the exact maps (the eager pass in float64). The compiled
    maps are within 1e-5 of them, or within twice the eager fp32 pass's own error where that is
    larger: fp32 rounding alone puts the eager maps up to ~5e-5 off where a map's channel sum
    cancels (mobilenet_v2), and two correct fp32 passes cannot agree more closely than that."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    model = seeded_model(arch, x)
    eager = CamEngine(copy.deepcopy(model), layer, input_size=(SIZE, SIZE), batched_targets=False)
    exact = CamEngine(copy.deepcopy(model).double(), layer, input_size=(SIZE, SIZE), batched_targets=False)
    compiled = CamEngine(copy.deepcopy(model), layer, input_size=(SIZE, SIZE), batched_targets=False)
    compiled_pass = CompiledPass(compiled, batch_size=4, batch_mode=batch_mode, freeze=freeze)
    assert compiled_pass.frozen is freeze
    # Three images padded to a bucket of 4 (or a dynamic batch); each image's best two or three
    # classes, all five methods among them.
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = best_classes(model, x, rows)
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    got_pass = compiled.forward(x)
    assert got_pass.logits.shape == (3, 20)
    torch.testing.assert_close(got_pass.logits, eager.forward(x).logits, atol=1e-4, rtol=1e-4)
    got = normalize_maps(compiled.cams(got_pass, rows, classes, methods))
    want = normalize_maps(eager.cams(eager.forward(x), rows, classes, methods))
    truth = normalize_maps(exact.cams(exact.forward(x.double()), rows, classes, methods)).float()
    assert float(truth.amax()) == pytest.approx(1.0, abs=1e-6)  # not vacuous: real maps
    eager_error = float((want - truth).abs().max())
    assert eager_error < 1e-4  # the reference itself is sound
    compiled_error = float((got - truth).abs().max())
    assert compiled_error <= max(1e-5, 2 * eager_error), (compiled_error, eager_error)


@pytest.mark.parametrize("first", ["unfrozen", "frozen"])
def test_a_frozen_and_an_unfrozen_model_of_one_class_in_one_process_each_run_their_own_graphs(first):
    """Dynamo shares compiled frames between instances of one class compiled with equal options.
    The archiver times frozen and unfrozen copies of the model in one process, so a frozen model
    must compile (and run) frozen graphs of its own whichever was compiled first, and neither may
    run graphs that hold the other's weights: the two models here have different weights."""
    from torch._dynamo.utils import counters
    from torchvision.models.resnet import BasicBlock, ResNet

    # Three images in a bucket of 4, at the maps test's size: inductor's cache holds these graphs
    # from there (dynamo's frames, which this test is about, are per process and reset below).
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    models = {"unfrozen": seeded_model("resnet10", x)}
    torch.manual_seed(1)
    models["frozen"] = _calibrated(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=20), x)
    order = [first, "frozen" if first == "unfrozen" else "unfrozen"]
    torch._dynamo.reset()  # no graphs of earlier tests' ResNets
    passes = {}
    for name in order:
        engine = CamEngine(copy.deepcopy(models[name]), "layer4", input_size=(SIZE, SIZE), batched_targets=False)
        CompiledPass(engine, batch_size=4, freeze=name == "frozen")
        folded = counters["inductor"]["binary_folding_conv"]
        graphs = counters["stats"]["unique_graphs"]
        passes[name] = engine.forward(x)
        # Frozen graphs hold their model's weights: a frozen model compiles its own. An unfrozen
        # model may share unfrozen graphs (weights are their inputs), never frozen ones.
        if name == "frozen":
            assert counters["stats"]["unique_graphs"] > graphs, "the frozen model compiled no graph of its own"
        # Freezing folds the batch norms into the convolutions (before inductor's cache lookup,
        # so also when the graph comes from the cache).
        grew = counters["inductor"]["binary_folding_conv"] > folded
        assert grew == (name == "frozen"), f"the {name} model's batch norms folded: {grew}"
    for name, model in models.items():
        want = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE)).forward(x).logits
        torch.testing.assert_close(passes[name].logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_compiled_maps_of_token_and_channels_last_layouts_equal_eager(key):
    """A class-token ViT (its target layer nested in blocks: LeafCapture stands in for the hook
    that compile would not run) and a Swin (NHWC): every method, several classes per image."""
    from support.families import BY_KEY, _photos

    family = BY_KEY[key]
    if key == "vit":  # two blocks, not twelve: the class token and the nested layer are the same
        family = dataclasses.replace(family, kwargs={"depth": 2}, layer="blocks.1.norm1")
    model = family.build()
    x = _photos(family.size)[:3]
    eager = CamEngine(copy.deepcopy(model), "auto", input_size=family.size, batched_targets=False)
    exact = CamEngine(copy.deepcopy(model).double(), family.layer, input_size=family.size, batched_targets=False,
                      layout=family.layout, prefix_tokens=family.prefix, grid=family.grid)
    compiled = CamEngine(copy.deepcopy(model), "auto", input_size=family.size, batched_targets=False)
    assert eager.target_layer == compiled.target_layer == family.layer
    CompiledPass(compiled, batch_size=4, freeze=key == "swin")  # the ViT's backbone unfrozen, the Swin's frozen
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = best_classes(model, x, rows)
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    got_pass = compiled.forward(x)
    got = normalize_maps(compiled.cams(got_pass, rows, classes, methods))
    want = normalize_maps(eager.cams(eager.forward(x), rows, classes, methods))
    truth = normalize_maps(exact.cams(exact.forward(x.double()), rows, classes, methods)).float()
    assert tuple(got.shape[1:]) == family.grid and float(truth.amax()) > 0.99  # real maps
    eager_error = float((want - truth).abs().max())
    compiled_error = float((got - truth).abs().max())
    assert eager_error < 1e-3
    assert compiled_error <= max(1e-5, 2 * eager_error), (compiled_error, eager_error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["", "reduce-overhead"])
def test_on_a_gpu_compiled_maps_equal_eager(mode, monkeypatch):
    """inductor's CUDA kernels (and CUDA graphs with reduce-overhead): the maps of every method
    and several classes per image equal the eager pass's on the same device (TF32 off: it alone
    moves maps by ~1e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    model = seeded_model("resnet18", x)
    cuda = torch.device("cuda:0")
    eager = CamEngine(copy.deepcopy(model), "layer4", device=cuda, input_size=(SIZE, SIZE), batched_targets=False)
    compiled = CamEngine(copy.deepcopy(model), "layer4", device=cuda, input_size=(SIZE, SIZE),
                         batched_targets=False, channels_last=True)
    CompiledPass(compiled, batch_size=4, mode=mode or None)
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = best_classes(model, x, rows).to(cuda)
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    xd = x.to(cuda)
    for _ in range(3):  # CUDA graphs record on a later call than the first
        got = normalize_maps(compiled.cams(compiled.forward(xd.contiguous(memory_format=torch.channels_last)),
                                           rows, classes, methods))
    want = normalize_maps(eager.cams(eager.forward(xd), rows, classes, methods))
    assert float(want.amax()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
