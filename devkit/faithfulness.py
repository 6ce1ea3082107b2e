"""Faithfulness of explanation maps against ground truth: the pointing game and the deletion AUC,
with the maps made by the product's own code path (:func:`handler.attention_cam.batch_pass`, the
engine's ``cams``, ``normalize_maps`` and ``upsample_maps``, as ``Pipeline._run`` calls them).

- Pointing game (Zhang et al., 2016): a hit when the map's peak falls on the object's box, grown
  by ``tolerance`` pixels on every side. A constant map points nowhere: a miss.
- Deletion (Petsiuk et al., 2018, RISE): pixels are deleted in order of map value, most
  important first, in ``steps`` equal steps, replaced by the normalised mean (grey); the class
  probability is integrated over the deleted fraction (trapezoids). Lower is better: a map that
  finds what the class rests on makes the probability fall fast.

Used by ``scripts/bench/bench_faithfulness.py`` and ``tests/test_ground_truth.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from handler.attention_cam import AttentionExplainer, batch_pass
from handler.cam import CamEngine, Frames, normalize_maps, upsample_maps

__all__ = ["explanation_maps", "pointing_game", "deletion_auc", "random_maps"]


def explanation_maps(engine: CamEngine, explainer: AttentionExplainer | None, x: Tensor, classes: Tensor,
                     method: str, batch: int = 64) -> Tensor:
    """Maps ``(N, H, W)`` in [0, 1] at the input's size for one class per image, by ``method``.

    Args:
        engine: the served model's engine.
        explainer: its attention explainer (attention methods only).
        x: the normalised inputs ``(N, 3, H, W)``.
        classes: ``(N,)`` class per image.
        method: a ``cam_method``.
        batch: images per pass.
    """
    height, width = x.shape[2:]
    out = []
    for start in range(0, x.shape[0], batch):
        xs = x[start:start + batch]
        n = xs.shape[0]
        cam_pass = batch_pass(engine, explainer, xs, [method] * n)
        maps = normalize_maps(cam_pass.cams(list(range(n)), classes[start:start + n], [method] * n))
        frames = Frames(size=torch.tensor([[height, width]] * n), box=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n))
        out.append(upsample_maps(maps.float(), frames, (height, width)).detach())
    return torch.cat(out)


def random_maps(n: int, height: int, width: int, grid: tuple[int, int], seed: int = 0) -> Tensor:
    """Seeded random maps on the models' grid, upsampled as the others are: the chance row."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand((n, *grid), generator=gen)
    frames = Frames(size=torch.tensor([[height, width]] * n), box=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n))
    return upsample_maps(maps, frames, (height, width))


def pointing_game(maps: Tensor, boxes: Tensor, tolerance: int = 0) -> Tensor:
    """Per image, whether the peak of its ``(H, W)`` map falls on its ``(x0, y0, x1, y1)`` box
    (end exclusive) grown by ``tolerance`` pixels."""
    n, _, width = maps.shape
    flat = maps.flatten(1)
    peak = flat.argmax(dim=1)
    y, x = peak // width, peak % width
    x0, y0, x1, y1 = boxes.unbind(1)
    inside = (x >= x0 - tolerance) & (x < x1 + tolerance) & (y >= y0 - tolerance) & (y < y1 + tolerance)
    return inside & (flat.amax(dim=1) > flat.amin(dim=1))


@torch.no_grad()
def deletion_auc(model: torch.nn.Module, x: Tensor, maps: Tensor, classes: Tensor, steps: int = 16,
                 fill: float = 0.0, batch: int = 256, seed: int = 0) -> Tensor:
    """Per image, the area under the class probability as its pixels are deleted in map order.

    Args:
        model: the classifier (eval mode).
        x: normalised inputs ``(N, 3, H, W)``.
        maps: ``(N, H, W)`` maps at the input's size.
        classes: ``(N,)`` the class whose probability is followed.
        steps: deletion steps (``steps + 1`` forwards per image, from none to all pixels deleted).
        fill: the value deleted pixels take, in normalised units (0: the mean).
        batch: images per forward.
        seed: ties in a map (its zeros) are broken by seeded noise, alike for every method.
    """
    n, _, height, width = x.shape
    pixels = height * width
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n, pixels), generator=gen) * 1e-6
    order = (maps.flatten(1).float() + noise).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels).expand(n, pixels).contiguous())
    probs = torch.empty((n, steps + 1))
    for k in range(steps + 1):
        keep = (rank >= round(k * pixels / steps)).view(n, 1, height, width)
        deleted = torch.where(keep, x, torch.full_like(x, fill))
        for start in range(0, n, batch):
            logits = model(deleted[start:start + batch])
            p = logits.float().softmax(dim=1)
            probs[start:start + batch, k] = p.gather(1, classes[start:start + batch, None])[:, 0]
    return torch.trapezoid(probs, dx=1.0 / steps, dim=1)
