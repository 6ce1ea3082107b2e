#!/usr/bin/env python
"""Benchmark of the Grad-CAM pass against plain inference and three CAM libraries.

In one run, for each model (same instance, batch and input), every row delivers the top-5
classes plus one upsampled, min-max-normalised map per image as numpy arrays on the host
(``plain`` delivers only the top-5): float32 from the libraries, uint8 grey levels from the
engine as the handler ships them (``--engine-maps float32`` for floats). Rows are
interleaved and their order rotated every round, so that machine noise hits all of them
alike; the table reports the median round.

    plain              inference only, under torch.inference_mode: the reference, ratio 1.0
    engine_fp32        handler.cam.CamEngine (head-only graph, one autograd.grad), fp32: eager,
                       today's serve path without the archiver's speed options
    engine_bf16        the same under bf16 autocast
    engine_channels_last   the engine, channels-last memory format
    engine_compiled        the engine with its model torch.compile'd (inductor), as a worker with
                           compile on serves it (handler.compiled; compiled in the warm-up): the
                           backbone below the target layer frozen (weights as constants)
    engine_compiled_unfrozen   the same without freezing (compile_freeze off)
    engine_compiled_cl     compiled and channels-last
    engine_compiled_cl_unfrozen   the same without freezing (compile_freeze off)
    engine_compiled_cl_prepacked  engine_compiled_cl with its conv weights pre-packed for oneDNN
                           (inductor's default under freezing; the worker does not pre-pack, so
                           that inductor's graph cache holds the frozen graphs): not in the
                           default rows, and never the "best configuration"
    pytorch-grad-cam   GradCAM, targets=None (top-1 from its own forward); for token and
                       channels-last layers with the matching reshape_transform
    captum             LayerGradCam (+ one extra inference forward for the top-5 and targets)
    torchcam           torchcam.methods.GradCAM on its own forward's scores

captum and torchcam read a layer's output as (N, C, H, W) only: their rows are left out for the
transformer models (ViT tokens, Swin's NHWC maps), where the engine's automatic layer is no
NCHW map.

The libraries run as they are normally used: parameters require grad (the engine's model is
frozen; their rows unfreeze it and drop ``.grad`` afterwards), extractors built per call.
A second table compares the two strategies for several classes per image.

Writes a table to stdout and everything to JSON; never a test. Random weights, batch-norm
statistics calibrated on the input batch.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handler.cam import (  # noqa: E402
    CamEngine,
    Frames,
    device_tensor,
    normalize_maps,
    to_host,
    to_uint8,
    upsample_maps,
)
from handler.compiled import CompiledPass  # noqa: E402
from handler.config import ServeConfig  # noqa: E402
from handler.host import tune_malloc  # noqa: E402
from handler.layouts import auto_target  # noqa: E402

log = logging.getLogger("bench_cam")

ROWS = ("plain", "engine_fp32", "engine_bf16", "engine_channels_last", "engine_compiled", "engine_compiled_unfrozen",
        "engine_compiled_cl", "engine_compiled_cl_unfrozen", "pytorch-grad-cam", "captum", "torchcam")
# Engine rows on their own copy of the model (channels_last converts its parameters) and their
# options: (channels_last, torch.compile, inductor freezing of the backbone).
_ENGINE_VARIANTS = {"engine_channels_last": (True, False, False), "engine_compiled": (False, True, True),
                    "engine_compiled_unfrozen": (False, True, False),
                    "engine_compiled_cl": (True, True, True), "engine_compiled_cl_unfrozen": (True, True, False),
                    "engine_compiled_cl_prepacked": (True, True, True)}
# Rows that compare a choice the worker does not make: extra inductor options, never "best".
_COMPARISONS = {"engine_compiled_cl_prepacked": {"cpp.weight_prepack": True}}
ALL_ROWS = (*ROWS, *_COMPARISONS)
# Library rows: (distribution, import name).
_LIBRARIES = {"pytorch-grad-cam": ("grad-cam", "pytorch_grad_cam"), "captum": ("captum", "captum"),
              "torchcam": ("torchcam", "torchcam")}


# --------------------------------------------------------------------------- setup


def build_model(name: str) -> nn.Module:
    """``torchvision`` name first, then timm; ``timm:``/``torchvision:`` prefixes force one."""
    import timm
    import torchvision

    kind, _, bare = name.rpartition(":")
    if kind == "torchvision" or (not kind and bare in torchvision.models.list_models()):
        return torchvision.models.get_model(bare, weights=None).eval()
    return timm.create_model(bare, pretrained=False).eval()


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm statistics from ``x``: random deep nets otherwise shrink activations (random
    mobilenet_v2's maps are ~1e-11), which leaves the map-agreement column meaningless."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _trainable(model: nn.Module) -> Iterator[None]:
    """Parameters require grad, as the libraries expect; flags restored and .grad dropped."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak device memory of one call: CUDA's allocator peak, or on the CPU the rise of the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = False
        if device.type == "cpu":
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.cpu_ok = "VmHWM" in Path("/proc/self/status").read_text()
            except OSError:
                self.cpu_ok = False
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except OSError:
                self._trim = None

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def measure(self, fn: Callable[[], object]) -> float | None:
        """MiB: absolute allocator peak on CUDA, RSS rise on the CPU; None where unknown."""
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.cpu_ok:
            fn()
            return None
        if self._trim is not None:
            self._trim(0)  # hand freed heap back, so the baseline is live memory only
        Path("/proc/self/clear_refs").write_text("5")
        before = self._status_kib("VmRSS")
        fn()
        return max(self._status_kib("VmHWM") - before, 0) / 1024


