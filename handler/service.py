"""TorchServe glue: load the archive, answer a batch of requests, one status per request.

Every request of a batch is decoded and validated on its own; the good ones go through one
forward and one gradient pass together; a bad one gets its own 4xx JSON error and the others
still get their 200. Only this module knows TorchServe's context object.
"""

from __future__ import annotations

import base64
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
    extract_request,
    parse_defaults,
    parse_options,
)
from handler.compiled import CompiledPass
from handler.config import ServeConfig
from handler.errors import (
    DeviceOutOfMemory,
    HandlerError,
    ModelFailure,
    ResponseTooLarge,
    error_body,
)
from handler.host import tune_malloc
from handler.image_tensors import DeviceJpegRoute, display_batch, model_batch
from handler.images import ImageDecoder, ImageSource, InputLayout, Photo, cover_size, open_image
from handler.metrics import HandlerMetrics
from handler.models import build_model, load_state_dict_strict, read_labels
from handler.oip import V2Reply, group_tensors, v2_response
from handler.render import DeviceJpegEncoder, grid_values, jpeg_base64, png_base64

__all__ = ["GradCamHandler"]

logger = logging.getLogger(__name__)

_JSON = "application/json"


@dataclass
class _Job:
    """One decoded, validated request of the batch."""

    idx: int
    photo: Photo
    options: Options
    frame: tuple[int, int]  # (height, width) of its heatmaps and overlays
    reply: V2Reply | None = None  # a KServe v2 request: frame the answer as a v2 reply
    source: ImageSource | None = None  # the opened image, for a second decode at another scale
    display: Photo | None = None  # the overlay's background where it needs more pixels than `photo`


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
        self.metrics: HandlerMetrics | None = None
        self.compiled: CompiledPass | None = None

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
            channels_last=config.channels_last == "on",
            batched_targets=config.batched_targets,
            layout=config.layout,
            prefix_tokens=config.prefix_tokens,
            grid=config.grid,
        )
        for key in ("channels_last", "compile", "compile_freeze"):
            if getattr(config, key) == "auto":
                logger.info("%s is 'auto' but was not resolved by scripts/archive.py: serving with it off", key)
        self.limits = CodecLimits(
            max_image_bytes=config.max_image_bytes,
            max_pixels=config.max_pixels,
            max_cams=config.max_cams,
        )
        self.label_index = LabelIndex(self.labels, config.num_classes)
        defaults = {k: getattr(config, k) for k in OPTION_NAMES}
        self.defaults = parse_defaults(defaults, self.label_index, config.num_classes, self.limits)
        # Letterbox padding is the mean colour: zero after normalisation.
        fill = tuple(int(v) for v in np.round(np.asarray(config.mean) * 255))
        self.layout = InputLayout(tuple(config.input_size), config.resize, config.interpolation, fill)
        self.decoder = ImageDecoder(config.decode_threads, _decode_route(config, self.device))
        self.encoder = _overlay_encoder(config, self.device)
        # Dry batch: a broken target layer or head fails the load, not the first request.
        warm = Image.new("RGB", tuple(reversed(config.input_size)), (128, 128, 128))
        self._run([self._job(0, Photo.of(warm), self.defaults)])
        self.compiled = self._compile(int(props.get("batch_size") or 1), warm) if config.compile == "on" else None
        metrics = getattr(context, "metrics", None)
        self.metrics = HandlerMetrics(metrics, self.model_name) if metrics is not None else None
        self.initialized = True
        logger.info(
            "loaded %s (%s) on %s, target layer %s (%s), input %s, %s",
            self.model_name, config.model, self.device, self.engine.target_layer,
            self.engine.layout.describe(), config.input_size, config.precision,
        )

    def _compile(self, batch_size: int, warm: Image.Image) -> CompiledPass | None:
        """Compile the model and every graph a batch of 1..batch_size needs, now, not on a request.

        Returns None (serving eager, after one warning) where compiling fails.
        """
        config = self.config
        started = time.perf_counter()
        try:
            compiled = CompiledPass(self.engine, batch_size, config.compile_batch, config.compile_backend,
                                    config.compile_mode, config.compile_cache_dir,
                                    config.compile_freeze == "on")
        except Exception as exc:  # compiling must never stop a load: serve eager
            logger.warning("torch.compile could not be set up (%s: %s); serving the eager model",
                           type(exc).__name__, exc)
            return None
        # Vmapped gradients have no batching rule through inductor's backward kernels: one
        # gradient pass per round of classes instead.
        batched_targets, self.engine.batched_targets = self.engine.batched_targets, False
        seconds = compiled.warm_up(lambda n: self._run([self._job(i, Photo.of(warm), self.defaults) for i in range(n)]))
        if not compiled.active:
            self.engine.batched_targets = batched_targets
            return None
        logger.info("compiled %s (%s, %s%s) for batch sizes %s in %.1f s (%s); kernel cache %s", config.model,
                    config.compile_backend, config.compile_mode or "default mode",
                    ", backbone frozen" if compiled.frozen else "", "/".join(map(str, compiled.sizes)),
                    time.perf_counter() - started, ", ".join(f"{n}: {s:.1f} s" for n, s in seconds.items()),
                    compiled.cache or "inductor's default")
        return compiled

    # ------------------------------------------------------------------ requests

    def handle(self, data: list[dict], context) -> list[str]:
        """Answer every request of the batch, each with its own status and JSON body."""
        started = time.perf_counter()
        data = group_tensors(data)  # service_envelope=kservev2 splits one request into its tensors
        responses: list[str | None] = [None] * len(data)
        jobs: list[_Job] = []
        pending: list[tuple[int, ImageSource, Options, V2Reply | None]] = []
        for idx, item in enumerate(data):
            reply = None
            try:
                raw = extract_request(item, _headers(context, idx))
                reply = raw.reply
                source = open_image(raw.image_bytes, self.limits)  # header and limits only
                options = parse_options(
                    raw.options, self.defaults, self.label_index, self.config.num_classes, self.limits
                )
                pending.append((idx, source, options, reply))
            except HandlerError as err:
                responses[idx] = self._fail(context, idx, err, len(data), reply or err.v2_reply)
        # Pixels last: the model's at the scale its input needs, whatever the outputs asked for
        # (the same photo gets the same answer); an overlay's background at its frame's scale,
        # decoded again where that is larger.
        photos = self.decoder.decode([p[1] for p in pending], [self._need(p[1]) for p in pending])
        for (idx, source, options, reply), photo in zip(pending, photos):
            if isinstance(photo, HandlerError):
                responses[idx] = self._fail(context, idx, photo, len(data), reply)
            else:
                jobs.append(self._job(idx, photo, options, reply))
                jobs[-1].source = source
        self._decode_displays(jobs)
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
                responses[job.idx] = self._answer(context, job.idx, body, len(data), job.reply)
            if self.compiled is not None:
                self.compiled.check(len(jobs))
        decode_ms = (decoded - started) * 1e3
        logger.debug("batch of %d: decode %.1f ms, pass %.1f ms, render %.1f ms",
                     len(data), decode_ms, timings["pass"], timings["render"])
        if self.metrics is not None:
            self.metrics.batch(len(data), decode_ms, timings["pass"], timings["render"], timings["maps"])
        return responses

    def _job(self, idx: int, photo: Photo, options: Options, reply: V2Reply | None = None) -> _Job:
        return _Job(idx, photo, options, _frame_size(*photo.size, self.config.max_side), reply)

    def _need(self, source: ImageSource) -> tuple[int, int]:
        """The ``(width, height)`` the model input needs decoded: the photo's place in it."""
        return cover_size(source.size, self.layout)

    def _decode_displays(self, jobs: list[_Job]) -> None:
        """The pictures overlays are drawn on, for the jobs whose frame needs more pixels than the
        model's decode has (a heatmap needs no photo pixels). Decoded as a batch; a failure
        falls back to the model's pixels."""
        wanted = []
        for job in jobs:
            if "overlay" not in job.options.outputs or job.source is None:
                continue
            frame = cover_size(job.source.size, self.layout, job.frame)
            box = job.photo.box
            if frame[0] > box[2] - box[0] + 0.5 or frame[1] > box[3] - box[1] + 0.5:
                wanted.append((job, frame))
        if not wanted:
            return
        displays = self.decoder.decode([job.source.reopened() for job, _ in wanted], [frame for _, frame in wanted])
        for (job, _), display in zip(wanted, displays):
            if isinstance(display, Photo):
                job.display = display

    def _answer(self, context, idx: int, body: dict | HandlerError, batch_size: int,
                reply: V2Reply | None = None) -> str:
        if isinstance(body, HandlerError):
            return self._fail(context, idx, body, batch_size, reply)
        body["batch_size"] = batch_size
        text = json.dumps(body, separators=(",", ":"))
        if len(text) > self.config.max_response_bytes:
            return self._fail(context, idx, ResponseTooLarge(
                f"response of {len(text)} bytes exceeds the {self.config.max_response_bytes}-byte "
                "limit; ask for fewer cam_classes or output forms", field="outputs"), batch_size, reply)
        context.set_response_content_type(idx, _JSON)
        return self._framed(context, idx, text, reply)

    def _fail(self, context, idx: int, err: HandlerError, batch_size: int, reply: V2Reply | None = None) -> str:
        logger.info("request %d of %d rejected: %s %s", idx, batch_size, err.status, err.message)
        if self.metrics is not None:
            self.metrics.rejected(err.kind)
        context.set_response_status(err.status, err.kind, idx)
        context.set_response_content_type(idx, _JSON)
        text = json.dumps({**error_body(err), "batch_size": batch_size})
        return self._framed(context, idx, text, reply, err.message)

    def _framed(self, context, idx: int, text: str, reply: V2Reply | None, error: str | None = None) -> str:
        """A v2 request's answer as a v2 reply: TorchServe's gRPC ModelInfer drops the worker on
        any other answer (GRPCJob.response reads ``id``, ``model_name``, ``outputs``)."""
        if reply is None or not reply.wrap:
            return text
        version = str(context.manifest["model"].get("modelVersion", ""))
        return v2_response(text, reply, self.model_name, version, context.get_request_id(idx), error)

    # ------------------------------------------------------------------ the batch

    def _run(self, jobs: list[_Job], timings: dict | None = None) -> list[dict]:
        """One forward and gradient pass for the jobs of a batch; their JSON bodies, in order.

        ``timings`` receives the pass and render times (ms) and the number of maps.
        """
        started = time.perf_counter()
        engine = self.engine
        pixels, boxes = model_batch([job.photo for job in jobs], self.layout, engine.device)
        x = engine.prepare(pixels)
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
                overlay = self._overlays(jobs, rows, drawn, blended, frames, heat)
                encoded = self._encode_overlays(overlay, [frames[drawn.index(p)] for p in blended])
                host_in.update(encoded or {"overlay": overlay})
        offsets = np.cumsum([0] + [len(t) for t in host_in.pop("overlay_jpegs", [])])
        host = {k: v.cpu().numpy() for k, v in to_host(host_in).items()}
        host["overlay_offsets"] = offsets
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
                    if "overlay" in wants[p] and "overlay_jpeg" in host:  # encoded on the device
                        start, stop = host["overlay_offsets"][at_blended[p] : at_blended[p] + 2]
                        cam["overlay"] = base64.b64encode(host["overlay_jpeg"][start:stop].tobytes()).decode("ascii")
                    elif "overlay" in wants[p]:
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
        slot: dict[int, int] = {}  # job -> row of `images`
        photos, photo_frames = [], []
        for p in blended:
            j = rows[p]
            if j not in slot:
                slot[j] = len(photos)
                photos.append(jobs[j].display or jobs[j].photo)
                photo_frames.append(frames[at_drawn[p]])
        images = display_batch(photos, photo_frames, tuple(heat.shape[1:]), self.device)
        pick = device_index([slot[rows[p]] for p in blended], self.device)
        heat_rows = device_index([at_drawn[p] for p in blended], self.device)
        return blend(heat[heat_rows], images[pick], self.engine.lut, self.config.overlay_alpha)

    def _encode_overlays(self, overlay: torch.Tensor, frames: list[tuple[int, int]]) -> dict | None:
        """Overlay JPEGs encoded on the device, as one byte tensor (only the bytes reach the
        host); None where the CPU encodes them."""
        if self.encoder is None:
            return None
        encoded = self.encoder.encode([overlay[i, :fh, :fw] for i, (fh, fw) in enumerate(frames)],
                                      self.config.overlay_quality)
        return {"overlay_jpeg": torch.cat(encoded), "overlay_jpegs": encoded} if encoded else None

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
            "image_size": list(job.photo.size),
            "input_size": list(reversed(self.config.input_size)),
            "resize": self.config.resize,
            "grid_size": [gw, gh],
            # The image covers this part of the grid, in grid cells (x0, y0, x1, y1).
            "grid_box": [round(box[0] * gw, 4), round(box[1] * gh, 4),
                         round(box[2] * gw, 4), round(box[3] * gh, 4)],
            "frame_size": [fw, fh],
        }


