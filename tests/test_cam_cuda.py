"""The engine on a CUDA device: the same maps as on the CPU and as captum, one host copy per
batch and no device wait before it, the precisions and memory formats, every activation layout
(NCHW, NHWC, tokens) with the five methods, and device memory at the level of plain inference.

Skipped without a GPU (CI has none): scripts/ops/gpu_check.sh runs them on a lent GPU machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.families import BY_KEY
from test_cam import ARCHS, SIZE, _build, _calibrated, _pearson, _top_targets

from handler.cam import (
    METHODS,
    CamEngine,
    Frames,
    blend,
    device_index,
    device_tensor,
    jet_lut,
    normalize_maps,
    to_host,
    to_uint8,
    upsample_maps,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda:0")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 without TF32 for the comparisons; the settings are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close_to_peak(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Agreement within ``tol`` of the reference's peak, which must be non-trivial. Another
    device runs other kernels: the maps agree to rounding, not bit for bit."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    peak = float(expected.abs().amax())
    assert peak > 1e-6, "reference maps are ~0: the comparison would be vacuous"
    torch.testing.assert_close(actual / peak, expected / peak, atol=tol, rtol=0)


def _case(arch: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, SIZE, SIZE, generator=gen)
    model = _calibrated(_build(arch), x)
    return model, x, _top_targets(model, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_maps_equal_cpu_maps_and_captum(arch):
    captum = pytest.importorskip("captum.attr")
    model, x, targets = _case(arch)
    cpu = CamEngine(copy.deepcopy(model), "auto", input_size=(SIZE, SIZE))
    want = cpu.cams(cpu.forward(x), range(4), targets, ["gradcam"] * 4)
    gpu = CamEngine(copy.deepcopy(model), cpu.target_layer, device=CUDA, input_size=(SIZE, SIZE))
    got = gpu.cams(gpu.forward(x.to(CUDA)), range(4), targets.to(CUDA), ["gradcam"] * 4).cpu()
    _close_to_peak(got, want)

    reference = copy.deepcopy(model).to(CUDA)
    layer = dict(reference.named_modules())[cpu.target_layer]
    attr = captum.LayerGradCam(reference, layer).attribute(
        x.to(CUDA), target=targets.to(CUDA), relu_attributions=True)
    _close_to_peak(got, attr[:, 0])


def test_the_pass_waits_for_the_device_only_at_the_host_copy():
    """forward, gradients, maps, upsampling, colour map and blending queue work without one
    synchronising call (a read-back, a blocking copy): the host copy is the batch's only wait."""
    model, x, _ = _case("resnet18")
    engine = CamEngine(model, "layer4", device=CUDA, input_size=(SIZE, SIZE))
    n = x.shape[0]
    x = x.to(CUDA)
    frames = Frames(size=device_tensor([[SIZE, SIZE]] * n, CUDA),
                    box=device_tensor([[0.0, 0.0, 1.0, 1.0]] * n, CUDA))
    images = torch.zeros((n, SIZE, SIZE, 3), dtype=torch.uint8, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cam_pass = engine.forward(x)
        top_p, top_i = cam_pass.logits.detach().float().softmax(dim=1).topk(5, dim=1)
        rows = [0, 1, 2, 3, 0, 2]
        classes = torch.cat([top_i[:, 0], top_i[device_index([0, 2], CUDA), 1]])
        methods = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam"]
        maps = normalize_maps(engine.cams(cam_pass, rows, classes, methods))
        heat = to_uint8(upsample_maps(maps[:n], frames, (SIZE, SIZE)))
        overlay = blend(heat, images, engine.lut, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = to_host({"p": top_p, "i": top_i, "maps": maps, "heat": heat, "overlay": overlay})
    assert host["maps"].shape == (6, *cam_pass.activation.shape[2:])
    assert host["heat"].shape == (n, SIZE, SIZE) and host["overlay"].shape == (n, SIZE, SIZE, 3)
    assert float(host["maps"].amax()) > 0.99


def test_to_host_packs_one_pinned_copy_with_the_right_values():
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "f32": torch.randn(3, 7, generator=gen),
        "i64": torch.randint(0, 1000, (5, 3), generator=gen),
        "u8": torch.randint(0, 256, (2, 9, 11), dtype=torch.uint8, generator=gen),
        "bf16": torch.randn(13, generator=gen).to(torch.bfloat16),
        "odd": torch.randn(4, 6, generator=gen)[:, ::2],  # not contiguous
    }
    out = to_host({k: v.to(CUDA) for k, v in tensors.items()})
    assert out.keys() == tensors.keys()
    for name, value in tensors.items():
        assert out[name].device.type == "cpu" and out[name].is_pinned(), name
        assert out[name].dtype == value.dtype and torch.equal(out[name], value), name
    # Views of one buffer: one transfer for the batch.
    bases = {out[k].untyped_storage().data_ptr() for k in out}
    assert len(bases) == 1


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_on_cuda_is_close_to_fp32(precision, dtype):
    model, x, targets = _case("resnet18")
    x, targets = x.to(CUDA), targets.to(CUDA)
    fp32 = CamEngine(copy.deepcopy(model), "layer4", device=CUDA, input_size=(SIZE, SIZE))
    low = CamEngine(copy.deepcopy(model), "layer4", device=CUDA, input_size=(SIZE, SIZE), precision=precision)
    want = fp32.cams(fp32.forward(x), range(4), targets, ["gradcam"] * 4)
    low_pass = low.forward(x)
    assert low_pass.logits.dtype == dtype  # autocast really ran
    got = low.cams(low_pass, range(4), targets, ["gradcam"] * 4)
    assert got.dtype == torch.float32  # the CAM maths runs in fp32
    for i in range(4):
        assert want[i].amax() > 1e-6
        assert _pearson(got[i].cpu(), want[i].cpu()) > 0.95


def test_channels_last_on_cuda_equals_contiguous():
    model, x, targets = _case("mobilenet_v2")
    x, targets = x.to(CUDA), targets.to(CUDA)
    plain = CamEngine(copy.deepcopy(model), "features", device=CUDA, input_size=(SIZE, SIZE))
    nhwc = CamEngine(copy.deepcopy(model), "features", device=CUDA, input_size=(SIZE, SIZE), channels_last=True)
    assert nhwc.prepare(torch.zeros((1, SIZE, SIZE, 3), dtype=torch.uint8)).is_contiguous(
        memory_format=torch.channels_last)
    want = plain.cams(plain.forward(x), range(4), targets, ["gradcam"] * 4)
    got = nhwc.cams(nhwc.forward(x.contiguous(memory_format=torch.channels_last)), range(4), targets,
                    ["gradcam"] * 4)
    _close_to_peak(got, want)


def test_device_memory_of_the_pass_stays_at_plain_inference():
    """Batch 64 at 224x224 on resnet50: forward, gradient, maps upsampled to 224x224 and
    uint8 take at most 1.1x the peak memory of plain inference (the issue's target)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(CUDA)
    engine = CamEngine(model, "layer4", device=CUDA, input_size=(224, 224))
    x = torch.randn(64, 3, 224, 224, device=CUDA)
    frames = Frames(size=device_tensor([[224, 224]] * 64, CUDA), box=device_tensor([[0.0, 0.0, 1.0, 1.0]] * 64, CUDA))

    def plain():
        with torch.inference_mode():
            return to_host({"i": model(x).topk(5, dim=1).indices})

    def pass_():
        cam_pass = engine.forward(x)
        top_i = cam_pass.logits.detach().topk(5, dim=1).indices
        maps = normalize_maps(engine.cams(cam_pass, range(64), top_i[:, 0], ["gradcam"] * 64))
        return to_host({"i": top_i, "heat": to_uint8(upsample_maps(maps, frames, (224, 224)))})

    peaks = {}
    for name, fn in (("plain", plain), ("pass", pass_), ("plain", plain), ("pass", pass_)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20  # the second, warm call counts
    assert peaks["pass"] <= 1.1 * peaks["plain"], peaks


def test_jet_lut_on_the_device_equals_the_host_lut():
    assert torch.equal(jet_lut(CUDA).cpu(), jet_lut())


# --------------------------------------------------------------------------- layouts

LAYOUT_FAMILIES = ("vit", "deit", "dinov2_reg", "swin", "convnext", "maxvit", "levit")


def _family_case(key: str):
    family = BY_KEY[key]
    gen = torch.Generator().manual_seed(1)
    return family, family.build(), torch.randn((3, 3, *family.size), generator=gen)


def _mixed_targets(logits: torch.Tensor):
    """Every method, two classes for images 0 and 2, one for image 1."""
    ranked = logits.detach().argsort(dim=1, descending=True).cpu()
    rows = [0, 0, 1, 2, 2] * len(METHODS)
    ranks = [0, 1, 0, 0, 1] * len(METHODS)
    methods = [m for m in METHODS for _ in range(5)]
    return rows, torch.stack([ranked[r, k] for r, k in zip(rows, ranks)]), methods


@pytest.mark.parametrize("key", LAYOUT_FAMILIES)
def test_cuda_maps_equal_cpu_maps_on_every_layout(key):
    family, model, x = _family_case(key)
    cpu = CamEngine(copy.deepcopy(model), "auto", input_size=family.size)
    assert cpu.target_layer == family.layer and cpu.layout.kind == family.layout
    cpu_pass = cpu.forward(x)
    rows, classes, methods = _mixed_targets(cpu_pass.logits)
    want = cpu.cams(cpu_pass, rows, classes, methods)
    gpu = CamEngine(copy.deepcopy(model), "auto", device=CUDA, input_size=family.size)
    assert (gpu.target_layer, gpu.layout) == (cpu.target_layer, cpu.layout)
    got = gpu.cams(gpu.forward(x.to(CUDA)), rows, classes.to(CUDA), methods)
    assert got.shape == (len(rows), *family.grid)
    for p in range(len(rows)):
        if methods[p] != "xgradcam":  # ill-conditioned on LayerNorm'd tokens (see test_layouts)
            if float(want[p].abs().amax()) > 1e-6:
                _close_to_peak(got[p], want[p], 1e-3)


@pytest.mark.parametrize("key", ("vit", "swin", "levit", "convnext"))
def test_bf16_on_cuda_every_layout(key):
    family, model, x = _family_case(key)
    x = x.to(CUDA)
    fp32 = CamEngine(copy.deepcopy(model), family.layer, device=CUDA, input_size=family.size)
    bf16 = CamEngine(copy.deepcopy(model), family.layer, device=CUDA, input_size=family.size, precision="bf16")
    fp32_pass, bf16_pass = fp32.forward(x), bf16.forward(x)
    assert bf16_pass.logits.dtype == torch.bfloat16
    rows, classes, methods = _mixed_targets(fp32_pass.logits)
    want = fp32.cams(fp32_pass, rows, classes.to(CUDA), methods)
    got = bf16.cams(bf16_pass, rows, classes.to(CUDA), methods)
    assert got.dtype == torch.float32
    for p in range(len(rows)):
        if methods[p] != "xgradcam" and float(want[p].amax()) > 1e-6:
            assert _pearson(got[p].cpu(), want[p].cpu()) > 0.9, (methods[p], rows[p])


def test_token_layout_pass_waits_for_the_device_only_at_the_host_copy():
    family, model, x = _family_case("deit")
    engine = CamEngine(model, family.layer, device=CUDA, input_size=family.size)
    x = x.to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cam_pass = engine.forward(x)
        top_i = cam_pass.logits.detach().topk(2, dim=1).indices
        classes = torch.cat([top_i[:, 0], top_i[device_index([0, 2], CUDA), 1]])
        maps = normalize_maps(engine.cams(cam_pass, [0, 1, 2, 0, 2], classes, ["gradcam"] * 5))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = to_host({"maps": maps})
    assert host["maps"].shape == (5, 14, 14) and float(host["maps"].amax()) > 0.99
