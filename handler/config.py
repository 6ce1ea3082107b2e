"""The ``handler:`` section of an archive's ``model-config.yaml``, validated once at load.

The archiver writes it and the handler reads it, through the same dataclass, so a key the
handler does not know fails the build, not the first request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from handler.vocab import (
    CODEC_DEVICES,
    COMPILE_BATCH_MODES,
    INTERPOLATIONS,
    LAYOUTS,
    PRECISIONS,
    RESIZE_MODES,
    SWITCHES,
)

__all__ = ["ServeConfig", "RESIZE_MODES", "PRECISIONS", "INTERPOLATIONS", "SWITCHES", "COMPILE_BATCH_MODES",
           "CODEC_DEVICES", "LAYOUTS"]


@dataclass
class ServeConfig:
    """Everything the handler needs besides the weights file.

    Attributes:
        model: ``timm:NAME``, ``torchvision:NAME`` or ``model_src/FILE.py:ClassName``.
        num_classes: classifier outputs.
        model_kwargs: extra constructor arguments.
        labels: labels file inside the archive, or empty for none.
        target_layer: dotted module name (the archiver resolves ``auto``).
        layout: the target layer's output layout: ``nchw``, ``nhwc``, ``nlc`` (tokens) or
            ``auto`` (detected when the handler loads; the archiver writes the one it found).
        prefix_tokens: ``nlc``: tokens before the patch tokens (class, distillation,
            register tokens), or None to detect.
        grid: ``[h, w]`` of the map, or None to detect.
        input_size: ``[height, width]`` the model sees.
        resize: ``squash`` (the whole image stretched to the input) or ``letterbox``
            (aspect kept, padded with the mean colour); nothing is ever cropped away.
        interpolation: resampling used to resize the image for the model.
        mean: per-channel mean, [0, 1] units.
        std: per-channel std, [0, 1] units.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast on accelerators.
        channels_last: channels-last memory format: ``on``, ``off``, or ``auto`` (the archiver
            times both and writes down the faster; an unresolved ``auto`` serves ``off``).
        compile: ``torch.compile`` the model: ``on``, ``off``, or ``auto`` (resolved by the
            archiver like ``channels_last``). A worker that cannot compile serves eager.
        compile_backend: ``torch.compile`` backend.
        compile_mode: ``torch.compile`` mode (empty for the default; ``reduce-overhead`` or
            ``max-autotune`` on GPUs).
        compile_batch: ``buckets`` (pad batches to powers of two) or ``dynamic`` (the batch
            dimension marked dynamic): the graphs every batch size needs, compiled at load.
        compile_freeze: inductor: freeze the backbone below the target layer (weights folded in
            as constants, batch norms folded): ``on``, ``off``, or ``auto`` (resolved by the
            archiver like ``channels_last``: kept where it is 5% faster, since a frozen worker
            starts slower). Costs a second copy of the weights in memory.
        compile_cache_dir: inductor's cache folder (empty: ``~/.cache/gradcam-serve/inductor``,
            shared by every worker and server of the user, so restarts load compiled kernels).
        tuning: what the archiver measured when it resolved ``auto`` (informational).
        batched_targets: vmapped gradient pass for several classes per image.
        topk: default predictions per image.
        cam_classes: default CAM targets: ``top1``, ``topN``, ``none`` or class list.
        cam_method: default CAM method.
        outputs: default output forms, comma list of ``map``, ``heatmap``, ``overlay``.
        max_cams: most CAM classes a request may ask for.
        max_side: long side cap, in pixels, of heatmaps and overlays.
        overlay_alpha: weight of the colour map in the overlay.
        overlay_quality: JPEG quality of overlays.
        max_image_bytes: largest encoded image accepted.
        max_pixels: largest decoded image accepted (width x height).
        max_response_bytes: largest response body; keep under the server's max_response_size.
        malloc_mmap_threshold_mib: glibc malloc serves host blocks up to this size from its heap
            instead of fresh zeroed pages (0: leave glibc's default, 128 KiB rising to 32 MiB).
        malloc_trim_threshold_mib: glibc keeps up to this much freed heap memory instead of
            returning it to the system (0: glibc's default). With both, a worker reuses the
            memory of the last batch instead of faulting it in again: on the CPU a batch runs
            about twice as fast, for the price of keeping its peak working set resident.
        decode_threads: threads that decode a batch's images in parallel (0 or 1: one at a
            time, in the worker's thread).
        decode_device: where baseline JPEGs are decoded: ``auto`` (with nvJPEG on CUDA workers
            where torchvision has it, else on the CPU), ``cpu``, or ``cuda`` (nvJPEG; the worker
            fails to load without it). Every other image is decoded on the CPU.
        encode_device: where overlay JPEGs are encoded, with the same choices.
    """

    model: str = "timm:tf_efficientnet_lite0"
    num_classes: int = 1000
    model_kwargs: dict = field(default_factory=dict)
    labels: str = "index_to_name.json"
    target_layer: str = "auto"
    layout: str = "auto"
    prefix_tokens: int | None = None
    grid: list[int] | None = None
    input_size: list[int] = field(default_factory=lambda: [224, 224])
    resize: str = "squash"
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    precision: str = "fp32"
    channels_last: str = "off"
    compile: str = "off"
    compile_backend: str = "inductor"
    compile_mode: str = ""
    compile_batch: str = "buckets"
    compile_cache_dir: str = ""
    compile_freeze: str = "off"
    tuning: dict = field(default_factory=dict)
    batched_targets: bool = True
    topk: int = 5
    cam_classes: str = "top1"
    cam_method: str = "gradcam"
    outputs: str = "map"
    max_cams: int = 5
    max_side: int = 512
    overlay_alpha: float = 0.5
    overlay_quality: int = 85
    max_image_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_response_bytes: int = 16 * 1024 * 1024
    malloc_mmap_threshold_mib: int = 256
    malloc_trim_threshold_mib: int = 1024
    decode_threads: int = 2
    decode_device: str = "auto"
    encode_device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict | None) -> ServeConfig:
        """Validate a ``handler:`` mapping; unknown keys and bad values raise ValueError."""
        data = dict(data or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown handler config keys: {', '.join(unknown)}; known: {', '.join(known)}"
            )
        config = cls(**data)
        config.validate()
        return config

    def to_dict(self) -> dict:
        """Plain mapping for ``model-config.yaml``."""
        return asdict(self)

    def validate(self) -> None:
        """Check every value; the message names the key.

        Raises:
            ValueError: on the first bad value.
        """
        def _check(ok: bool, key: str, wanted: str) -> None:
            if not ok:
                raise ValueError(f"handler config '{key}' must be {wanted}, got {getattr(self, key)!r}")

        def _posint(key: str) -> None:
            value = getattr(self, key)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                   "a positive integer")

        for key in ("num_classes", "topk", "max_cams", "max_side", "overlay_quality",
                    "max_image_bytes", "max_pixels", "max_response_bytes"):
            _posint(key)
        _check(isinstance(self.model, str) and bool(self.model), "model", "a model source")
        _check(isinstance(self.model_kwargs, dict), "model_kwargs", "a mapping")
        _check(isinstance(self.labels, str), "labels", "a file name or ''")
        _check(isinstance(self.target_layer, str) and bool(self.target_layer), "target_layer",
               "a module name or 'auto'")
        _check(self.layout in LAYOUTS, "layout", f"one of {', '.join(LAYOUTS)}")
        _check(self.prefix_tokens is None or (isinstance(self.prefix_tokens, int)
                                              and not isinstance(self.prefix_tokens, bool)
                                              and self.prefix_tokens >= 0),
               "prefix_tokens", "null or an integer >= 0")
        _check(not self.prefix_tokens or self.layout in ("auto", "nlc"), "prefix_tokens",
               "null or 0 unless layout is nlc or auto")
        grid = self.grid
        _check(grid is None or (isinstance(grid, (list, tuple)) and len(grid) == 2
                                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)),
               "grid", "null or [h, w]")
        self.grid = None if grid is None else [int(v) for v in grid]
        size = self.input_size
        _check(isinstance(size, (list, tuple)) and len(size) == 2
               and all(isinstance(v, int) and v > 0 for v in size), "input_size", "[height, width]")
        self.input_size = [int(v) for v in size]
        _check(self.resize in RESIZE_MODES, "resize", f"one of {', '.join(RESIZE_MODES)}")
        _check(self.interpolation in INTERPOLATIONS, "interpolation",
               f"one of {', '.join(INTERPOLATIONS)}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            _check(isinstance(value, (list, tuple)) and len(value) == 3
                   and all(isinstance(v, (int, float)) for v in value), key, "three numbers")
            setattr(self, key, [float(v) for v in value])
        _check(all(v > 0 for v in self.std), "std", "positive")
        _check(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        for key in ("channels_last", "compile", "compile_freeze"):  # once booleans
            value = getattr(self, key)
            if isinstance(value, bool):
                setattr(self, key, "on" if value else "off")
            _check(getattr(self, key) in SWITCHES, key, f"one of {', '.join(SWITCHES)}")
        _check(self.compile_batch in COMPILE_BATCH_MODES, "compile_batch",
               f"one of {', '.join(COMPILE_BATCH_MODES)}")
        for key in ("compile_backend", "compile_mode", "compile_cache_dir"):
            _check(isinstance(getattr(self, key), str), key, "a string")
        _check(bool(self.compile_backend), "compile_backend", "a torch.compile backend name")
        _check(isinstance(self.tuning, dict), "tuning", "a mapping")
        for key in ("malloc_mmap_threshold_mib", "malloc_trim_threshold_mib"):
            value = getattr(self, key)
            _check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2047, key,
                   "0 (glibc's default) or a size in MiB up to 2047 (mallopt takes an int)")
        _check(isinstance(self.batched_targets, bool), "batched_targets", "true or false")
        _check(isinstance(self.decode_threads, int) and not isinstance(self.decode_threads, bool)
               and 0 <= self.decode_threads <= 64, "decode_threads", "an integer in 0..64")
        for key in ("decode_device", "encode_device"):
            _check(getattr(self, key) in CODEC_DEVICES, key, f"one of {', '.join(CODEC_DEVICES)}")
        _check(isinstance(self.overlay_alpha, (int, float)) and 0 <= self.overlay_alpha <= 1,
               "overlay_alpha", "a number in [0, 1]")
        _check(self.overlay_quality <= 100, "overlay_quality", "1..100")
