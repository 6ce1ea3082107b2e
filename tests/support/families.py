"""The model families the engine must handle, as small seeded models, shared by
tests/test_layouts.py (references in-process), tests/test_families.py (archived and served by a
real TorchServe) and tests/test_cam_cuda.py.

Random weights are made meaningful first (:func:`randomize`): timm and torchvision initialise
some weights to zero or to a constant (torchvision's ViT head, LeViT's residual batch norms,
layer scales), which leaves gradients or maps exactly zero or constant and would let a
comparison pass on nothing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Family:
    """One architecture with the target layer, layout and grid the picker must find.

    Attributes:
        key: archive name.
        source: ``timm:NAME``, ``torchvision:NAME`` or ``path/model.py:Class`` (the archiver's
            ``--model``).
        kwargs: constructor arguments (``--model-kwargs``).
        size: ``(H, W)`` input.
        layer: the automatic target layer.
        layout: its layout.
        prefix: prefix tokens (``nlc``).
        grid: ``(h, w)`` of the map.
        why: why that layer, for humans.
        archive_args: extra archiver flags.
    """

    key: str
    source: str
    kwargs: dict = field(default_factory=dict)
    size: tuple[int, int] = (224, 224)
    layer: str = ""
    layout: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] = (7, 7)
    why: str = ""
    archive_args: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> nn.Module:
        """The model, randomised (seeded) and in eval mode."""
        torch.manual_seed(seed)
        kind, _, name = self.source.partition(":")
        if kind == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, **self.kwargs)
        elif kind == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights=None, **self.kwargs)
        else:
            path, _, cls = self.source.rpartition(":")
            spec = importlib.util.spec_from_file_location(f"_family_{Path(path).parent.name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            model = getattr(module, cls)(**self.kwargs)
        return randomize(model.eval(), self.size, seed)

    def pgc_reshape(self):
        """A ``reshape_transform`` for pytorch-grad-cam, written as its tutorials write them
        (independent of handler.layouts)."""
        h, w = self.grid
        if self.layout == "nlc":
            k = self.prefix
            return lambda t: t[:, k:, :].reshape(t.size(0), h, w, t.size(2)).transpose(2, 3).transpose(1, 2)
        if self.layout == "nhwc":
            return lambda t: t.permute(0, 3, 1, 2)
        return None


FAMILIES = [
    Family("vit", "timm:vit_tiny_patch16_224", layer="blocks.11.norm1", layout="nlc", prefix=1, grid=(14, 14),
           why="class-token pooling: the last block's output and norm2 get zero patch gradient"),
    Family("tv_vit", f"{DATA / 'tvvit' / 'model.py'}:SmallViT", layer="encoder.layers.encoder_layer_1.ln_1",
           layout="nlc", prefix=1, grid=(14, 14), why="torchvision's class token, same reason as timm's ViT"),
    Family("deit", "timm:deit_tiny_distilled_patch16_224", layer="blocks.11.norm1", layout="nlc", prefix=2,
           grid=(14, 14), why="class and distillation tokens"),
    Family("dinov2_reg", "timm:vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 2, "num_classes": 1000},
           layer="blocks.1.norm1", layout="nlc", prefix=5, grid=(16, 16), why="class + 4 register tokens"),
    Family("swin", "timm:swin_tiny_patch4_window7_224",
           {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]},
           layer="norm", layout="nhwc", grid=(7, 7), why="output_fmt NHWC, final norm before pooling"),
    Family("convnext", "timm:convnext_atto", layer="stages.3", grid=(7, 7), why="last feature stage"),
    Family("maxvit", "timm:maxvit_pico_rw_256", {"img_size": 128}, size=(128, 128), layer="norm", grid=(4, 4),
           why="final norm after the last stage"),
    Family("levit", "timm:levit_128s", layer="stages.2", layout="nlc", grid=(4, 4),
           why="token stages without prefix tokens, 14x14 -> 7x7 -> 4x4"),
]
# End to end only: a ViT at another size (letterboxed, no labels) and a CNN at a non-square size.
EXTRAS = [
    Family("vit160", "timm:vit_tiny_patch16_224", {"img_size": 160}, size=(160, 160), layer="blocks.11.norm1",
           layout="nlc", prefix=1, grid=(10, 10), archive_args=("--resize", "letterbox", "--labels", "none")),
    Family("resnet_192x256", "torchvision:resnet18", {"num_classes": 10}, size=(192, 256), layer="layer4",
           grid=(6, 8), archive_args=("--input-size", "192", "256")),
]
BY_KEY = {f.key: f for f in FAMILIES + EXTRAS}


def randomize(model: nn.Module, size: tuple[int, int], seed: int = 0) -> nn.Module:
    """Seeded weights that give live, non-constant maps on photos: norms' scales in [0.5, 1.5]
    ([0.05, 0.2] where they start at zero), their shifts ~N(0, 0.1), zero-initialised tensors
    (torchvision's ViT head) ~N(0, 0.02), layer scales ~U(0.5, 1.5), LeViT's attention biases
    ~N(0, 2) (at zero its attention averages every token into one value); batch-norm statistics
    calibrated on the test photos and seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or (
                    "norm" in type(module).__name__.lower() and hasattr(module, "weight")):
                weight = getattr(module, "weight", None)
                if isinstance(weight, torch.Tensor):
                    # Zero-initialised (residual branches: LeViT) stay small, or the deep random
                    # net collapses every token to one value.
                    low, high = (0.05, 0.2) if not torch.count_nonzero(weight) else (0.5, 1.5)
                    weight.uniform_(low, high, generator=gen)
                if isinstance(getattr(module, "bias", None), torch.Tensor):
                    module.bias.normal_(0.0, 0.1, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ".ls" in name:  # layer scale
                p.uniform_(0.5, 1.5, generator=gen)
            elif "attention_bias" in name:  # LeViT's positional attention biases start at zero
                p.normal_(0.0, 2.0, generator=gen)
            elif p.dim() > 1 and not torch.count_nonzero(p):
                p.normal_(0.0, 0.02, generator=gen)
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        for m in batch_norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative: exactly this batch's statistics
        model.train()
        with torch.no_grad():
            model(torch.cat([_photos(size), torch.randn((5, 3, *size), generator=gen)]))
    return model.eval()


def _photos(size: tuple[int, int]) -> torch.Tensor:
    """The three test photos at ``size``, normalised with ImageNet's statistics."""
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for name in ("chelsea.jpg", "astronaut.jpg", "coffee.jpg"):
        image = Image.open(DATA / name).convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size[0], size[1], 3)
        out.append((pixels.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


def save_weights(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def pgc_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes, methods, reshape):
    """pytorch-grad-cam 1.5.7's low-res, min-max-scaled maps ``{method: (N, h, w)}`` for one class
    per image: its hooks and backward (one for all methods), its ``get_cam_image``, ReLU and
    ``scale_cam_image`` without the resize (as its ``compute_cam_per_layer`` does).

    The input requires grad instead of the parameters: the same activations and gradients at the
    layer, without the weight gradients nobody reads.
    """
    import numpy as np
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    kinds = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
             "layercam": LayerCAM, "hirescam": HiResCAM}
    cams = {m: kinds[m](model=model, target_layers=[layer], reshape_transform=reshape) for m in methods}
    first = cams[methods[0]]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        outputs = first.activations_and_grads(x.detach().requires_grad_(True))
        wanted = [ClassifierOutputTarget(int(c)) for c in classes]
        model.zero_grad()
        sum(t(o) for t, o in zip(wanted, outputs, strict=True)).backward()
        acts = first.activations_and_grads.activations[0].numpy()
        grads = first.activations_and_grads.gradients[0].numpy()
        out = {}
        for method, cam in cams.items():
            raw = cam.get_cam_image(x, layer, wanted, acts, grads, eigen_smooth=False)
            out[method] = torch.from_numpy(scale_cam_image(np.maximum(raw, 0)))
        return out
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
        for p, flag in flags:
            p.requires_grad_(flag)
