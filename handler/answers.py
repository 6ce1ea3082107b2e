"""The JSON body of each answer, from the batch's host arrays: predictions, maps in the forms
asked for, and how the low-res grid maps onto the image. No server or torch import here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from handler.images import ImageSource, Photo
from handler.options import Options
from handler.render import grid_values, jpeg_base64, png_base64
from handler.vocab import QUALITY_KEYS

__all__ = ["AnswerWriter", "Job", "frame_size"]


@dataclass
class Job:
    """One decoded, validated request of the batch."""

    idx: int
    photo: Photo
    options: Options
    frame: tuple[int, int]  # (height, width) of its heatmaps and overlays
    source: ImageSource | None = None  # the opened image, for a second decode at another scale
    display: Photo | None = None  # the overlay's background where it needs more pixels than `photo`


def frame_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The image's own frame ``(height, width)``, long side capped at ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _quality(values) -> dict:
    """A map's ``quality`` object from its row of :data:`handler.vocab.QUALITY_KEYS` numbers."""
    out = {key: round(float(v), 6) for key, v in zip(QUALITY_KEYS, values)}
    out["increase"] = bool(values[QUALITY_KEYS.index("increase")])
    return out


class AnswerWriter:
    """Writes the answers of one model.

    Args:
        model_name: the served name, echoed in each answer.
        labels: class names by id, or None.
        engine: the model's :class:`handler.cam.CamEngine` (target layer and layout).
        config: the archive's :class:`handler.config.ServeConfig`.
    """

    def __init__(self, model_name: str, labels: list[str] | None, engine, config) -> None:
        self.model_name = model_name
        self.labels = labels
        self.engine = engine
        self.config = config

    def bodies(self, jobs, boxes, rows, methods, wants, frames, drawn, blended, host, grid,
               scored=()) -> list[dict]:
        """One JSON body per job.

        Args:
            jobs: the batch's jobs, in order.
            boxes: each job's place in the model input, in [0, 1] units.
            rows: each target's job; ``methods`` its CAM method; ``wants`` its output forms.
            frames: each drawn target's ``(height, width)``; ``drawn`` and ``blended``: the
                targets with a heatmap or overlay, and those with an overlay.
            host: the host arrays (``top_i``, ``top_p``, ``classes``, ``maps``, ``heat``, overlays).
            grid: the low-res map's ``(h, w)``.
            scored: the targets with a ``quality`` object, in the order of ``host["quality"]``'s rows.
        """
        bodies = []
        first_target = 0
        at_drawn = {p: i for i, p in enumerate(drawn)}
        at_blended = {p: i for i, p in enumerate(blended)}
        at_scored = {p: i for i, p in enumerate(scored)}
        for j, job in enumerate(jobs):
            topk = job.options.topk
            body = {
                "predictions": [self._class(int(c), float(p))
                                for c, p in zip(host["top_i"][j, :topk], host["top_p"][j, :topk])],
                "cams": [],
            }
            count = rows.count(j)
            for p in range(first_target, first_target + count):
                cam = self._class(int(host["classes"][p]))
                cam["method"] = methods[p]
                if "map" in wants[p]:
                    cam["map"] = grid_values(host["maps"][p])
                if p in at_drawn:
                    fh, fw = frames[at_drawn[p]]
                    if "heatmap" in wants[p]:
                        cam["heatmap"] = png_base64(host["heat"][at_drawn[p], :fh, :fw])
                    if "overlay" in wants[p] and "overlay_jpeg" in host:  # encoded on the device
                        start, stop = host["overlay_offsets"][at_blended[p] : at_blended[p] + 2]
                        cam["overlay"] = base64.b64encode(host["overlay_jpeg"][start:stop].tobytes()).decode("ascii")
                    elif "overlay" in wants[p]:
                        cam["overlay"] = jpeg_base64(host["overlay"][at_blended[p], :fh, :fw],
                                                     self.config.render.overlay_quality)
                if p in at_scored:
                    cam["quality"] = _quality(host["quality"][at_scored[p]])
                body["cams"].append(cam)
            first_target += count
            body.update(self._geometry(job, boxes[j], grid))
            bodies.append(body)
        return bodies

    def _class(self, class_id: int, probability: float | None = None) -> dict:
        out = {"class_id": class_id, "label": self.labels[class_id] if self.labels else str(class_id)}
        if probability is not None:
            out["probability"] = round(probability, 6)
        return out

    def _geometry(self, job: Job, box: tuple[float, ...], grid) -> dict:
        """How the low-res grid maps onto the original image."""
        gh, gw = int(grid[0]), int(grid[1])
        fh, fw = job.frame
        return {
            "model": self.model_name,
            "target_layer": self.engine.target_layer,
            "layout": self.engine.layout.kind,
            "image_size": list(job.photo.size),
            "input_size": list(reversed(self.config.input.input_size)),
            "resize": self.config.input.resize,
            "grid_size": [gw, gh],
            # The image covers this part of the grid, in grid cells (x0, y0, x1, y1).
            "grid_box": [round(box[0] * gw, 4), round(box[1] * gh, 4),
                         round(box[2] * gw, 4), round(box[3] * gh, 4)],
            "frame_size": [fw, fh],
        }