# --------------------------------------------------------------------------- rows


def make_rows(model: nn.Module, x: torch.Tensor, size: int, wanted: list[str],
              engine_maps: str = "uint8", compile_mode: str = "",
              variant_precision: str = "fp32") -> tuple[dict[str, Callable], str, str]:
    """One callable per row; each returns ``(top5 probabilities, top5 ids, maps or None)``.

    Also returns the target layer and its layout (``nchw``, ``nhwc``, ``nlc``).
    """
    device = x.device
    n = x.shape[0]
    out_hw = (size, size)
    # The same target layer for every row: the engine's automatic choice.
    layer_name, layout = auto_target(model, tuple(x.shape[2:]))
    engines = {}
    for row, precision in (("engine_fp32", "fp32"), ("engine_bf16", "bf16")):
        if row in wanted:
            engines[row] = CamEngine(model, layer_name, device=device, input_size=tuple(x.shape[2:]),
                                     precision=precision)
    for row, (channels_last, compiled, freeze) in _ENGINE_VARIANTS.items():
        if row in wanted:
            engines[row] = CamEngine(copy.deepcopy(model), layer_name, device=device, precision=variant_precision,
                                     input_size=tuple(x.shape[2:]), channels_last=channels_last)
            if compiled:
                engines[row].batched_targets = False
                # Compiles on the warm-up call, at this batch size.
                CompiledPass(engines[row], n, mode=compile_mode or None, freeze=freeze, options=_COMPARISONS.get(row))
    layer = dict(model.named_modules())[layer_name]
    reshape = None if layout.kind == "nchw" else layout.to_nchw
    if layout.kind != "nchw":
        skipped = [row for row in ("captum", "torchcam") if row in wanted]
        if skipped:
            log.info("%s layer %s: no %s rows (NCHW layers only)", layout.kind, layer_name, " or ".join(skipped))
        wanted = [row for row in wanted if row not in skipped]

    def plain():
        with torch.inference_mode():
            top_p, top_i = model(x).float().softmax(dim=1).topk(5, dim=1)
            host = to_host({"p": top_p, "i": top_i})
        return host["p"].numpy(), host["i"].numpy(), None

    # As the handler does: frames known on the host, copied once, no read-back.
    frames = Frames(size=device_tensor([out_hw] * n, device),
                    box=device_tensor([[0.0, 0.0, 1.0, 1.0]] * n, device))

    def engine_row(engine: CamEngine):
        xe = x.contiguous(memory_format=engine.memory_format)  # as engine.prepare hands it over

        def run():
            cam_pass = engine.forward(xe)
            top_p, top_i = cam_pass.logits.detach().float().softmax(dim=1).topk(5, dim=1)
            maps = normalize_maps(engine.cams(cam_pass, range(n), top_i[:, 0], ["gradcam"] * n))
            maps = upsample_maps(maps, frames, out_hw)
            if engine_maps == "uint8":
                maps = to_uint8(maps)  # what the handler ships (heatmap PNGs)
            host = to_host({"maps": maps, "p": top_p, "i": top_i})
            return host["p"].numpy(), host["i"].numpy(), host["maps"].numpy()

        return run

    def pytorch_grad_cam():
        from pytorch_grad_cam import GradCAM

        with _trainable(model), GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=x, targets=None)  # targets: argmax of its own forward
            top_p, top_i = cam.outputs.detach().float().softmax(dim=1).topk(5, dim=1)
            return top_p.cpu().numpy(), top_i.cpu().numpy(), maps

    def captum():
        from captum.attr import LayerAttribution, LayerGradCam

        with _trainable(model):
            # attribute() does not return the model output: one extra forward for the top-5.
            with torch.inference_mode():
                top_p, top_i = model(x).float().softmax(dim=1).topk(5, dim=1)
            top_p, top_i = top_p.clone(), top_i.clone()  # out of inference mode
            attr = LayerGradCam(model, layer).attribute(x, target=top_i[:, 0], relu_attributions=True)
            maps = LayerAttribution.interpolate(attr, out_hw, interpolate_mode="bilinear")[:, 0]
            maps = normalize_maps(maps.detach())
            return top_p.cpu().numpy(), top_i.cpu().numpy(), maps.cpu().numpy()

    def torchcam():
        from torchcam.methods import GradCAM

        with _trainable(model), GradCAM(model, layer_name) as extractor:
            scores = model(x)
            top_p, top_i = scores.detach().float().softmax(dim=1).topk(5, dim=1)
            cams = extractor(class_idx=top_i[:, 0].tolist(), scores=scores, normalized=False)[0]
            maps = F.interpolate(cams[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
            maps = normalize_maps(maps)
            return top_p.cpu().numpy(), top_i.cpu().numpy(), maps.cpu().numpy()

    table = {"plain": plain, "pytorch-grad-cam": pytorch_grad_cam, "captum": captum, "torchcam": torchcam}
    table.update({row: engine_row(engine) for row, engine in engines.items()})
    return {row: table[row] for row in wanted}, layer_name, layout.kind


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn: Callable, device: torch.device, clock: str = "wall"):
    _sync(device)
    start = _CLOCKS[clock]()
    out = fn()
    _sync(device)
    return _CLOCKS[clock]() - start, out


def _agreement(output: tuple, ref: tuple) -> float | None:
    """Mean per-image Pearson correlation with the reference row's maps, over the images whose
    top-1 class is the same in both rows (bf16 may pick another class); None if none is."""
    maps, ref_maps = output[2], ref[2]
    same = output[1][:, 0] == ref[1][:, 0]
    if maps is None or ref_maps is None or not same.any():
        return None
    a = maps[same].reshape(int(same.sum()), -1).astype(np.float64)
    b = ref_maps[same].reshape(int(same.sum()), -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b, strict=True)])
    return None if np.isnan(corr).all() else float(np.nanmean(corr))


