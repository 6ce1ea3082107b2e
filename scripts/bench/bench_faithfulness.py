#!/usr/bin/env python
"""Faithfulness of every CAM method on ground truth, and the cost of the transformer-native one.

No pretrained transformer is reachable here, so the ground truth is made: a seeded synthetic
localisation set (devkit/synthetic.py: clutter, one red class-deciding shape, other-class shapes
in other colours as distractors; the red shape's box is known), a small timm VisionTransformer
and a small CNN trained on it on the CPU, one thread, fixed seeds. Then, on held-out images, for
the true class of each:

    pointing game   share of maps whose peak falls on the object's box grown by --tolerance px
                    (Zhang et al.'s 15 px at 224 px, scaled: 4 px at 64), and on the exact box;
                    higher is better; a random map's share is the chance row
    deletion AUC    Petsiuk et al. (2018): pixels deleted in map order (most important first) in
                    --steps steps, replaced by the mean grey, class probability integrated over
                    the deleted fraction; lower is better

for gradcam, gradcam++, xgradcam, layercam and hirescam on both models, and on the ViT chefer
(Chefer et al. 2021, gradient-weighted attention rollout) and legrad (Bousselham et al. 2025).
The trained ViT is also served as torchvision's VisionTransformer (its twin: the same weights,
devkit/vit_twins.py), whose attention methods run the explicit attention path; its rows must
repeat the timm ViT's. Maps come from the
product's own code path (handler.attention_cam.batch_pass, the engine's cams, normalize_maps,
upsample_maps).

Last, the cost of chefer and legrad against gradcam on each ViT: one batch of --timing-batch images,
forward and maps, interleaved rounds, median, with glibc malloc tuned as a served worker tunes it.

Targets (printed as met or missed): on the ViT the best transformer-native method points >= 90%
and has a lower deletion AUC than gradcam; on the CNN gradcam points >= 90%; each transformer-native
method costs <= 2x gradcam (on each ViT). Writes a table to stdout and everything to JSON; never a test.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/bench_faithfulness.py
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from devkit.faithfulness import deletion_auc, explanation_maps, pointing_game, random_maps
from devkit.synthetic import MEAN, STD, accuracy, make_set, single_thread, small_cnn, small_vit, train
from devkit.vit_twins import torchvision_twin
from handler.attention_cam import attention_explainer, batch_pass
from handler.cam import CamEngine
from handler.config import HostSection
from handler.host import tune_malloc
from handler.vocab import ATTENTION_METHODS, CAM_METHODS

log = logging.getLogger("bench_faithfulness")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _trained(name: str, build, data, epochs: int, lr: float, args) -> tuple[torch.nn.Module, float]:
    """The model trained (or loaded from --weights-dir when trained before with the same settings)."""
    key = f"{name}_n{args.train}_s{args.size}_k{args.classes}_e{epochs}_lr{lr}_seed{args.seed}.pt"
    path = Path(args.weights_dir) / key if args.weights_dir else None
    model = build()
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        log.info("%s: loaded %s", name, path)
        return model.eval(), 0.0
    started = time.perf_counter()
    with single_thread():
        train(model, data, epochs=epochs, lr=lr, seed=args.seed)
    seconds = time.perf_counter() - started
    log.info("%s: trained in %.0f s", name, seconds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, seconds


def _every_block_explainer(engine):
    """An explainer whose legrad sums every block (the paper's wording) instead of the last
    ``LEGRAD_BLOCKS`` (the authors' released default, which the product serves)."""
    explainer, _ = attention_explainer(engine, legrad_blocks=len(engine.model.blocks))
    return explainer


def _timing(engine, explainer, x, classes, rounds: int) -> dict[str, float]:
    """Median ms per batch of forward + maps, gradcam and the attention methods interleaved, order
    rotated each round."""
    methods = ["gradcam", *ATTENTION_METHODS]
    times: dict[str, list[float]] = {m: [] for m in methods}
    n = x.shape[0]
    for r in range(rounds + 1):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            started = time.perf_counter()
            cam_pass = batch_pass(engine, explainer, x, [method] * n)
            cam_pass.cams(list(range(n)), classes, [method] * n).sum().item()
            if r:  # round 0 warms up
                times[method].append((time.perf_counter() - started) * 1e3)
    return {m: statistics.median(t) for m, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=12000, help="training images (the same set for both models)")
    parser.add_argument("--test", type=int, default=500, help="held-out images the maps are judged on")
    parser.add_argument("--size", type=int, default=64, help="image side, px (the ViT's patches are 8 px)")
    parser.add_argument("--classes", type=int, default=4, help="shapes to tell apart")
    parser.add_argument("--vit-epochs", type=int, default=10)
    parser.add_argument("--cnn-epochs", type=int, default=4)
    parser.add_argument("--vit-lr", type=float, default=2e-3)
    parser.add_argument("--cnn-lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the models, the training order and the sets")
    parser.add_argument("--tolerance", type=int, default=4,
                        help="pointing game: px the box grows on each side (15 px at 224 px in Zhang et al.)")
    parser.add_argument("--steps", type=int, default=16, help="deletion steps")
    parser.add_argument("--timing-batch", type=int, default=32, help="images per timed batch")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the evaluation and timing")
    parser.add_argument("--weights-dir", default="bench_results/faithfulness_weights",
                        help="trained weights kept here and reused by a rerun with the same settings ('' never)")
    parser.add_argument("--json-out", default="bench_results/bench_faithfulness.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    # The allocator a served worker runs with (handler.pipeline tunes it at load): under glibc's
    # defaults each pass faults its activations in afresh, and the costs compared are not served ones.
    host = HostSection()
    tune_malloc(host.malloc_mmap_threshold_mib, host.malloc_trim_threshold_mib)

    train_set = make_set(args.train, size=args.size, classes=args.classes, seed=args.seed + 1)
    test_set = make_set(args.test, size=args.size, classes=args.classes, seed=args.seed + 2)
    models = {
        "vit": _trained("vit", lambda: small_vit(size=args.size, classes=args.classes, seed=args.seed),
                        train_set, args.vit_epochs, args.vit_lr, args),
        "cnn": _trained("cnn", lambda: small_cnn(classes=args.classes, seed=args.seed),
                        train_set, args.cnn_epochs, args.cnn_lr, args),
    }
    # The trained ViT again, as torchvision's VisionTransformer (no training: its weights).
    models = {"vit": models["vit"], "tv_vit": (torchvision_twin(models["vit"][0]), 0.0), "cnn": models["cnn"]}
    x, labels, boxes = test_set.normalized(), test_set.labels, test_set.boxes
    rows, results, meta_models = [], {}, {}
    timing: dict[str, dict[str, float]] = {}
    for name, (model, seconds) in models.items():
        acc = accuracy(model, test_set)
        engine = CamEngine(model, input_size=(args.size, args.size), mean=MEAN, std=STD)
        explainer, why = attention_explainer(engine)
        meta_models[name] = {"test_accuracy": acc, "train_seconds": round(seconds, 1),
                             "target_layer": engine.target_layer, "grid": list(engine.layout.grid),
                             "attention": why or "chefer"}
        log.info("%s: test accuracy %.3f, target layer %s", name, acc, engine.target_layer)
        methods = [*CAM_METHODS, *(ATTENTION_METHODS if explainer is not None else ())]
        chance = random_maps(len(test_set), args.size, args.size, engine.layout.grid, args.seed)
        # An ablation row on the timm ViT: legrad summing every block, not the last LEGRAD_BLOCKS.
        every = _every_block_explainer(engine) if name == "vit" and explainer is not None else None
        for method in [*methods, *(["legrad, every block"] if every is not None else []), "random"]:
            if method == "random":
                maps = chance
            elif method == "legrad, every block":
                maps = explanation_maps(engine, every, x, labels, "legrad")
            else:
                maps = explanation_maps(engine, explainer, x, labels, method)
            hits = pointing_game(maps, boxes, args.tolerance)
            exact = pointing_game(maps, boxes, 0)
            auc = deletion_auc(engine.model, x, maps, labels, steps=args.steps)
            row = {"model": name, "method": method, "pointing": float(hits.float().mean()),
                   "pointing_exact_box": float(exact.float().mean()),
                   "deletion_auc": float(auc.mean()), "deletion_auc_sem": float(auc.std() / len(auc) ** 0.5)}
            rows.append(row)
            results[(name, method)] = row
        if explainer is not None:
            n = min(args.timing_batch, len(test_set))
            timing[name] = _timing(engine, explainer, x[:n], labels[:n], args.rounds)

    vit_native = max((results[("vit", m)] for m in ATTENTION_METHODS if ("vit", m) in results),
                     key=lambda r: r["pointing"], default=None)
    targets = {
        "vit_native_points_90": bool(vit_native and vit_native["pointing"] >= 0.9),
        "vit_native_deletion_below_gradcam": bool(
            vit_native and vit_native["deletion_auc"] < results[("vit", "gradcam")]["deletion_auc"]),
        "cnn_gradcam_points_90": results[("cnn", "gradcam")]["pointing"] >= 0.9,
        **{f"{m}_cost_within_2x_{name}": t[m] <= 2 * t["gradcam"] for name, t in timing.items()
           for m in ATTENTION_METHODS},
        "tv_vit_repeats_vit": all(
            abs(results[("tv_vit", m)]["pointing"] - results[("vit", m)]["pointing"]) <= 0.01
            for m in [*CAM_METHODS, *ATTENTION_METHODS] if ("tv_vit", m) in results and ("vit", m) in results),
    }
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "commit": _commit(), "args": vars(args), "models": meta_models}

    print(f"\nsynthetic set: {args.size}x{args.size}, {args.classes} classes, train {args.train}, test {args.test}; "
          f"pointing tolerance {args.tolerance} px, deletion {args.steps} steps")
    for name, m in meta_models.items():
        print(f"- {name}: test accuracy {m['test_accuracy']:.1%}, target layer {m['target_layer']}, "
              f"grid {m['grid'][0]}x{m['grid'][1]}, trained in {m['train_seconds']} s (0: reused)")
    print(f"\n| model | method | pointing game, box ±{args.tolerance} px | pointing game, exact box "
          "| deletion AUC (lower is better) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['method']} | {row['pointing']:.1%} | {row['pointing_exact_box']:.1%} | "
              f"{row['deletion_auc']:.3f} ± {row['deletion_auc_sem']:.3f} |")
    for name, t in timing.items():
        costs = ", ".join(f"{m} {t[m]:.1f} ms ({t[m] / t['gradcam']:.2f}x)" for m in ATTENTION_METHODS)
        print(f"\n{name}, batch {min(args.timing_batch, len(test_set))}, forward + maps, median of {args.rounds}: "
              f"gradcam {t['gradcam']:.1f} ms, {costs}")
    print("\ntargets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows, "timing_ms": timing, "targets": targets}, indent=2))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
