"""How faithful each map is: the model's confidence when only the map's top region is kept, and
when it is removed, from one extra batched forward pass without gradients. Pure torch.

For a map of class ``c`` on image ``x`` (Chattopadhyay et al., 2018, "Grad-CAM++", section 6.2;
Rong et al., 2022, "ROAD" for the removal):

- ``confidence`` ``y = softmax(model(x))[c]``, from the Grad-CAM pass itself;
- the region ``R``: the ``fraction`` of the image's pixels where the map, upsampled bilinearly
  to the model input, is highest (letterbox padding is never part of it, nor imputed);
- ``kept_confidence`` ``o = softmax(model(keep(x, R)))[c]``, every pixel outside ``R`` imputed,
  and ``drop = max(0, y - o) / y``, ``increase = o > y`` (their means over a set of images are
  Average Drop and Increase in Confidence);
- ``removed_confidence`` ``r = softmax(model(keep(x, not R)))[c]``, the pixels of ``R`` imputed,
  and ``removed_drop = max(0, y - r) / y``.

A constant fill (black, the mean colour) would draw the region's outline into the image and the
model would see the shape of the mask, not only the pixels left (ROAD's argument). Imputed pixels
are instead a normalised convolution of the known ones, ``blur(x * m) / blur(m)``, at every scale
of a pyramid (pull-push: each hole gets the finest scale that has support around it, so a large
hole fills smoothly from far away and a small one from its rim), plus small Gaussian noise drawn
once with a fixed seed: the same request gives the same numbers.

Everything is built once per pipeline (the pyramid's kernel, the noise, the pixel grid); per
batch, all (image, map) pairs, kept and removed, go through the model in one call (in chunks of
``max_batch`` only beyond it), in ``torch.inference_mode``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handler.cam import device_index, device_tensor, eager_module
from handler.vocab import QUALITY_KEYS

__all__ = ["QUALITY_KEYS", "QualityScorer", "impute"]

_EPS = 1e-12


def _pyramid_kernel(channels: int, device: torch.device) -> Tensor:
    """A 4x4 binomial low-pass ([1, 3, 3, 1] / 8 each way) per channel, for stride-2 reductions."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    return torch.outer(taps, taps).expand(channels, 1, 4, 4).contiguous().to(device)


def impute(x: Tensor, known: Tensor, kernel: Tensor, noise: Tensor | None = None) -> Tensor:
    """``x`` with its unknown pixels replaced by a normalised convolution of the known ones.

    Pull-push: the premultiplied pixels ``x * m`` and the mask ``m`` are reduced together down a
    pyramid to 1x1 (a binomial filter, stride 2); going back up, each level is
    ``w * (sum(x m) / sum(m)) + (1 - w) * upsampled coarser level``, with ``w = min(1, 4 sum(m))``
    the support it has. Known pixels keep their value; an unknown one continues its
    surroundings, so no edge marks where the hole is.

    Args:
        x: ``(B, C, H, W)`` images.
        known: ``(B, 1, H, W)`` mask, 1 where a pixel is known (every image needs one).
        kernel: :func:`_pyramid_kernel` for ``C + 1`` channels.
        noise: optional ``(1 or B, C, H, W)`` noise added to the imputed pixels.

    Returns:
        ``(B, C, H, W)`` images, known pixels unchanged.
    """
    channels = x.shape[1]
    known = known.to(x.dtype)
    level = torch.cat([x * known, known], dim=1)
    levels = [level]
    while level.shape[-1] > 1 or level.shape[-2] > 1:
        height, width = level.shape[-2:]
        if min(height, width) < 2:  # one side is down to 1: zeros count for nothing in sum(m)
            level = F.pad(level, (0, max(0, 2 - width), 0, max(0, 2 - height)))
        level = F.conv2d(level, kernel, stride=2, padding=1, groups=channels + 1)
        levels.append(level)
    estimate = None
    for level in reversed(levels):
        support = level[:, channels:]
        mean = level[:, :channels] / support.clamp(min=_EPS)
        if estimate is None:
            estimate = mean
            continue
        up = F.interpolate(estimate, size=level.shape[-2:], mode="bilinear", align_corners=False)
        weight = (support * 4).clamp(max=1)
        estimate = torch.lerp(up, mean, weight)
    if noise is not None:
        estimate = estimate + noise
    return torch.where(known > 0, x, estimate)


@contextmanager
def _uncaptured(engine) -> Iterator[nn.Module]:
    """The engine's eager model; a compiled model's :class:`~handler.cam.LeafCapture` (which makes
    a leaf for a gradient pass) lets the target layer's output through while it runs. Nothing is
    swapped in the model, so the compiled graphs' guards see the same modules afterwards."""
    model = eager_module(engine.model)
    capture = engine.capture
    with capture.passing() if capture is not None else nullcontext():
        yield model