def bench_model(name: str, args, device: torch.device, memory: PeakMemory) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    calibrate(model, x)
    rows, layer_name, layout = make_rows(model, x, args.size, args.rows, args.engine_maps, args.compile_mode,
                                         args.variant_precision)
    log.info("%s: target layer %s (%s)", name, layer_name, layout)

    # First calls: warm up and keep each row's output to check shapes and agreement.
    outputs = {}
    for row, fn in list(rows.items()):
        try:
            outputs[row] = fn()
        except Exception as exc:  # a compile mode or precision this device cannot do: drop the row
            if row not in _ENGINE_VARIANTS:
                raise
            log.warning("%s %s failed, row dropped: %s: %s", name, row, type(exc).__name__, str(exc)[:300])
            del rows[row]
            continue
        top_p, top_i, maps = outputs[row]
        assert top_p.shape == top_i.shape == (args.batch, 5), (row, top_p.shape)
        assert maps is None or maps.shape == (args.batch, args.size, args.size), (row, maps.shape)
    times: dict[str, list[float]] = {row: [] for row in rows}
    order = list(rows)
    for r in range(args.warmup + args.iters):
        shift = r % len(order)
        for row in order[shift:] + order[:shift]:
            seconds, _ = _timed(rows[row], device, args.clock)
            if r >= args.warmup:
                times[row].append(seconds)
    # Memory apart from the timing; the smaller of two interleaved passes, as first-time
    # allocations (kernel caches, the allocator's own growth) land on whichever row runs first.
    peaks: dict[str, list] = {row: [] for row in rows}
    for _ in range(2):
        for row, fn in rows.items():
            peaks[row].append(memory.measure(fn))
    peaks = {row: None if None in v else min(v) for row, v in peaks.items()}

    ref = outputs.get("engine_fp32")
    base = statistics.median(times["plain"]) if "plain" in times else None
    results = []
    for row in rows:
        median = statistics.median(times[row])
        results.append({
            "model": name,
            "row": row,
            "target_layer": layer_name,
            "layout": layout,
            "images_per_s": args.batch / median,
            "median_s": median,
            "times_s": times[row],
            "ratio_to_plain": base / median if base else None,
            "peak_memory_mib": peaks[row],
            "top1_same_as_engine_fp32": (None if ref is None
                                         else float((outputs[row][1][:, 0] == ref[1][:, 0]).mean())),
            "map_corr_vs_engine_fp32": None if ref is None else _agreement(outputs[row], ref),
        })
    del rows, outputs, model
    return results


