"""The archiver's ``auto`` for the speed options: time them on this machine, keep what is faster.

Used by ``scripts/archive.py`` during its dry run, with the model it built and its weights.
"""

from __future__ import annotations

import logging
import time

__all__ = ["tune"]

logger = logging.getLogger("archive")


def _time_pass(engine, pixels, classes, reps: int) -> tuple[float, object]:
    """Median images/s of the full pass (forward, gradient, normalised maps) and its maps."""
    from handler.cam import normalize_maps

    n = pixels.shape[0]

    def once():
        cam_pass = engine.forward(engine.prepare(pixels))
        return normalize_maps(engine.cams(cam_pass, list(range(n)), classes, ["gradcam"] * n))

    once()
    times, maps = [], None
    for _ in range(reps):
        started = time.perf_counter()
        maps = once()
        times.append(time.perf_counter() - started)
    return n / sorted(times)[len(times) // 2], maps


def tune(model, config, batch_size: int, compile_choice: str, channels_last_choice: str, device: str,
         reps: int = 5) -> dict:
    """Resolve ``auto`` for channels_last and compile by timing them here, on this machine's device.

    Each option is kept only when it is correct (its normalised maps within 1e-4 of the eager
    pass's: fp32 rounding alone puts two correct passes ~1e-5 apart, a wrong pass is off by
    tenths) and at least 5% faster: timings on a busy machine are noisy, and a compiled worker
    pays for compiling at every cold start. Where the layout is ``auto`` too, the compiled pass
    is timed in both layouts: the layout that is faster eager is not always the faster compiled
    (a frozen CPU graph packs the conv weights for its own kernels; channels-last then only adds
    conversions).

    Returns:
        ``config.tuning``: the device, batch, images/s per option and the choice.
    """
    import copy

    import torch

    from handler.cam import CamEngine
    from handler.compiled import CompiledPass
    from handler.host import tune_malloc

    # As the worker will run: its malloc settings halve a CPU batch's time (handler/host.py).
    tune_malloc(config.malloc_mmap_threshold_mib, config.malloc_trim_threshold_mib)

    def engine(channels_last: bool):
        return CamEngine(copy.deepcopy(model), config.target_layer, device=device, mean=config.mean, std=config.std,
                         input_size=tuple(config.input_size), channels_last=channels_last,
                         precision=config.precision if device == "cuda" else "fp32")

    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (batch_size, *config.input_size, 3), dtype=torch.uint8, generator=gen)
    classes = (torch.arange(batch_size) % config.num_classes).to(device)
    speeds, diffs = {}, {}
    speeds["eager"], reference = _time_pass(engine(False), pixels, classes, reps)
    channels_last = channels_last_choice == "on"
    if channels_last_choice == "auto":
        speeds["channels_last"], maps = _time_pass(engine(True), pixels, classes, reps)
        diffs["channels_last"] = float((maps - reference).abs().max())
        channels_last = diffs["channels_last"] <= 1e-4 and speeds["channels_last"] >= 1.05 * speeds["eager"]
    compiled = compile_choice == "on"
    if compile_choice == "auto" or (compile_choice == "on" and channels_last_choice == "auto"):
        base = speeds["channels_last" if channels_last else "eager"]
        layouts = (False, True) if channels_last_choice == "auto" else (channels_last,)
        best = None
        for layout in layouts:
            key = "compiled_channels_last" if layout else "compiled"
            candidate = engine(layout)
            candidate.batched_targets = False
            logger.info("  compiling the pass%s to time it (a minute or so on a CPU) ...",
                        ", channels-last," if layout else "")
            try:
                CompiledPass(candidate, batch_size, config.compile_batch, config.compile_backend,
                             config.compile_mode, freeze=config.compile_freeze)
                speeds[key], maps = _time_pass(candidate, pixels, classes, reps)
            except Exception as exc:  # no C++ compiler, an unsupported op: serve eager
                logger.warning("  torch.compile failed here (%s: %s): the archive serves eager",
                               type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                break
            finally:
                torch._dynamo.reset()  # the candidate's graphs: no use to the next one or the archive
            diffs[key] = float((maps - reference).abs().max())
            fast_enough = compile_choice == "on" or speeds[key] >= 1.05 * base
            if diffs[key] <= 1e-4 and fast_enough and (best is None or speeds[key] > speeds[best[0]]):
                best = (key, layout)
        if best is not None:
            compiled, channels_last = True, best[1]
        elif compile_choice == "auto":
            compiled = False
    config.channels_last = "on" if channels_last else "off"
    config.compile = "on" if compiled else "off"
    return {
        "device": device, "batch": batch_size,
        "images_per_s": {k: round(v, 1) for k, v in speeds.items()},
        "max_map_difference": {k: float(f"{v:.2g}") for k, v in diffs.items()},
        "chosen": {"channels_last": config.channels_last, "compile": config.compile},
    }