class QualityScorer:
    """Scores maps of one model's batches; built once per pipeline.

    Args:
        input_size: ``(height, width)`` of the model input.
        std: per-channel std of the model's normalisation, [0, 1] units (scales the noise).
        fraction: the share of the image's pixels in a map's region, in (0, 1).
        max_batch: most images in one call of the model (kept and removed variants together).
        device: where the model runs.
        noise: standard deviation of the noise on imputed pixels, [0, 1] pixel units.
        seed: the noise's seed.

    Raises:
        ValueError: ``fraction`` is not in (0, 1) or ``max_batch`` is not positive.
    """

    def __init__(self, input_size: Sequence[int], std: Sequence[float], fraction: float = 0.4,
                 max_batch: int = 64, device: torch.device | str = "cpu", noise: float = 0.01,
                 seed: int = 0) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"quality_fraction must be in (0, 1), got {fraction}")
        if max_batch < 1:
            raise ValueError(f"quality_max_batch must be positive, got {max_batch}")
        self.input_size = height, width = (int(input_size[0]), int(input_size[1]))
        self.fraction = float(fraction)
        self.max_batch = int(max_batch)
        self.device = device = torch.device(device)
        generator = torch.Generator().manual_seed(seed)
        scale = torch.tensor([noise / s for s in std]).view(1, 3, 1, 1)
        self.noise = (torch.randn((1, 3, height, width), generator=generator) * scale).to(device)
        self.kernel = _pyramid_kernel(4, device)
        self.rows = torch.arange(height, device=device).view(1, 1, height, 1)
        self.cols = torch.arange(width, device=device).view(1, 1, 1, width)

    def _rects(self, boxes: Sequence[Sequence[float]]) -> list[tuple[int, int, int, int]]:
        """Each image's pixels in the model input, ``(x0, y0, x1, y1)``, from its box in fractions."""
        height, width = self.input_size
        return [(round(b[0] * width), round(b[1] * height), round(b[2] * width), round(b[3] * height))
                for b in boxes]

    def regions(self, maps: Tensor, boxes: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor, list[float]]:
        """Each map's top region, its image's pixels, and the share of them the region is.

        Args:
            maps: ``(P, h, w)`` maps on the model input's grid.
            boxes: each map's image box in the model input, fractions ``(x0, y0, x1, y1)``.

        Returns:
            ``region`` and ``image`` ``(P, 1, H, W)`` bool masks, and each region's fraction.
        """
        height, width = self.input_size
        count = maps.shape[0]
        score = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)
        rects = self._rects(boxes)
        whole = all(r == (0, 0, width, height) for r in rects)
        if whole:
            image = torch.ones((count, 1, height, width), dtype=torch.bool, device=maps.device)
        else:
            x0, y0, x1, y1 = (torch.tensor(v, device=maps.device).view(-1, 1, 1, 1) for v in zip(*rects))
            image = (self.cols >= x0) & (self.cols < x1) & (self.rows >= y0) & (self.rows < y1)
            score = score.masked_fill(~image, -math.inf)
        areas = [max(1, (r[2] - r[0]) * (r[3] - r[1])) for r in rects]
        sizes = [max(1, min(a - 1, round(a * self.fraction))) for a in areas]
        flat = score.flatten(1)
        top = flat.topk(max(sizes), dim=1).indices
        take = torch.ones_like(top, dtype=torch.bool)
        if len(set(sizes)) > 1:
            wanted = torch.tensor(sizes, device=maps.device)[:, None]
            take = torch.arange(top.shape[1], device=maps.device)[None] < wanted
        region = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, take).view(count, 1, height, width)
        return region, image, [s / a for s, a in zip(sizes, areas)]

    def variants(self, x: Tensor, region: Tensor, image: Tensor) -> Tensor:
        """``(2P, C, H, W)``: each image with only its region kept, then with its region removed."""
        x2 = torch.cat([x, x])
        imputed = torch.cat([image & ~region, region])
        return impute(x2, ~imputed, self.kernel.to(x.dtype), self.noise.to(x.dtype))

    def score(self, engine, x: Tensor, probs: Tensor, rows: Sequence[int], classes: Tensor, maps: Tensor,
              boxes: Sequence[Sequence[float]]) -> Tensor:
        """The ``quality`` numbers of P maps (:data:`QUALITY_KEYS`), one row each.

        Args:
            engine: the :class:`~handler.cam.CamEngine` whose model made the maps.
            x: ``(N, 3, H, W)`` the batch as the model saw it.
            probs: ``(N, num_classes)`` its softmax.
            rows: each map's image row in ``x`` (host ints).
            classes: each map's class, a device tensor.
            maps: ``(P, h, w)`` the maps.
            boxes: each image's box in the model input (by image row).

        Returns:
            ``(P, 7)`` float32, on the device.
        """
        index = device_index(rows, x.device)
        region, image, fractions = self.regions(maps, [boxes[r] for r in rows])
        batch = self.variants(x.float()[index], region, image)
        batch = batch.contiguous(memory_format=engine.memory_format)
        with torch.inference_mode(), _uncaptured(engine) as model:
            with torch.autocast(batch.device.type, dtype=engine.autocast, enabled=engine.autocast is not None):
                logits = torch.cat([model(chunk) for chunk in batch.split(self.max_batch)])
            count = len(rows)
            picked = logits.float().softmax(dim=1).gather(1, torch.cat([classes, classes])[:, None])[:, 0]
            kept, removed = picked[:count], picked[count:]
            confidence = probs[index, classes].float()
            drop = (confidence - kept).clamp(min=0) / confidence.clamp(min=_EPS)
            removed_drop = (confidence - removed).clamp(min=0) / confidence.clamp(min=_EPS)
            fraction = device_tensor(fractions, x.device, torch.float32)
            return torch.stack([confidence, kept, drop, (kept > confidence).float(), removed, removed_drop,
                                fraction], dim=1).clone()
