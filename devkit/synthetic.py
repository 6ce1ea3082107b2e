"""A seeded synthetic localisation set with ground truth, and small models trained on it on a CPU.

Each image is clutter (smooth colour noise plus fine grain) with one class-deciding object: one of
``K`` shapes (square, disc, cross, triangle, ...) drawn in red; elsewhere, distractors of the
*other* classes' shapes drawn in other colours. The class is the red object's shape, so a model
that answers right must look at the red object, and the object's box and mask say where that is:
ground truth for explanation maps (pointing game, deletion), with no pretrained weights needed.

Used by ``scripts/bench/bench_faithfulness.py`` and ``tests/test_ground_truth.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SHAPES", "MEAN", "STD", "SyntheticSet", "make_set", "small_vit", "small_cnn", "train", "accuracy",
           "single_thread"]

SHAPES = ("square", "disc", "cross", "triangle", "ring", "bar")
#: Normalisation of the set's [0, 1] pixels (about its mean and spread).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
_TARGET = (0.9, 0.12, 0.12)  # red: only the class-deciding object has it
_DISTRACTOR = ((0.12, 0.75, 0.15), (0.15, 0.3, 0.95), (0.9, 0.85, 0.15), (0.15, 0.85, 0.9))


@dataclass
class SyntheticSet:
    """Images ``(N, 3, H, W)`` in [0, 1], ``labels`` ``(N,)``, ``boxes`` ``(N, 4)`` as pixel
    ``(x0, y0, x1, y1)`` (end exclusive) and ``masks`` ``(N, H, W)`` of the class-deciding object."""

    images: Tensor
    labels: Tensor
    boxes: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def normalized(self) -> Tensor:
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        return (self.images - mean) / std


def _shape_mask(kind: str, size: int) -> Tensor:
    """A ``(size, size)`` boolean mask of one shape."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # [-1, 1]
    y, x = torch.meshgrid(c, c, indexing="ij")
    if kind == "square":
        return (x.abs() <= 0.8) & (y.abs() <= 0.8)
    if kind == "disc":
        return x * x + y * y <= 0.9
    if kind == "cross":
        return ((x.abs() <= 0.3) | (y.abs() <= 0.3)) & (x.abs() <= 0.95) & (y.abs() <= 0.95)
    if kind == "triangle":
        return (y <= 0.85) & (y >= -0.85 + 2 * x.abs() * 0.85 / 0.9 - 0.05) & (x.abs() <= 0.9)
    if kind == "ring":
        r = x * x + y * y
        return (r <= 0.95) & (r >= 0.35)
    if kind == "bar":
        return (x.abs() <= 0.95) & (y.abs() <= 0.3)
    raise ValueError(f"unknown shape {kind!r}; choose one of {', '.join(SHAPES)}")


def _clutter(n: int, size: int, gen: torch.Generator) -> Tensor:
    """Smooth colour noise plus fine grain, in [0, 1]."""
    coarse = torch.rand((n, 3, max(2, size // 8), max(2, size // 8)), generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    grey = smooth.mean(dim=1, keepdim=True)
    base = 0.35 + 0.3 * (0.7 * grey + 0.3 * smooth)  # muted colours: no pure red
    grain = 0.08 * torch.randn((n, 1, size, size), generator=gen)
    return (base + grain).clamp(0, 1)


def make_set(n: int, *, size: int = 64, classes: int = 4, object_size: tuple[int, int] = (14, 18),
             distractors: int = 2, seed: int = 0) -> SyntheticSet:
    """``n`` seeded images with their labels, boxes and masks.

    Args:
        n: images.
        size: square image side, pixels.
        classes: shapes to tell apart (the first ``classes`` of :data:`SHAPES`).
        object_size: smallest and largest object side, pixels.
        distractors: other-class shapes in other colours per image.
        seed: the generator's seed: the same arguments give the same set.

    Raises:
        ValueError: for more classes than shapes, or objects that cannot fit.
    """
    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be in 2..{len(SHAPES)}, got {classes}")
    if object_size[1] * 2 > size:
        raise ValueError(f"objects of {object_size[1]} px do not fit twice in {size} px")
    gen = torch.Generator().manual_seed(seed)
    images = _clutter(n, size, gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    boxes = torch.zeros((n, 4), dtype=torch.long)
    masks = torch.zeros((n, size, size), dtype=torch.bool)

    def _rand(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    for i in range(n):
        placed: list[tuple[int, int, int, int]] = []
        kinds = [int(labels[i])] + [
            (int(labels[i]) + _rand(1, classes - 1)) % classes for _ in range(distractors)]
        for j, kind in enumerate(kinds):
            side = _rand(*object_size)
            for _ in range(100):  # a free place; objects never overlap
                x0, y0 = _rand(0, size - side), _rand(0, size - side)
                if all(x0 + side + 1 <= a or a + s + 1 <= x0 or y0 + side + 1 <= b or b + s + 1 <= y0
                       for a, b, s, _ in placed):
                    break
            else:
                continue  # no room for this distractor
            placed.append((x0, y0, side, kind))
            mask = _shape_mask(SHAPES[kind], side)
            colour = _TARGET if j == 0 else _DISTRACTOR[_rand(0, len(_DISTRACTOR) - 1)]
            jitter = 0.06 * (torch.rand(3, generator=gen) - 0.5)
            rgb = (torch.tensor(colour) + jitter).clamp(0, 1).view(3, 1, 1)
            patch = images[i, :, y0:y0 + side, x0:x0 + side]
            images[i, :, y0:y0 + side, x0:x0 + side] = torch.where(mask, rgb.expand_as(patch), patch)
            if j == 0:
                boxes[i] = torch.tensor([x0, y0, x0 + side, y0 + side])
                masks[i, y0:y0 + side, x0:x0 + side] = mask
    return SyntheticSet(images, labels, boxes, masks)


# --------------------------------------------------------------------------- models


def small_vit(*, size: int = 64, classes: int = 4, patch: int = 8, dim: int = 64, depth: int = 4, heads: int = 4,
              seed: int = 0) -> nn.Module:
    """A small timm VisionTransformer (class-token pooling), seeded."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=2.0, num_classes=classes, global_pool="token")


class SmallCNN(nn.Module):
    """Four 3x3 convolutions (three of stride 2: maps at 1/8 of the input), GAP, linear."""

    def __init__(self, classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def small_cnn(*, classes: int = 4, width: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(classes, width)


@contextmanager
def single_thread(deterministic: bool = True):
    """One intra-op thread and deterministic algorithms inside the block; both put back after."""
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)


def train(model: nn.Module, data: SyntheticSet, *, epochs: int = 10, batch: int = 64, lr: float = 2e-3,
          weight_decay: float = 0.05, seed: int = 0) -> nn.Module:
    """AdamW with a one-cycle cosine schedule on the set, seeded; the model comes back in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data.normalized(), data.labels
    steps = epochs * math.ceil(len(data) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: SyntheticSet, batch: int = 256) -> float:
    x = data.normalized()
    hits = sum(int((model(x[s:s + batch]).argmax(1) == data.labels[s:s + batch]).sum())
               for s in range(0, len(data), batch))
    return hits / len(data)
