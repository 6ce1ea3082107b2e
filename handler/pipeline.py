"""The server-agnostic pipeline: a batch of parsed requests in, one answer or named error each out.

Built once from an archive's contents (the weights and the ``handler:`` section of its
``model-config.yaml``), it validates each request's options, reads each image's header within the
limits, decodes the batch's pixels at the scale they are needed, runs one forward and gradient
pass for every good request together (:mod:`handler.cam`), renders the forms each one asked for
and answers with its JSON text, or its own 4xx error; the others of its batch keep their 200.

Both servers call it the same way: the TorchServe handler (:mod:`handler.service`) and the KServe
predictor (:mod:`handler.kserve_model`). Nothing here imports ``ts`` or ``kserve``.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from handler.answers import AnswerWriter, Job, frame_size
from handler.attention_cam import attention_explainer, attention_refusal, batch_pass
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
from handler.compiled import CompiledPass, cache_dir, prime_tracing
from handler.config import ServeConfig
from handler.errors import DeviceOutOfMemory, HandlerError, InvalidOption, ModelFailure, ResponseTooLarge, error_body
from handler.host import tune_malloc
from handler.image_tensors import DeviceJpegRoute, display_batch, model_batch
from handler.images import ImageDecoder, InputLayout, Photo, cover_size, open_image
from handler.kernels import install as install_kernels
from handler.limits import RequestLimits
from handler.models import build_model, load_state_dict_strict, read_labels
from handler.options import LabelIndex, parse_defaults, parse_options
from handler.quality import QualityScorer
from handler.render import DeviceJpegEncoder
from handler.requests import RawRequest
from handler.vocab import ATTENTION_METHODS, OPTION_NAMES

__all__ = ["Answer", "Archive", "BatchStats", "MetricsSink", "Pipeline", "unpack_archive"]

logger = logging.getLogger(__name__)


@dataclass
class Archive:
    """What a pipeline is built from: an unpacked ``.mar``'s folder and its two config files.

    Attributes:
        model_dir: the folder holding the weights, ``model_src/`` and the labels file.
        model_name: the name the model is served under.
        weights: the weights file's name inside ``model_dir``.
        version: the archive's model version.
        handler: the ``handler:`` section of ``model-config.yaml``.
        batch_size: most requests in one pass (``batchSize``).
        max_batch_delay_ms: how long a batch waits to fill (``maxBatchDelay``).
    """

    model_dir: Path
    model_name: str
    weights: str = "model.safetensors"
    version: str = ""
    handler: dict = field(default_factory=dict)
    batch_size: int = 1
    max_batch_delay_ms: int = 100

    @classmethod
    def from_dir(cls, folder: str | Path, model_name: str | None = None) -> Archive:
        """Read an unpacked archive: ``MAR-INF/MANIFEST.json`` and its ``model-config.yaml``.

        Raises:
            FileNotFoundError: the folder is not an unpacked ``.mar``.
        """
        import yaml

        folder = Path(folder)
        manifest_path = folder / "MAR-INF" / "MANIFEST.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{folder} is not an unpacked model archive: no MAR-INF/MANIFEST.json")
        model = json.loads(manifest_path.read_text())["model"]
        config_file = model.get("configFile") or "model-config.yaml"
        config_path = folder / config_file
        yaml_config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
        return cls(
            model_dir=folder,
            model_name=model_name or model["modelName"],
            weights=model.get("serializedFile") or "model.safetensors",
            version=str(model.get("modelVersion", "")),
            handler=dict(yaml_config.get("handler") or {}),
            batch_size=int(yaml_config.get("batchSize") or 1),
            max_batch_delay_ms=int(yaml_config.get("maxBatchDelay") or 100),
        )


def unpack_archive(path: str | Path, into: str | Path) -> Path:
    """A ``.mar`` unpacked into a fresh folder under ``into`` (a folder is returned as it is).

    Raises:
        FileNotFoundError: no such file or folder.
        zipfile.BadZipFile: the file is not a model archive.
    """
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"no model archive at {path}")
    target = Path(into) / f"{path.stem}-{path.stat().st_mtime_ns}"
    if not (target / "MAR-INF" / "MANIFEST.json").is_file():
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(path) as archive:
            archive.extractall(partial)
        partial.rename(target)
    return target


@dataclass
class Answer:
    """One request's answer: its HTTP status and JSON text (the body, or the error)."""

    status: int
    text: str
    error: HandlerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BatchStats:
    """What one batch cost: its size, stage times (ms) and number of maps."""

    size: int
    decode_ms: float = 0.0
    pass_ms: float = 0.0
    render_ms: float = 0.0
    maps: int = 0
    drops: list[tuple[str, float]] = field(default_factory=list)  # (method, kept-region drop) per scored map


