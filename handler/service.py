"""TorchServe glue: load the archive, answer a batch of requests, one status per request.

Every request of a batch is decoded and validated on its own; the good ones go through one
forward and one gradient pass together; a bad one gets its own 4xx JSON error and the others
still get their 200. Only this module knows TorchServe's context object.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handler.cam import (
    CamEngine,
    Frames,
    blend,
    device_index,
    device_tensor,
    normalize_maps,
    to_host,
    to_uint8,
    upsample_maps,
)
from handler.codec import (
    OPTION_NAMES,
    CodecLimits,
    LabelIndex,
    Options,
    decode_image,
    extract_request,
    parse_defaults,
    parse_options,
)
from handler.config import ServeConfig
from handler.errors import (
    DeviceOutOfMemory,
    HandlerError,
    ModelFailure,
    ResponseTooLarge,
    error_body,
)
from handler.host import tune_malloc
from handler.models import build_model, load_state_dict_strict, read_labels
from handler.render import grid_values, image_pixels, jpeg_base64, png_base64

__all__ = ["GradCamHandler"]

logger = logging.getLogger(__name__)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_JSON = "application/json"


@dataclass
class _Job:
    """One decoded, validated request of the batch."""

    idx: int
    image: Image.Image
    options: Options
    frame: tuple[int, int]  # (height, width) of its heatmaps and overlays


class _Metrics:
    """The handler's metrics, declared in metrics.yaml; the server exports them (prometheus)."""

    def __init__(self, cache, model_name: str) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        self.dims = [model_name, "Model"]
        self.gauges = {name: cache.get_metric(name, MetricTypes.GAUGE) for name in (
            "GradcamBatchSize", "GradcamDecodeTime", "GradcamPassTime", "GradcamRenderTime")}
        self.counters = {name: cache.get_metric(name, MetricTypes.COUNTER) for name in (
            "GradcamBatches", "GradcamMaps", "GradcamRejected")}

    def batch(self, size: int, decode_ms: float, pass_ms: float, render_ms: float, maps: int) -> None:
        for name, value in (("GradcamBatchSize", size), ("GradcamDecodeTime", decode_ms),
                            ("GradcamPassTime", pass_ms), ("GradcamRenderTime", render_ms)):
            self.gauges[name].add_or_update(value, self.dims)
        self.counters["GradcamBatches"].add_or_update(1, [*self.dims, str(size)])
        if maps:
            self.counters["GradcamMaps"].add_or_update(maps, self.dims)

    def rejected(self, reason: str) -> None:
        self.counters["GradcamRejected"].add_or_update(1, [*self.dims, reason])


def _device(context) -> torch.device:
    gpu_id = context.system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def _frame_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The image's own frame ``(height, width)``, long side capped at ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


