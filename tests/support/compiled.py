"""What the compiled-path tests share (tests/test_compiled*.py): their inductor cache, seeded
small models, and each image's best classes."""

from __future__ import annotations

import pytest
import torch
from test_cam import _calibrated

# The maps tests' input size: small, where inductor on a CPU spends seconds per graph.
SIZE = 96


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """The inductor cache of every compile in this module, in-process and in the processes it
    starts (archiver, TorchServe and its workers inherit the environment): a fresh temporary
    folder, the default one (``$XDG_CACHE_HOME/gradcam-serve/inductor``) as well as inductor's.
    Restored afterwards: CompiledPass sets TORCHINDUCTOR_CACHE_DIR for its process."""
    home = tmp_path_factory.mktemp("xdg_cache")
    folder = home / "gradcam-serve" / "inductor"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
        yield folder


def seeded_model(arch: str, x: torch.Tensor) -> torch.nn.Module:
    """A seeded model, its batch norms calibrated on ``x``. ``resnet10`` and ``mobilenet_v2_short``
    are resnet18 and mobilenet_v2 with fewer of the same blocks (one BasicBlock per stage; four
    inverted-residual stages, depthwise convolutions and the 1280-channel last conv kept):
    inductor on a CPU spends seconds per block compiling, and the maps' equality with eager does
    not depend on the depth."""
    import timm
    import torchvision

    torch.manual_seed(0)
    if arch.startswith("timm:"):
        model = timm.create_model(arch[5:], pretrained=False, num_classes=20)
    elif arch == "resnet10":
        from torchvision.models.resnet import BasicBlock, ResNet

        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=20)
    elif arch == "mobilenet_v2_short":
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=20, inverted_residual_setting=[
            [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 1, 2]])
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=20)
    return _calibrated(model, x)


def best_classes(model, x, rows):
    """Each image's best classes in turn: its first target is its top class, the next its second..."""
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)
    return torch.tensor([int(ranked[r, rows[:i].count(r)]) for i, r in enumerate(rows)])