def bench_multi_target(name: str, args, device: torch.device) -> list[dict]:
    """k classes per image: one gradient pass per round (k passes) vs one vmapped pass."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    calibrate(model, x)
    engine = CamEngine(model, "auto", device=device, input_size=(args.size, args.size))
    n = args.batch

    def run(k: int, batched: bool):
        engine.batched_targets = batched
        _sync(device)
        start = time.perf_counter()
        cam_pass = engine.forward(x)
        top_i = cam_pass.logits.detach().topk(k, dim=1).indices
        _sync(device)
        mid = time.perf_counter()
        rows = [i for i in range(n) for _ in range(k)]
        maps = normalize_maps(engine.cams(cam_pass, rows, top_i.reshape(-1), ["gradcam"] * (n * k)))
        maps = to_host({"maps": maps})["maps"].numpy()
        _sync(device)
        end = time.perf_counter()
        return end - start, end - mid, maps

    cases = [(k, batched) for k in args.multi_k for batched in (False, True)]
    checks = {}
    for case in cases:
        checks[case] = run(*case)[2]
    for k in args.multi_k:
        diff = np.abs(checks[(k, False)] - checks[(k, True)]).max()
        if diff > 1e-4:
            log.warning("%s k=%d: strategies disagree by %.2e", name, k, diff)
    totals = {case: [] for case in cases}
    cams = {case: [] for case in cases}
    for r in range(args.warmup + args.multi_iters):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            total, cam_part, _ = run(*case)
            if r >= args.warmup:
                totals[case].append(total)
                cams[case].append(cam_part)
    results = []
    for k, batched in cases:
        total = statistics.median(totals[(k, batched)])
        results.append({
            "model": name,
            "k": k,
            "strategy": "vmapped" if batched else "per_round",
            "images_per_s": n / total,
            "maps_per_s": n * k / total,
            "median_total_s": total,
            "median_grad_maps_s": statistics.median(cams[(k, batched)]),
            "target_layer": engine.target_layer,
        })
    engine.batched_targets = False
    return results


# --------------------------------------------------------------------------- output


def _fmt_mem(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib:.0f}"


# The project's targets (issue 3), per device type: (check, row compared, minimum ratio).
# "speed" ratios are engine_fp32 images/s over the other row's; "memory" is the other row's
# peak over engine_fp32's, so that every check reads "at least".
TARGETS = {
    "cpu": [("speed", "plain", 0.85), ("speed", "pytorch-grad-cam", 2.5)],
    "cuda": [("speed", "plain", 0.90), ("memory", "plain", 1 / 1.1), ("speed", "torchcam", 1.0),
             ("speed", "captum", 1.0), ("speed", "pytorch-grad-cam", 1.0)],
}


def target_checks(results: list[dict], device_type: str) -> list[dict]:
    """engine_fp32 against the targets of ``device_type``, for every row the run measured."""
    by = {(r["model"], r["row"]): r for r in results}
    checks = []
    for model in dict.fromkeys(r["model"] for r in results):
        eng = by.get((model, "engine_fp32"))
        if eng is None:
            continue
        for kind, row, minimum in TARGETS.get(device_type, TARGETS["cuda"]):
            other = by.get((model, row))
            if other is None:
                continue
            if kind == "speed":
                value = eng["images_per_s"] / other["images_per_s"]
                text = f"{value:.2f}x {row} images/s (target >= {minimum:g}x)"
            elif eng["peak_memory_mib"] and other["peak_memory_mib"]:
                value = other["peak_memory_mib"] / eng["peak_memory_mib"]
                text = (f"peak memory {eng['peak_memory_mib'] / other['peak_memory_mib']:.2f}x {row}'s "
                        f"(target <= {1 / minimum:.2f}x)")
            else:
                continue
            checks.append({"model": model, "check": kind, "against": row, "value": round(value, 4),
                           "minimum": minimum, "met": value >= minimum, "text": text})
    # The speed options (issue 16): the best engine configuration against today's eager engine,
    # on the CPU at least 1.4x for the CNN rows.
    for model in dict.fromkeys(r["model"] for r in results):
        eng = by.get((model, "engine_fp32"))
        options = [by[(model, row)] for row in _ENGINE_VARIANTS if (model, row) in by and row not in _COMPARISONS]
        if eng is None or not options:
            continue
        best = max(options, key=lambda r: r["images_per_s"])
        value = best["images_per_s"] / eng["images_per_s"]
        minimum = 1.4 if device_type == "cpu" and eng.get("layout") == "nchw" else None
        met = None if minimum is None else value >= minimum
        checks.append({"model": model, "check": "speed_options", "against": "engine_fp32", "best": best["row"],
                       "value": round(value, 4), "minimum": minimum, "met": met,
                       "text": f"best configuration {best['row']}: {value:.2f}x engine_fp32 images/s"
                               + (f" (target >= {minimum:g}x)" if minimum else " (no target)")})
    # Token and channels-last models (issue 11): their ratio to plain inference within 10% of
    # the CNN rows' (their mean) in the same run.
    cnn = [r["ratio_to_plain"] for r in results
           if r["row"] == "engine_fp32" and r.get("layout") == "nchw" and r["ratio_to_plain"]]
    for r in results:
        if r["row"] == "engine_fp32" and r.get("layout") not in (None, "nchw") and r["ratio_to_plain"] and cnn:
            reference = statistics.mean(cnn)
            value = r["ratio_to_plain"] / reference
            checks.append({"model": r["model"], "check": "layout_ratio", "against": "nchw models",
                           "value": round(value, 4), "minimum": 0.9, "met": value >= 0.9,
                           "text": (f"{r['layout']} ratio to plain {r['ratio_to_plain']:.2f}x = {value:.2f} of the CNN "
                                    f"rows' mean {reference:.2f}x (target >= 0.9)")})
    return checks


def print_tables(results: list[dict], multi: list[dict], meta: dict) -> None:
    mem_label = "peak MiB" if meta["device_type"] == "cuda" else "peak RSS +MiB"
    print(f"\n{meta['device_name']} | torch {meta['torch']} | batch {meta['batch']} | "
          f"{meta['size']}x{meta['size']} | {meta['iters']} rounds (median) after {meta['warmup']} warm-up"
          f" | engine maps {meta['engine_maps']} | malloc {meta['malloc']}"
          + (" | CPU-seconds clock" if meta.get("clock") == "cpu" else ""))
    head = (f"| model | row | images/s | ratio to plain | {mem_label} | top-1 = engine_fp32 "
            "| map corr vs engine_fp32 |")
    print(head)
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = "n/a" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.2f}x"
        corr, same = r["map_corr_vs_engine_fp32"], r["top1_same_as_engine_fp32"]
        print(f"| {r['model']} | {r['row']} | {r['images_per_s']:.1f} | {ratio} | "
              f"{_fmt_mem(r['peak_memory_mib'])} | {'n/a' if same is None else f'{same:.0%}'} | "
              f"{'n/a' if corr is None else f'{corr:.3f}'} |")
    checks = target_checks(results, meta["device_type"])
    if checks:
        print(f"\nTargets on {meta['device_type']} (engine_fp32):")
    for c in checks:
        verdict = "" if c["met"] is None else (": met" if c["met"] else ": NOT MET")
        print(f"  {c['model']}: {c['text']}{verdict}")
    if multi:
        print(f"\nSeveral classes per image (forward + gradients + low-res maps to the host; "
              f"{meta['multi_iters']} rounds, median):")
        print("| model | k | strategy | images/s | maps/s | gradient+maps ms | vs per_round |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        per_round = {(r["model"], r["k"]): r for r in multi if r["strategy"] == "per_round"}
        for r in multi:
            ref = per_round[(r["model"], r["k"])]
            print(f"| {r['model']} | {r['k']} | {r['strategy']} | {r['images_per_s']:.1f} | "
                  f"{r['maps_per_s']:.1f} | {r['median_grad_maps_s'] * 1e3:.1f} | "
                  f"{ref['median_total_s'] / r['median_total_s']:.2f}x |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="resnet50,mobilenet_v2,tf_efficientnet_lite0,vit_small_patch16_224,"
                                            "swin_tiny_patch4_window7_224",
                        help="comma list (torchvision names first, else timm)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (8 on CPU, 64 on CUDA)")
    parser.add_argument("--size", type=int, default=224, help="input and map side")
    parser.add_argument("--device", default="auto", help="auto (cuda:0 if available, else cpu), cpu, cuda:N")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (5 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (1 on CPU, 5 on CUDA)")
    parser.add_argument("--engine-maps", choices=("uint8", "float32"), default="uint8",
                        help="the engine rows' map form on the host (the handler ships uint8)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma list of {', '.join(ALL_ROWS)} (default: all but {', '.join(_COMPARISONS)})")
    parser.add_argument("--multi-models", default="tf_efficientnet_lite0,resnet50",
                        help="models of the several-classes table ('' to skip it)")
    parser.add_argument("--multi-k", default="1,3,5", help="classes per image in that table")
    parser.add_argument("--multi-iters", type=int, default=None,
                        help="timed rounds of that table (3x --iters: its differences are small)")
    parser.add_argument("--compile-mode", default="",
                        help="torch.compile mode of the compiled rows ('' inductor's default, reduce-overhead, "
                             "max-autotune, max-autotune-no-cudagraphs)")
    parser.add_argument("--variant-precision", choices=("fp32", "bf16"), default="fp32",
                        help="autocast precision of the channels_last and compiled rows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the main table times: wall-clock seconds, or the process's CPU seconds "
                             "(CPU device only; with --threads 1 the work done, little disturbed by other "
                             "processes on a shared machine; images/s then means per CPU second)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="glibc malloc thresholds: 'tuned' as the served handler sets them "
                             "(handler config malloc_*_threshold_mib), 'default' as glibc ships")
    parser.add_argument("--json-out", default=None,
                        help="default bench_results/bench_cam_<device type>.json")
    args = parser.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ALL_ROWS)}")
    missing = [f"{row} (pip install {_LIBRARIES[row][0]})" for row in args.rows
               if row in _LIBRARIES and importlib.util.find_spec(_LIBRARIES[row][1]) is None]
    if missing:
        parser.error(f"not installed: {', '.join(missing)}; install the test extras "
                     "(scripts/ops/bootstrap.sh test) or leave those rows out with --rows")
    args.models = [m for m in args.models.split(",") if m]
    args.multi_models = [m for m in args.multi_models.split(",") if m]
    args.multi_k = [int(k) for k in args.multi_k.split(",") if k]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.malloc == "tuned":  # before the first large allocation, as the handler does
        defaults = ServeConfig()
        tune_malloc(defaults.host.malloc_mmap_threshold_mib, defaults.host.malloc_trim_threshold_mib)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device not in ("auto", "cpu"):
            raise SystemExit("--clock cpu times the CPU device only")
        args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.batch = args.batch or (64 if on_cuda else 8)
    args.iters = args.iters or (30 if on_cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    args.multi_iters = args.multi_iters or 3 * args.iters
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    meta = {
        "torch": torch.__version__,
        **{pkg: _version(pkg) for pkg in ("torchvision", "timm", "captum", "grad-cam", "torchcam")},
        "device": str(device), "device_type": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads(), "batch": args.batch, "size": args.size,
        "iters": args.iters, "multi_iters": args.multi_iters, "warmup": args.warmup,
        "engine_maps": args.engine_maps, "malloc": args.malloc, "clock": args.clock,
        "compile_mode": args.compile_mode or "default", "variant_precision": args.variant_precision,
        "python": platform.python_version(),
        "map_output": (f"(N, size, size) numpy, min-max normalised: engine rows {args.engine_maps} "
                       "(to_uint8), libraries float32"),
        "memory": ("torch.cuda.max_memory_allocated (absolute)" if on_cuda
                   else "peak RSS (VmHWM) rise over RSS before the call, MiB"),
    }
    memory = PeakMemory(device)
    results = []
    for name in args.models:
        log.info("benchmarking %s", name)
        results.extend(bench_model(name, args, device, memory))
    multi = []
    for name in args.multi_models:
        log.info("several classes per image: %s", name)
        multi.extend(bench_multi_target(name, args, device))

    print_tables(results, multi, meta)
    out = Path(args.json_out or f"bench_results/bench_cam_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "targets": target_checks(results, device.type),
                               "multi_target": multi}, indent=2))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
