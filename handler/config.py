"""The ``handler:`` section of an archive's ``model-config.yaml``, validated once at load.

The archiver writes it and the pipeline reads it, through the same dataclass, so a key the
pipeline does not know fails the build, not the first request. In the file the keys are flat
(``topk: 5``, ``compile: on``); in code they are grouped by concern: ``config.model.source``,
``config.target.layer``, ``config.input.size``, ``config.speed.compile``, ``config.defaults.topk``,
``config.limits.max_pixels``, ``config.render.max_side``, ``config.host.decode_threads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from handler.vocab import (
    CODEC_DEVICES,
    COMPILE_BATCH_MODES,
    COMPILE_STARTS,
    INTERPOLATIONS,
    LAYOUTS,
    PRECISIONS,
    RESIZE_MODES,
    SWITCHES,
)

__all__ = ["ServeConfig", "ModelSection", "TargetSection", "InputSection", "SpeedSection", "DefaultsSection",
           "LimitsSection", "RenderSection", "HostSection", "QualitySection"]


def _fail(key: str, wanted: str, value: object) -> None:
    raise ValueError(f"handler config '{key}' must be {wanted}, got {value!r}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _posint(key: str, value: object) -> None:
    if not (_int(value) and value > 0):
        _fail(key, "a positive integer", value)


def _choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, f"one of {', '.join(choices)}", value)


@dataclass
class ModelSection:
    """What to build.

    Attributes:
        source: ``timm:NAME``, ``torchvision:NAME`` or ``model_src/FILE.py:ClassName`` (key ``model``).
        num_classes: classifier outputs.
        model_kwargs: extra constructor arguments.
        labels: labels file inside the archive, or empty for none.
    """

    source: str = "timm:tf_efficientnet_lite0"
    num_classes: int = 1000
    model_kwargs: dict = field(default_factory=dict)
    labels: str = "index_to_name.json"

    def validate(self) -> None:
        _posint("num_classes", self.num_classes)
        if not (isinstance(self.source, str) and self.source):
            _fail("model", "a model source", self.source)
        if not isinstance(self.model_kwargs, dict):
            _fail("model_kwargs", "a mapping", self.model_kwargs)
        if not isinstance(self.labels, str):
            _fail("labels", "a file name or ''", self.labels)


@dataclass
class TargetSection:
    """Where the maps come from.

    Attributes:
        target_layer: dotted module name (the archiver resolves ``auto``).
        layout: the layer output's layout: ``nchw``, ``nhwc``, ``nlc`` (tokens) or ``auto``
            (detected at load; the archiver writes the one it found).
        prefix_tokens: ``nlc``: tokens before the patch tokens, or None to detect.
        grid: ``[h, w]`` of the map, or None to detect.
    """

    target_layer: str = "auto"
    layout: str = "auto"
    prefix_tokens: int | None = None
    grid: list[int] | None = None

    def validate(self) -> None:
        if not (isinstance(self.target_layer, str) and self.target_layer):
            _fail("target_layer", "a module name or 'auto'", self.target_layer)
        _choice("layout", self.layout, LAYOUTS)
        if not (self.prefix_tokens is None or (_int(self.prefix_tokens) and self.prefix_tokens >= 0)):
            _fail("prefix_tokens", "null or an integer >= 0", self.prefix_tokens)
        if self.prefix_tokens and self.layout not in ("auto", "nlc"):
            _fail("prefix_tokens", "null or 0 unless layout is nlc or auto", self.prefix_tokens)
        grid = self.grid
        if not (grid is None or (isinstance(grid, (list, tuple)) and len(grid) == 2
                                 and all(_int(v) and v > 0 for v in grid))):
            _fail("grid", "null or [h, w]", grid)
        self.grid = None if grid is None else [int(v) for v in grid]


@dataclass
class InputSection:
    """What the model sees.

    Attributes:
        input_size: ``[height, width]``.
        resize: ``squash`` (the whole image stretched) or ``letterbox`` (aspect kept, padded with
            the mean colour); nothing is ever cropped away.
        interpolation: resampling used to resize the image for the model.
        mean: per-channel mean, [0, 1] units.
        std: per-channel std, [0, 1] units.
    """

    input_size: list[int] = field(default_factory=lambda: [224, 224])
    resize: str = "squash"
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def validate(self) -> None:
        size = self.input_size
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_int(v) and v > 0 for v in size)):
            _fail("input_size", "[height, width]", size)
        self.input_size = [int(v) for v in size]
        _choice("resize", self.resize, RESIZE_MODES)
        _choice("interpolation", self.interpolation, INTERPOLATIONS)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not (isinstance(value, (list, tuple)) and len(value) == 3
                    and all(isinstance(v, (int, float)) for v in value)):
                _fail(key, "three numbers", value)
            setattr(self, key, [float(v) for v in value])
        if not all(v > 0 for v in self.std):
            _fail("std", "positive", self.std)


@dataclass
class SpeedSection:
    """How fast the pass runs.

    Attributes:
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast on accelerators.
        channels_last: channels-last memory format: ``on``, ``off``, or ``auto`` (the archiver
            times both and writes down the faster; an unresolved ``auto`` serves ``off``).
        compile: ``torch.compile`` the model: ``on``, ``off``, or ``auto`` (resolved by the
            archiver). A worker that cannot compile serves eager.
        compile_backend: ``torch.compile`` backend.
        compile_mode: ``torch.compile`` mode (empty for the default).
        compile_batch: ``buckets`` (pad batches to powers of two) or ``dynamic``.
        compile_cache_dir: inductor's cache folder (empty: ``~/.cache/gradcam-serve/inductor``).
        compile_freeze: inductor: freeze the backbone below the target layer: ``on``, ``off``,
            or ``auto`` (resolved by the archiver: kept where it is 5% faster).
        compile_start: ``background`` (the eager model serves from the first second while the
            compiled one is built and warmed in a thread; batches switch to it once every batch
            size is compiled) or ``load`` (the worker is ready only once compiled).
        tuning: what the archiver measured when it resolved ``auto`` (informational).
        batched_targets: vmapped gradient pass for several classes per image.
    """

    precision: str = "fp32"
    channels_last: str = "off"
    compile: str = "off"
    compile_backend: str = "inductor"
    compile_mode: str = ""
    compile_batch: str = "buckets"
    compile_cache_dir: str = ""
    compile_freeze: str = "off"
    compile_start: str = "background"
    tuning: dict = field(default_factory=dict)
    batched_targets: bool = True

    def validate(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        for key in ("channels_last", "compile", "compile_freeze"):  # once booleans
            value = getattr(self, key)
            if isinstance(value, bool):
                setattr(self, key, "on" if value else "off")
            _choice(key, getattr(self, key), SWITCHES)
        _choice("compile_batch", self.compile_batch, COMPILE_BATCH_MODES)
        _choice("compile_start", self.compile_start, COMPILE_STARTS)
        for key in ("compile_backend", "compile_mode", "compile_cache_dir"):
            if not isinstance(getattr(self, key), str):
                _fail(key, "a string", getattr(self, key))
        if not self.compile_backend:
            _fail("compile_backend", "a torch.compile backend name", self.compile_backend)
        if not isinstance(self.tuning, dict):
            _fail("tuning", "a mapping", self.tuning)
        if not isinstance(self.batched_targets, bool):
            _fail("batched_targets", "true or false", self.batched_targets)


@dataclass
class DefaultsSection:
    """Per-request options when a request does not set them (checked by :mod:`handler.options`).

    Attributes:
        topk: predictions per image.
        cam_classes: CAM targets: ``top1``, ``topN``, ``none`` or a class list.
        cam_method: CAM method.
        outputs: comma list of ``map``, ``heatmap``, ``overlay``.
        quality: score each map's faithfulness (:mod:`handler.quality`).
    """

    topk: int = 5
    cam_classes: str = "top1"
    cam_method: str = "gradcam"
    outputs: str = "map"
    quality: bool = False

    def validate(self) -> None:
        _posint("topk", self.topk)
        if not isinstance(self.quality, bool):
            _fail("quality", "true or false", self.quality)


@dataclass
class LimitsSection:
    """Bounds on one request and its answer.

    Attributes:
        max_cams: most CAM classes a request may ask for.
        max_image_bytes: largest encoded image accepted.
        max_pixels: largest decoded image accepted (width x height).
        max_response_bytes: largest response body; keep under the server's max_response_size.
    """

    max_cams: int = 5
    max_image_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_response_bytes: int = 16 * 1024 * 1024

    def validate(self) -> None:
        for f in fields(self):
            _posint(f.name, getattr(self, f.name))


@dataclass
class RenderSection:
    """Heatmaps and overlays.

    Attributes:
        max_side: long side cap, in pixels, of heatmaps and overlays.
        overlay_alpha: weight of the colour map in the overlay.
        overlay_quality: JPEG quality of overlays.
    """

    max_side: int = 512
    overlay_alpha: float = 0.5
    overlay_quality: int = 85

    def validate(self) -> None:
        _posint("max_side", self.max_side)
        _posint("overlay_quality", self.overlay_quality)
        if self.overlay_quality > 100:
            _fail("overlay_quality", "1..100", self.overlay_quality)
        if not (isinstance(self.overlay_alpha, (int, float)) and 0 <= self.overlay_alpha <= 1):
            _fail("overlay_alpha", "a number in [0, 1]", self.overlay_alpha)


@dataclass
class HostSection:
    """The worker process: memory, decode threads, codec devices.

    Attributes:
        malloc_mmap_threshold_mib: glibc malloc serves host blocks up to this size from its heap
            instead of fresh zeroed pages (0: glibc's default).
        malloc_trim_threshold_mib: glibc keeps up to this much freed heap memory (0: glibc's
            default). With both, a worker reuses the memory of the last batch: on the CPU a batch
            runs about twice as fast, for the price of keeping its peak working set resident.
        decode_threads: threads that decode a batch's images in parallel (0 or 1: one at a time).
        decode_device: where baseline JPEGs are decoded: ``auto`` (nvJPEG on CUDA workers where
            torchvision has it), ``cpu``, or ``cuda`` (the worker fails to load without it).
        encode_device: where overlay JPEGs are encoded, with the same choices.
    """

    malloc_mmap_threshold_mib: int = 256
    malloc_trim_threshold_mib: int = 1024
    decode_threads: int = 2
    decode_device: str = "auto"
    encode_device: str = "auto"

    def validate(self) -> None:
        for key in ("malloc_mmap_threshold_mib", "malloc_trim_threshold_mib"):
            value = getattr(self, key)
            if not (_int(value) and 0 <= value <= 2047):
                _fail(key, "0 (glibc's default) or a size in MiB up to 2047 (mallopt takes an int)", value)
        if not (_int(self.decode_threads) and 0 <= self.decode_threads <= 64):
            _fail("decode_threads", "an integer in 0..64", self.decode_threads)
        for key in ("decode_device", "encode_device"):
            _choice(key, getattr(self, key), CODEC_DEVICES)


@dataclass
class QualitySection:
    """The faithfulness score of maps (requests with ``quality``; :mod:`handler.quality`).

    Attributes:
        quality_fraction: the share of the image a map's top region covers, in (0, 1).
        quality_max_batch: most images (two per map: region kept, region removed) in one call of
            the model; more are scored in chunks of this size.
    """

    quality_fraction: float = 0.4
    quality_max_batch: int = 64

    def validate(self) -> None:
        value = self.quality_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            _fail("quality_fraction", "a number between 0 and 1 (exclusive)", value)
        self.quality_fraction = float(value)
        _posint("quality_max_batch", self.quality_max_batch)


_SECTIONS = {"model": ModelSection, "target": TargetSection, "input": InputSection, "speed": SpeedSection,
             "defaults": DefaultsSection, "limits": LimitsSection, "render": RenderSection, "host": HostSection,
             "quality": QualitySection}
_RENAMED = {"model": "source"}  # file key -> field name where they differ


def _key(name: str) -> str:
    return next((k for k, v in _RENAMED.items() if v == name), name)


#: Each file key's section: ``{"topk": "defaults", "model": "model", ...}``.
KEYS = {_key(f.name): section for section, kind in _SECTIONS.items() for f in fields(kind)}


@dataclass
class ServeConfig:
    """Everything the pipeline needs besides the weights file, grouped by concern."""

    model: ModelSection = field(default_factory=ModelSection)
    target: TargetSection = field(default_factory=TargetSection)
    input: InputSection = field(default_factory=InputSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    defaults: DefaultsSection = field(default_factory=DefaultsSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    render: RenderSection = field(default_factory=RenderSection)
    host: HostSection = field(default_factory=HostSection)
    quality: QualitySection = field(default_factory=QualitySection)

    @classmethod
    def from_dict(cls, data: dict | None) -> ServeConfig:
        """Validate a flat ``handler:`` mapping; unknown keys and bad values raise ValueError."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown handler config keys: {', '.join(unknown)}; known: {', '.join(KEYS)}")
        grouped: dict[str, dict] = {section: {} for section in _SECTIONS}
        for key, value in data.items():
            grouped[KEYS[key]][_RENAMED.get(key, key)] = value
        config = cls(**{section: _SECTIONS[section](**values) for section, values in grouped.items()})
        config.validate()
        return config

    def to_dict(self) -> dict:
        """The flat mapping ``model-config.yaml`` holds."""
        out = {}
        for section in _SECTIONS:
            group = getattr(self, section)
            for f in fields(group):
                value = getattr(group, f.name)
                out[_key(f.name)] = dict(value) if isinstance(value, dict) else \
                    list(value) if isinstance(value, (list, tuple)) else value
        return out

    def validate(self) -> None:
        """Check every value; the message names the file key.

        Raises:
            ValueError: on the first bad value.
        """
        for section in _SECTIONS:
            getattr(self, section).validate()