class MetricsSink(Protocol):
    """Where a server's adapter sends the pipeline's metrics."""

    def batch(self, size: int, decode_ms: float, pass_ms: float, render_ms: float, maps: int) -> None: ...

    def rejected(self, reason: str) -> None: ...

    def quality(self, method: str, drop: float) -> None: ...


class Pipeline:
    """Predictions and Grad-CAM maps for batches of requests, on one device.

    Building it loads the model, resolves the target layer, runs a dry batch (a broken layer or
    head fails here, not on the first request) and compiles every batch size when the archive
    asks for it: a built pipeline is warm.

    Args:
        archive: the unpacked archive.
        device: where the model runs.
        metrics: optional sink for per-batch and per-rejection metrics.
    """

    def __init__(self, archive: Archive, device: torch.device | str = "cpu",
                 metrics: MetricsSink | None = None) -> None:
        self.archive = archive
        self.model_name = archive.model_name
        self.device = device = torch.device(device)
        self.config = config = ServeConfig.from_dict(archive.handler)
        self.metrics = metrics
        # Once per worker process, before the first large allocation.
        tune_malloc(config.host.malloc_mmap_threshold_mib, config.host.malloc_trim_threshold_mib)

        model = build_model(config.model.source, config.model.num_classes, config.model.model_kwargs, archive.model_dir)
        load_state_dict_strict(model, _load_weights(archive.model_dir / archive.weights))
        labels = read_labels(archive.model_dir / config.model.labels) if config.model.labels else None
        if labels is not None and len(labels) != config.model.num_classes:
            raise ValueError(f"{config.model.labels} has {len(labels)} names for {config.model.num_classes} classes")
        self._engine_args = dict(
            device=device,
            mean=config.input.mean,
            std=config.input.std,
            input_size=tuple(config.input.input_size),
            precision=config.speed.precision if device.type == "cuda" else "fp32",
            channels_last=config.speed.channels_last == "on",
            batched_targets=config.speed.batched_targets,
            layout=config.target.layout,
            prefix_tokens=config.target.prefix_tokens,
            grid=config.target.grid,
        )
        self.engine = CamEngine(model, config.target.target_layer, **self._engine_args)
        # Attention methods (chefer): their modules found once, or why this model has none.
        self.attention, self.attention_refusal = attention_explainer(self.engine)
        for key in ("channels_last", "compile", "compile_freeze"):
            if getattr(config.speed, key) == "auto":
                logger.info("%s is 'auto' but was not resolved by the archiver: serving with it off", key)
        self.limits = RequestLimits(config.limits.max_image_bytes, config.limits.max_pixels, config.limits.max_cams)
        self.label_index = LabelIndex(labels, config.model.num_classes)
        self.defaults = parse_defaults({k: getattr(config.defaults, k) for k in OPTION_NAMES}, self.label_index,
                                       config.model.num_classes, self.limits)
        refusal = self._refusal(self.defaults.cam_method)
        if refusal:
            raise ValueError(f"handler config key 'cam_method': {refusal}")
        # Letterbox padding is the mean colour: zero after normalisation.
        fill = tuple(int(v) for v in np.round(np.asarray(config.input.mean) * 255))
        self.layout = InputLayout(tuple(config.input.input_size), config.input.resize, config.input.interpolation, fill)
        self.decoder = ImageDecoder(config.host.decode_threads, _decode_route(config, device))
        self.encoder = _overlay_encoder(config, device)
        self.writer = AnswerWriter(archive.model_name, labels, self.engine, config)
        self.scorer = QualityScorer(config.input.input_size, config.input.std, config.quality.quality_fraction,
                                    config.quality.quality_max_batch, device)
        warm = Image.new("RGB", tuple(reversed(config.input.input_size)), (128, 128, 128))
        self._run([self._job(0, Photo.of(warm), self.defaults)])
        # A batch runs on one engine; the switch to the compiled one happens between batches.
        self._switch = threading.Lock()
        self.compiled: CompiledPass | None = None
        self._kernels_checked = False
        self.compiling: threading.Thread | None = None
        if config.speed.compile == "on":
            batch = max(1, archive.batch_size)
            # CUDA graphs are recorded per thread (cudagraph trees): graphs recorded by a compile
            # thread would be recorded again by the serving one, so that mode compiles at load.
            graphs = device.type == "cuda" and "reduce-overhead" in config.speed.compile_mode
            if graphs and config.speed.compile_start == "background":
                logger.info("compile_mode reduce-overhead on %s: compiling at load, not in the background", device)
            if config.speed.compile_start == "load" or graphs:
                self.compiled = self._compile(self.engine, batch, warm)
            else:
                if config.speed.compile_backend == "inductor":
                    prime_tracing()  # its process-wide fx trace must not meet a served eager forward
                self.compiling = threading.Thread(target=self._compile_in_background, args=(batch, warm),
                                                  name="gradcam-compile", daemon=True)
                self.compiling.start()
        logger.info(
            "loaded %s (%s) on %s, target layer %s (%s), input %s, %s",
            self.model_name, config.model.source, device, self.engine.target_layer,
            self.engine.layout.describe(), config.input.input_size, config.speed.precision,
        )

    # ------------------------------------------------------------------ load

    def _compile_in_background(self, batch_size: int, warm: Image.Image) -> None:
        """Compile a copy of the model in this thread while the eager one serves; then switch."""
        started = time.perf_counter()
        try:
            engine = CamEngine(copy.deepcopy(self.engine.model), self.engine.target_layer, **self._engine_args)
            compiled = self._compile(engine, batch_size, warm)
        except Exception:  # the eager model keeps serving
            logger.exception("compiling in the background failed; serving the eager model")
            return
        if compiled is None:
            return
        with self._switch:
            self.engine, self.compiled = engine, compiled
            self.writer.engine = engine
        logger.info("switched to the compiled model %.1f s after load; the eager model served until then",
                    time.perf_counter() - started)

    def _compile(self, engine: CamEngine, batch_size: int, warm: Image.Image) -> CompiledPass | None:
        """Compile ``engine``'s model and every graph a batch of 1..batch_size needs, now, not on a
        request.

        Returns None (serving eager, after one warning) where compiling fails.
        """
        config = self.config
        started = time.perf_counter()
        if not self._kernels_checked:  # shipped in the archive (gradcam-archive --ship-kernels)
            self._kernels_checked = True
            install_kernels(self.archive.model_dir, cache_dir(config.speed.compile_cache_dir), self.device.type)
        try:
            compiled = CompiledPass(engine, batch_size, config.speed.compile_batch, config.speed.compile_backend,
                                    config.speed.compile_mode, config.speed.compile_cache_dir,
                                    config.speed.compile_freeze == "on")
        except Exception as exc:  # compiling must never stop a load: serve eager
            logger.warning("torch.compile could not be set up (%s: %s); serving the eager model",
                           type(exc).__name__, exc)
            return None
        # Vmapped gradients have no batching rule through inductor's backward kernels: one
        # gradient pass per round of classes instead.
        batched_targets, engine.batched_targets = engine.batched_targets, False
        seconds = compiled.warm_up(
            lambda n: self._run([self._job(i, Photo.of(warm), self.defaults) for i in range(n)], engine=engine))
        if not compiled.active:
            engine.batched_targets = batched_targets
            return None
        logger.info("compiled %s (%s, %s%s) for batch sizes %s in %.1f s (%s); kernel cache %s", config.model.source,
                    config.speed.compile_backend, config.speed.compile_mode or "default mode",
                    ", backbone frozen" if compiled.frozen else "", "/".join(map(str, compiled.sizes)),
                    time.perf_counter() - started, ", ".join(f"{n}: {s:.1f} s" for n, s in seconds.items()),
                    compiled.cache or "inductor's default")
        return compiled

    # ------------------------------------------------------------------ requests

    def run(self, requests: list[RawRequest | HandlerError]) -> list[Answer]:
        """Answer every request of a batch, in order, each with its own status.

        Args:
            requests: each request as the protocol edge parsed it, or the error its parsing met.

        Returns:
            One :class:`Answer` per request. Nothing is raised for a bad request or a failed pass.
        """
        started = time.perf_counter()
        size = len(requests)
        answers: list[Answer | None] = [None] * size
        pending = []
        for idx, request in enumerate(requests):
            try:
                if isinstance(request, HandlerError):
                    raise request
                source = open_image(request.image_bytes, self.limits)  # header and limits only
                options = parse_options(request.options, self.defaults, self.label_index,
                                        self.config.model.num_classes, self.limits)
                refusal = self._refusal(options.cam_method)
                if refusal:
                    raise InvalidOption(f"cam_method {options.cam_method!r} does not apply to this model: "
                                        f"{refusal}", "cam_method")
                pending.append((idx, source, options))
            except HandlerError as err:
                answers[idx] = self._fail(idx, err, size)
        # Pixels last: the model's at the scale its input needs, whatever the outputs asked for
        # (the same photo gets the same answer); an overlay's background at its frame's scale,
        # decoded again where that is larger.
        photos = self.decoder.decode([p[1] for p in pending], [cover_size(p[1].size, self.layout) for p in pending])
        jobs: list[Job] = []
        for (idx, source, options), photo in zip(pending, photos):
            if isinstance(photo, HandlerError):
                answers[idx] = self._fail(idx, photo, size)
            else:
                jobs.append(self._job(idx, photo, options))
                jobs[-1].source = source
        self._decode_displays(jobs)
        stats = BatchStats(size, decode_ms=(time.perf_counter() - started) * 1e3)
        if jobs:
            with self._switch:
                bodies = self._guarded_run(jobs, stats)
                if self.compiled is not None:
                    self.compiled.check(len(jobs))
            for job, body in zip(jobs, bodies):
                answers[job.idx] = self._answer(job.idx, body, size)
        logger.debug("batch of %d: decode %.1f ms, pass %.1f ms, render %.1f ms",
                     size, stats.decode_ms, stats.pass_ms, stats.render_ms)
        if self.metrics is not None:
            self.metrics.batch(size, stats.decode_ms, stats.pass_ms, stats.render_ms, stats.maps)
            for method, drop in stats.drops:
                self.metrics.quality(method, drop)
        return answers

    def _guarded_run(self, jobs: list[Job], stats: BatchStats) -> list[dict | HandlerError]:
        """The jobs' bodies, or one error for all of them where the pass failed: the batch fails,
        the worker does not."""
        try:
            return self._run(jobs, stats)
        except HandlerError as err:
            return [err] * len(jobs)
        except torch.OutOfMemoryError:
            logger.exception("device out of memory on a batch of %d", len(jobs))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return [DeviceOutOfMemory("device out of memory; retry with a smaller request")] * len(jobs)
        except Exception as exc:
            logger.exception("Grad-CAM pass failed on a batch of %d", len(jobs))
            return [ModelFailure(f"inference failed: {type(exc).__name__}: {exc}")] * len(jobs)

    def _job(self, idx: int, photo: Photo, options) -> Job:
        return Job(idx, photo, options, frame_size(*photo.size, self.config.render.max_side))

    def _decode_displays(self, jobs: list[Job]) -> None:
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

    def _answer(self, idx: int, body: dict | HandlerError, batch_size: int) -> Answer:
        if isinstance(body, HandlerError):
            return self._fail(idx, body, batch_size)
        body["batch_size"] = batch_size
        text = json.dumps(body, separators=(",", ":"))
        if len(text) > self.config.limits.max_response_bytes:
            return self._fail(idx, ResponseTooLarge(
                f"response of {len(text)} bytes exceeds the {self.config.limits.max_response_bytes}-byte "
                "limit; ask for fewer cam_classes or output forms", field="outputs"), batch_size)
        return Answer(200, text)

    def _refusal(self, method: str) -> str:
        """Why this model cannot serve ``method`` ("" when it can)."""
        if method not in ATTENTION_METHODS:
            return ""
        return attention_refusal(self.attention, self.attention_refusal, method)

    def reject(self, err: HandlerError) -> Answer:
        """The answer to a request refused before it reached a batch (logged and counted)."""
        return self._fail(0, err, 1)

    def _fail(self, idx: int, err: HandlerError, batch_size: int) -> Answer:
        logger.info("request %d of %d rejected: %s %s", idx, batch_size, err.status, err.message)
        if self.metrics is not None:
            self.metrics.rejected(err.kind)
        return Answer(err.status, json.dumps({**error_body(err), "batch_size": batch_size}), err)

    # ------------------------------------------------------------------ the batch

    def _run(self, jobs: list[Job], stats: BatchStats | None = None, engine: CamEngine | None = None) -> list[dict]:
        """One forward and gradient pass for the jobs of a batch (on ``engine``, by default the
        serving one); their JSON bodies, in order."""
        started = time.perf_counter()
        engine = engine or self.engine
        pixels, boxes = model_batch([job.photo for job in jobs], self.layout, engine.device)
        x = engine.prepare(pixels)
        # Requests asking for an attention method run in a pass of their own (handler.attention_cam).
        cam_pass = batch_pass(engine, self.attention, x, [j.options.cam_method for j in jobs])
        probs = cam_pass.logits.detach().float().softmax(dim=1)
        k = max(max(j.options.topk for j in jobs), max(j.options.cam_classes.count for j in jobs))
        top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)

        rows, classes_t, methods = _targets(jobs, top_i)
        maps = normalize_maps(cam_pass.cams(rows, classes_t, methods))

        # Heatmaps and overlays only for the targets whose request asks for them.
        wants = [set(jobs[r].options.outputs) for r in rows]
        drawn = [p for p, w in enumerate(wants) if w & {"heatmap", "overlay"}]
        blended = [p for p in drawn if "overlay" in wants[p]]
        host_in = {"top_p": top_p, "top_i": top_i, "classes": classes_t, "maps": maps}
        # The faithfulness score: one more forward, without gradients, for every scored map.
        scored = [p for p, r in enumerate(rows) if jobs[r].options.quality]
        if scored:
            pick = device_index(scored, engine.device)
            host_in["quality"] = self.scorer.score(engine, x, probs, [rows[p] for p in scored], classes_t[pick],
                                                   maps[pick], boxes)
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
        bodies = self.writer.bodies(jobs, boxes, rows, methods, wants, frames, drawn, blended, host, maps.shape[1:],
                                    scored)
        if stats is not None:
            stats.maps = len(rows)
            stats.drops = [(methods[p], float(host["quality"][i, 2])) for i, p in enumerate(scored)]
            stats.pass_ms = (passed - started) * 1e3
            stats.render_ms = (time.perf_counter() - passed) * 1e3
        return bodies

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
        return blend(heat[heat_rows], images[pick], self.engine.lut, self.config.render.overlay_alpha)

    def _encode_overlays(self, overlay: torch.Tensor, frames: list[tuple[int, int]]) -> dict | None:
        """Overlay JPEGs encoded on the device, as one byte tensor (only the bytes reach the
        host); None where the CPU encodes them."""
        if self.encoder is None:
            return None
        encoded = self.encoder.encode([overlay[i, :fh, :fw] for i, (fh, fw) in enumerate(frames)],
                                      self.config.render.overlay_quality)
        return {"overlay_jpeg": torch.cat(encoded), "overlay_jpegs": encoded} if encoded else None


def _targets(jobs: list[Job], top_i: torch.Tensor) -> tuple[list[int], torch.Tensor, list[str]]:
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
    if not _codec_on_device("decode_device", config.host.decode_device, device):
        return None
    if config.host.decode_device == "auto" and config.input.interpolation == "lanczos":
        logger.info("decoding on the CPU: the device has no lanczos resize (decode_device: cuda resizes bicubic)")
        return None
    return _device_codec("decode_device", config.host.decode_device, lambda: DeviceJpegRoute(device), "decode")


def _overlay_encoder(config: ServeConfig, device: torch.device) -> DeviceJpegEncoder | None:
    """nvJPEG for overlay JPEGs, when the config and the worker allow it."""
    if not _codec_on_device("encode_device", config.host.encode_device, device):
        return None
    return _device_codec("encode_device", config.host.encode_device, lambda: DeviceJpegEncoder(device), "encode")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Archived weights are safetensors: loading them runs no pickled code."""
    from safetensors.torch import load_file

    return load_file(str(path))