class GradCamHandler:
    """Predictions and Grad-CAM maps for a batch of images."""

    def __init__(self) -> None:
        self.initialized = False
        self.metrics: _Metrics | None = None

    # ------------------------------------------------------------------ load

    def initialize(self, context) -> None:
        """Build the model, load its weights, resolve the target layer, warm the pass up."""
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = config = ServeConfig.from_dict(yaml_config.get("handler"))
        self.model_name = getattr(context, "model_name", None) or context.manifest["model"]["modelName"]
        weights_name = context.manifest["model"].get("serializedFile", "model.safetensors")
        # Once per worker process, before the first large allocation.
        tune_malloc(config.malloc_mmap_threshold_mib, config.malloc_trim_threshold_mib)

        model = build_model(config.model, config.num_classes, config.model_kwargs, model_dir)
        load_state_dict_strict(model, _load_weights(model_dir / weights_name))
        self.labels = read_labels(model_dir / config.labels) if config.labels else None
        if self.labels is not None and len(self.labels) != config.num_classes:
            raise ValueError(
                f"{config.labels} has {len(self.labels)} names for {config.num_classes} classes"
            )
        self.device = _device(context)
        self.engine = CamEngine(
            model,
            config.target_layer,
            device=self.device,
            mean=config.mean,
            std=config.std,
            input_size=tuple(config.input_size),
            precision=config.precision if self.device.type == "cuda" else "fp32",
            channels_last=config.channels_last,
            batched_targets=config.batched_targets,
            layout=config.layout,
            prefix_tokens=config.prefix_tokens,
            grid=config.grid,
        )
        self.limits = CodecLimits(
            max_image_bytes=config.max_image_bytes,
            max_pixels=config.max_pixels,
            max_cams=config.max_cams,
        )
        self.label_index = LabelIndex(self.labels, config.num_classes)
        defaults = {k: getattr(config, k) for k in OPTION_NAMES}
        self.defaults = parse_defaults(defaults, self.label_index, config.num_classes, self.limits)
        self.resample = _RESAMPLE[config.interpolation]
        # Letterbox padding is the mean colour: zero after normalisation.
        self.fill = np.round(np.asarray(config.mean) * 255).astype(np.uint8)
        # Dry batch: a broken target layer or head fails the load, not the first request.
        warm = Image.new("RGB", tuple(reversed(config.input_size)), (128, 128, 128))
        self._run([self._job(0, warm, self.defaults)])
        metrics = getattr(context, "metrics", None)
        self.metrics = _Metrics(metrics, self.model_name) if metrics is not None else None
        self.initialized = True
        logger.info(
            "loaded %s (%s) on %s, target layer %s (%s), input %s, %s",
            self.model_name, config.model, self.device, self.engine.target_layer,
            self.engine.layout.describe(), config.input_size, config.precision,
        )

    # ------------------------------------------------------------------ requests

    def handle(self, data: list[dict], context) -> list[str]:
        """Answer every request of the batch, each with its own status and JSON body."""
        started = time.perf_counter()
        responses: list[str | None] = [None] * len(data)
        jobs: list[_Job] = []
        for idx, item in enumerate(data):
            try:
                raw = extract_request(item, _headers(context, idx))
                image = decode_image(raw.image_bytes, self.limits)
                options = parse_options(
                    raw.options, self.defaults, self.label_index, self.config.num_classes, self.limits
                )
                jobs.append(self._job(idx, image, options))
            except HandlerError as err:
                responses[idx] = self._fail(context, idx, err, len(data))
        decoded = time.perf_counter()
        timings = {"pass": 0.0, "render": 0.0, "maps": 0}
        if jobs:
            try:
                bodies = self._run(jobs, timings)
            except HandlerError as err:
                bodies = [err] * len(jobs)
            except torch.OutOfMemoryError:
                logger.exception("device out of memory on a batch of %d", len(jobs))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                bodies = [DeviceOutOfMemory("device out of memory; retry with a smaller request")] * len(jobs)
            except Exception as exc:  # the batch failed, the worker must not
                logger.exception("Grad-CAM pass failed on a batch of %d", len(jobs))
                bodies = [ModelFailure(f"inference failed: {type(exc).__name__}: {exc}")] * len(jobs)
            for job, body in zip(jobs, bodies):
                responses[job.idx] = self._answer(context, job.idx, body, len(data))
        decode_ms = (decoded - started) * 1e3
        logger.debug("batch of %d: decode %.1f ms, pass %.1f ms, render %.1f ms",
                     len(data), decode_ms, timings["pass"], timings["render"])
        if self.metrics is not None:
            self.metrics.batch(len(data), decode_ms, timings["pass"], timings["render"], timings["maps"])
        return responses

    def _job(self, idx: int, image: Image.Image, options: Options) -> _Job:
        return _Job(idx, image, options, _frame_size(image.width, image.height, self.config.max_side))

    def _answer(self, context, idx: int, body: dict | HandlerError, batch_size: int) -> str:
        if isinstance(body, HandlerError):
            return self._fail(context, idx, body, batch_size)
        body["batch_size"] = batch_size
        text = json.dumps(body, separators=(",", ":"))
        if len(text) > self.config.max_response_bytes:
            return self._fail(context, idx, ResponseTooLarge(
                f"response of {len(text)} bytes exceeds the {self.config.max_response_bytes}-byte "
                "limit; ask for fewer cam_classes or output forms", field="outputs"), batch_size)
        context.set_response_content_type(idx, _JSON)
        return text

    def _fail(self, context, idx: int, err: HandlerError, batch_size: int) -> str:
        logger.info("request %d of %d rejected: %s %s", idx, batch_size, err.status, err.message)
        if self.metrics is not None:
            self.metrics.rejected(err.kind)
        context.set_response_status(err.status, err.kind, idx)
        context.set_response_content_type(idx, _JSON)
        return json.dumps({**error_body(err), "batch_size": batch_size})

    # ------------------------------------------------------------------ the batch

    def _model_pixels(self, image: Image.Image) -> tuple[np.ndarray, tuple[float, ...]]:
        """The image as the model sees it, and its box inside the input (fractions)."""
        height, width = self.config.input_size
        if self.config.resize == "squash":
            return image_pixels(image, (width, height), self.resample), (0.0, 0.0, 1.0, 1.0)
        scale = min(width / image.width, height / image.height)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        x0, y0 = (width - w) // 2, (height - h) // 2
        canvas = np.empty((height, width, 3), dtype=np.uint8)
        canvas[:] = self.fill
        canvas[y0 : y0 + h, x0 : x0 + w] = image_pixels(image, (w, h), self.resample)
        return canvas, (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)

    def _run(self, jobs: list[_Job], timings: dict | None = None) -> list[dict]:
        """One forward and gradient pass for the jobs of a batch; their JSON bodies, in order.

        ``timings`` receives the pass and render times (ms) and the number of maps.
        """
        started = time.perf_counter()
        engine, config = self.engine, self.config
        n = len(jobs)
        height, width = config.input_size
        pixels = np.empty((n, height, width, 3), dtype=np.uint8)
        boxes = []
        for j, job in enumerate(jobs):
            pixels[j], box = self._model_pixels(job.image)
            boxes.append(box)
        x = engine.prepare(torch.from_numpy(pixels))
        cam_pass = engine.forward(x)
        probs = cam_pass.logits.detach().float().softmax(dim=1)
        k = max(max(j.options.topk for j in jobs),
                max(j.options.cam_classes.count for j in jobs))
        top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)

        rows, classes_t, methods = self._targets(jobs, top_i)
        maps = normalize_maps(engine.cams(cam_pass, rows, classes_t, methods))

        # Heatmaps and overlays only for the targets whose request asks for them.
        wants = [set(jobs[r].options.outputs) for r in rows]
        drawn = [p for p, w in enumerate(wants) if w & {"heatmap", "overlay"}]
        blended = [p for p in drawn if "overlay" in wants[p]]
        host_in = {"top_p": top_p, "top_i": top_i, "classes": classes_t, "maps": maps}
        frames = [jobs[rows[p]].frame for p in drawn]
        if drawn:
            # Built on the host and copied without waiting: nothing before the one host copy
            # below waits for the device.
            frame_t = Frames(
                size=device_tensor(frames, engine.device),
                box=device_tensor([boxes[rows[p]] for p in drawn], engine.device),
            )
            out_size = (max(f[0] for f in frames), max(f[1] for f in frames))
            heat = to_uint8(upsample_maps(maps[device_index(drawn, engine.device)], frame_t, out_size))
            host_in["heat"] = heat
            if blended:
                host_in["overlay"] = self._overlays(jobs, rows, drawn, blended, frames, heat)
        host = {k: v.cpu().numpy() for k, v in to_host(host_in).items()}
        passed = time.perf_counter()
        bodies = self._bodies(jobs, boxes, rows, methods, wants, frames, drawn, blended, host, maps.shape[1:])
        if timings is not None:
            timings["maps"] = len(rows)
            timings["pass"] = (passed - started) * 1e3
            timings["render"] = (time.perf_counter() - passed) * 1e3
        return bodies

    def _bodies(self, jobs, boxes, rows, methods, wants, frames, drawn, blended, host, grid) -> list[dict]:
        """One JSON body per job from the batch's host arrays."""
        bodies = []
        first_target = 0
        at_drawn = {p: i for i, p in enumerate(drawn)}
        at_blended = {p: i for i, p in enumerate(blended)}
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
                    if "overlay" in wants[p]:
                        cam["overlay"] = jpeg_base64(host["overlay"][at_blended[p], :fh, :fw],
                                                     self.config.overlay_quality)
                body["cams"].append(cam)
            first_target += count
            body.update(self._geometry(job, boxes[j], grid))
            bodies.append(body)
        return bodies

    def _targets(self, jobs: list[_Job], top_i: torch.Tensor) -> tuple[list[int], torch.Tensor, list[str]]:
        """Every (image row, class, method) target of the batch, in response order."""
        rows, classes, methods, top_rows = [], [], [], []
        for j, job in enumerate(jobs):
            sel = job.options.cam_classes
            if sel.mode == "top":
                top_rows.extend((len(rows) + r, j, r) for r in range(sel.count))
                ids = [0] * sel.count  # filled on the device from top_i below
            elif sel.mode == "ids":
                ids = list(sel.class_ids)
            else:
                ids = []
            rows.extend([j] * len(ids))
            classes.extend(ids)
            methods.extend([job.options.cam_method] * len(ids))
        classes_t = device_index(classes, top_i.device)
        if top_rows:
            slot, img, rank = (device_index(c, top_i.device) for c in zip(*top_rows))
            classes_t[slot] = top_i[img, rank]
        return rows, classes_t, methods

    def _overlays(self, jobs, rows, drawn, blended, frames, heat) -> torch.Tensor:
        """Blend the colour-mapped heat onto each image's display copy, on the device."""
        at_drawn = {p: i for i, p in enumerate(drawn)}
        height, width = heat.shape[1:]
        slot: dict[int, int] = {}  # job -> row of `canvases`
        canvases = []
        for p in blended:
            j = rows[p]
            if j not in slot:
                fh, fw = frames[at_drawn[p]]
                canvas = np.zeros((height, width, 3), dtype=np.uint8)
                canvas[:fh, :fw] = image_pixels(jobs[j].image, (fw, fh), Image.Resampling.BILINEAR)
                slot[j] = len(canvases)
                canvases.append(canvas)
        images = torch.from_numpy(np.stack(canvases)).to(self.device, non_blocking=True)
        pick = device_index([slot[rows[p]] for p in blended], self.device)
        heat_rows = device_index([at_drawn[p] for p in blended], self.device)
        return blend(heat[heat_rows], images[pick], self.engine.lut, self.config.overlay_alpha)

    def _class(self, class_id: int, probability: float | None = None) -> dict:
        out = {"class_id": class_id, "label": self.labels[class_id] if self.labels else str(class_id)}
        if probability is not None:
            out["probability"] = round(probability, 6)
        return out

    def _geometry(self, job: _Job, box: tuple[float, ...], grid: torch.Size) -> dict:
        """How the low-res grid maps onto the original image."""
        gh, gw = int(grid[0]), int(grid[1])
        fh, fw = job.frame
        return {
            "model": self.model_name,
            "target_layer": self.engine.target_layer,
            "layout": self.engine.layout.kind,
            "image_size": [job.image.width, job.image.height],
            "input_size": list(reversed(self.config.input_size)),
            "resize": self.config.resize,
            "grid_size": [gw, gh],
            # The image covers this part of the grid, in grid cells (x0, y0, x1, y1).
            "grid_box": [round(box[0] * gw, 4), round(box[1] * gh, 4),
                         round(box[2] * gw, 4), round(box[3] * gh, 4)],
            "frame_size": [fw, fh],
        }


def _headers(context, idx: int) -> dict[str, str]:
    """The request's HTTP headers (names lower-cased); form fields' entries are skipped."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, KeyError):
        return {}
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Archived weights are safetensors: loading them runs no pickled code."""
    from safetensors.torch import load_file

    return load_file(str(path))
