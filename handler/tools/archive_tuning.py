"""The archiver's ``auto`` for the speed options: time them on this machine, keep what is faster.

Used by ``handler/tools/archive.py`` during its dry run, with the model it built and its weights.
"""

from __future__ import annotations

import logging
import time

__all__ = ["tune"]

logger = logging.getLogger("archive")


def _once(engine, pixels, classes):
    """One full pass (forward, gradient, normalised maps) of the batch: its maps."""
    from handler.cam import normalize_maps

    n = pixels.shape[0]
    cam_pass = engine.forward(engine.prepare(pixels))
    return normalize_maps(engine.cams(cam_pass, list(range(n)), classes, ["gradcam"] * n))


def _time_passes(engines: dict, pixels, classes, reps: int) -> tuple[dict[str, float], dict]:
    """Median images/s of each engine's pass and its maps, in interleaved rounds (one pass of
    each engine per round, the order rotated), so that what else the machine does, such as
    inductor's compile workers starting up after the first compile, hits every option alike."""
    import torch

    def settled(engine) -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    for eng in engines.values():  # untimed: kernels chosen, memory allocated
        _once(eng, pixels, classes)
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    maps = {}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            settled(engines[name])
            started = time.perf_counter()
            maps[name] = _once(engines[name], pixels, classes)
            settled(engines[name])
            times[name].append(time.perf_counter() - started)
    n = pixels.shape[0]
    return {name: n / sorted(t)[len(t) // 2] for name, t in times.items()}, maps


def tune(model, config, batch_size: int, device: str, reps: int = 7) -> dict:
    """Resolve ``auto`` in ``config.speed.channels_last``, ``compile`` and ``compile_freeze`` by timing
    the options here, on this machine's device; ``config`` is updated.

    Each option is kept only when it is correct (its normalised maps within 1e-4 of the eager
    pass's: fp32 rounding alone puts two correct passes ~1e-5 apart, a wrong pass is off by
    tenths) and at least 5% faster than going without it: timings on a busy machine are noisy, a
    compiled worker pays for compiling at every cold start, and a frozen one pays for tracing and
    freezing again at every restart (AOTAutograd's cache skips frozen graphs). The compiled pass
    is built in one layout only, frozen and not where freezing is left open: compiled, the two
    layouts come within 2% of each other on every model measured (docs/performance.md, "The
    compiled pass"), below the 5% a choice needs, and each compile costs the archive seconds to a
    minute on a CPU. The layout compiled is the faster eager one (a quick first timing of the two,
    where channels-last is left open). Every option is then built and compiled first, and all
    (both eager layouts too) are timed in the same interleaved rounds, which alone decide.

    Returns:
        ``config.speed.tuning``: the device, batch, images/s per option and the choice.
    """
    import copy
    import itertools

    import torch

    from handler.cam import CamEngine
    from handler.compiled import CompiledPass
    from handler.host import tune_malloc

    # As the worker will run: its malloc settings halve a CPU batch's time (handler/host.py).
    tune_malloc(config.host.malloc_mmap_threshold_mib, config.host.malloc_trim_threshold_mib)

    def engine(channels_last: bool):
        return CamEngine(copy.deepcopy(model), config.target.target_layer, device=device, mean=config.input.mean,
                         std=config.input.std,
                         input_size=tuple(config.input.input_size), channels_last=channels_last,
                         precision=config.speed.precision if device == "cuda" else "fp32")

    def choices(switch: str) -> tuple[bool, ...]:
        return (False, True) if switch == "auto" else (switch == "on",)

    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (batch_size, *config.input.input_size, 3), dtype=torch.uint8, generator=gen)
    classes = (torch.arange(batch_size) % config.model.num_classes).to(device)
    engines = {"eager": engine(False)}
    if config.speed.channels_last == "auto":
        engines["channels_last"] = engine(True)
    options = {}  # compiled option -> (channels_last, frozen)
    if config.speed.compile != "off":
        layouts = choices(config.speed.channels_last)
        if len(layouts) > 1:  # the layout to compile in: the faster eager one
            quick, _ = _time_passes(engines, pixels, classes, 3)
            layouts = (quick["channels_last"] >= quick["eager"],)
            logger.info("  eager: %s img/s NCHW, %s channels-last: compiling %s", round(quick["eager"], 1),
                        round(quick["channels_last"], 1), "channels-last" if layouts[0] else "NCHW")
        freezes = choices(config.speed.compile_freeze) if config.speed.compile_backend == "inductor" else (False,)
        for layout, frozen in itertools.product(layouts, freezes):
            key = "compiled" + ("_channels_last" if layout else "") + ("_frozen" if frozen else "")
            candidate = engine(layout)
            candidate.batched_targets = False
            logger.info("  compiling the pass (%s%s) to time it (a minute or so on a CPU) ...",
                        "channels-last" if layout else "NCHW", ", frozen" if frozen else "")
            try:
                CompiledPass(candidate, batch_size, config.speed.compile_batch, config.speed.compile_backend,
                             config.speed.compile_mode, freeze=frozen)
                _once(candidate, pixels, classes)  # compiles
            except Exception as exc:  # no C++ compiler, an unsupported op: serve eager
                logger.warning("  torch.compile failed here (%s: %s): the archive serves eager",
                               type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                options.clear()
                break
            engines[key], options[key] = candidate, (layout, frozen)
    try:
        speeds, maps = _time_passes(engines, pixels, classes, reps)
    finally:
        torch._dynamo.reset()  # the candidates' graphs: no use to the archive
    diffs = {k: float((m - maps["eager"]).abs().max()) for k, m in maps.items() if k != "eager"}
    channels_last = config.speed.channels_last == "on"
    if config.speed.channels_last == "auto":
        channels_last = diffs["channels_last"] <= 1e-4 and speeds["channels_last"] >= 1.05 * speeds["eager"]
    # What compiling must beat: eager in the chosen layout (eager NCHW where channels-last was
    # not timed but set on: compile on, freezing auto).
    base = speeds.get("channels_last" if channels_last else "eager", speeds["eager"])
    fits = {k: speeds[k] for k in options
            if diffs[k] <= 1e-4 and (config.speed.compile == "on" or speeds[k] >= 1.05 * base)}
    # Frozen only where it is 5% faster than the best unfrozen option.
    unfrozen = max((k for k in fits if not options[k][1]), key=fits.get, default=None)
    frozen = max((k for k in fits if options[k][1]), key=fits.get, default=None)
    best = frozen if frozen and (unfrozen is None or fits[frozen] >= 1.05 * fits[unfrozen]) else unfrozen
    if best is not None:
        config.speed.compile = "on"
        channels_last, freeze = options[best]
        config.speed.compile_freeze = "on" if freeze else "off"
    elif config.speed.compile == "auto":
        config.speed.compile = "off"
    if config.speed.compile_freeze == "auto":  # compile on and not timed (it failed here): the worker decides nothing
        config.speed.compile_freeze = "off"
    config.speed.channels_last = "on" if channels_last else "off"
    return {
        "device": device, "batch": batch_size,
        "images_per_s": {k: round(v, 1) for k, v in speeds.items()},
        "max_map_difference": {k: float(f"{v:.2g}") for k, v in diffs.items()},
        "chosen": {"channels_last": config.speed.channels_last, "compile": config.speed.compile,
                   "compile_freeze": config.speed.compile_freeze},
    }