def _codec_on_device(key: str, choice: str, device: torch.device) -> bool:
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"handler config '{key}' is 'cuda' but this worker runs on {device}")
    return choice != "cpu" and device.type == "cuda"


def _device_codec(key: str, choice: str, make, what: str):
    """The device codec ``make()`` gives once its check passed; None (auto) or an error (cuda)
    where it cannot work."""
    try:
        codec = make()
        codec.check()
        return codec
    except (ImportError, RuntimeError) as exc:
        if choice == "cuda":
            raise ValueError(f"handler config '{key}' is 'cuda' but nvJPEG cannot {what} here: {exc}") from exc
        logger.warning("nvJPEG cannot %s here, the CPU does (%s: %s)", what, type(exc).__name__, exc)
        return None


def _decode_route(config: ServeConfig, device: torch.device) -> DeviceJpegRoute | None:
    """nvJPEG for the batch's baseline JPEGs, when the config and the worker allow it."""
    if not _codec_on_device("decode_device", config.decode_device, device):
        return None
    if config.decode_device == "auto" and config.interpolation == "lanczos":
        logger.info("decoding on the CPU: the device has no lanczos resize (decode_device: cuda resizes bicubic)")
        return None
    return _device_codec("decode_device", config.decode_device, lambda: DeviceJpegRoute(device), "decode")


def _overlay_encoder(config: ServeConfig, device: torch.device) -> DeviceJpegEncoder | None:
    """nvJPEG for overlay JPEGs, when the config and the worker allow it."""
    if not _codec_on_device("encode_device", config.encode_device, device):
        return None
    return _device_codec("encode_device", config.encode_device, lambda: DeviceJpegEncoder(device), "encode")


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
