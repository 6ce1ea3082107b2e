"""Build a classifier from a source spec and load its weights strictly.

Sources: ``timm:NAME``, ``torchvision:NAME`` or ``path/to/model.py:ClassName``. Used by the
archiver at build time and by the handler at load time, so both build the same model.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "Head",
    "build_model",
    "classifier_head",
    "takes_num_classes",
    "weights_classes",
    "default_preprocessing",
    "load_state_dict_strict",
    "imagenet_labels",
    "read_labels",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _split_source(source: str) -> tuple[str, str]:
    kind, _, name = source.partition(":")
    if kind in ("timm", "torchvision") and name:
        return kind, name
    path, sep, cls = source.rpartition(":")
    if sep and path.endswith(".py") and cls:
        return "file", source
    raise ValueError(
        f"model source '{source}' is not timm:NAME, torchvision:NAME or path/model.py:ClassName"
    )


def _load_class(spec: str, base_dir: Path | None) -> type:
    path_text, _, cls_name = spec.rpartition(":")
    path = Path(path_text)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ValueError(f"model file '{path}' does not exist")
    # A private module name: the user's file never shadows or joins sys.modules' packages.
    module_spec = importlib.util.spec_from_file_location(f"_gradcam_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cls = getattr(module, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = [n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)]
        raise ValueError(
            f"'{cls_name}' is not an nn.Module class in {path.name}; found: {', '.join(found) or 'none'}"
        )
    return cls


def build_model(
    source: str,
    num_classes: int | None = None,
    kwargs: dict | None = None,
    base_dir: Path | None = None,
) -> nn.Module:
    """A randomly initialised model in eval mode; nothing is downloaded.

    Args:
        source: ``timm:NAME``, ``torchvision:NAME`` or ``path/model.py:ClassName``.
        num_classes: output classes (the architecture's default when None).
        kwargs: extra constructor arguments.
        base_dir: where a relative ``model.py`` path is looked up.

    Raises:
        ValueError: if the source cannot be built.
    """
    kind, name = _split_source(source)
    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"timm has no model '{name}'; similar: {', '.join(close) or 'none'}")
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no classification model '{name}'")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    else:
        cls = _load_class(name, base_dir)
        params = inspect.signature(cls).parameters
        if "num_classes" in kwargs and "num_classes" not in params and not any(
            p.kind is p.VAR_KEYWORD for p in params.values()
        ):
            kwargs.pop("num_classes")
        model = cls(**kwargs)
    return model.eval()


def takes_num_classes(source: str, base_dir: Path | None = None) -> bool:
    """Whether the source's constructor sets the class count (timm and torchvision always do)."""
    kind, name = _split_source(source)
    if kind != "file":
        return True
    params = inspect.signature(_load_class(name, base_dir)).parameters
    return "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class Head:
    """A model's classifier head as one forward shows it.

    Attributes:
        classes: the output's width (columns per image).
        keys: state-dict keys of the head's weights: the modules executed last whose weight's
            first dimension is ``classes`` (``fc.weight``; DeiT's ``head.weight`` and
            ``head_dist.weight``), or the names timm's config gives its classifier.
        headless: the model has no classifier (timm built with ``num_classes=0``): its output
            is features, not class scores.
    """

    classes: int
    keys: tuple[str, ...]
    headless: bool = False


def _timm_classifier_keys(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}.weight" for n in names or ())


def classifier_head(model: nn.Module, input_size: tuple[int, int]) -> Head:
    """The class count and head weights of ``model``, from one no-grad forward of one image.

    Raises:
        ValueError: if the forward fails or its output is not ``(1, C)``.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    ran: list[tuple[str, nn.Module]] = []
    handles = [
        module.register_forward_hook(lambda m, _i, _o, n=name: ran.append((n, m)))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 2
    ]
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, 3, *input_size), device=device, dtype=dtype))
    except Exception as exc:
        raise ValueError(f"forward of one {input_size[0]}x{input_size[1]} image failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return (N, num_classes) class scores, got {shape} for one image")
    classes = int(out.shape[1])
    timm_keys = _timm_classifier_keys(model)
    if getattr(model, "num_classes", None) == 0 or (
            hasattr(model, "get_classifier") and isinstance(model.get_classifier(), nn.Identity)):
        return Head(classes, timm_keys, headless=True)
    keys: list[str] = []
    for name, module in reversed(ran):  # the last modules that output the classes
        if module.weight.shape[0] != classes:
            if keys:
                break
            continue
        key = f"{name}.weight"
        if key not in keys:
            keys.insert(0, key)
    return Head(classes, tuple(keys) or timm_keys)


def weights_classes(state: dict[str, torch.Tensor], head: Head) -> tuple[int, str] | None:
    """The class count the weights' head has (its weight's first dimension) and that tensor's
    key, or None when the file holds none of the head's tensors."""
    for key in reversed(head.keys):
        tensor = state.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
            return int(tensor.shape[0]), key
    return None


def default_preprocessing(source: str, model: nn.Module, kwargs: dict | None = None) -> dict:
    """Input size, mean/std and interpolation from the architecture's pretrained config.

    An ``img_size`` among the constructor's ``kwargs`` is the input size (a ViT built for 160 px
    only takes 160 px, whatever its pretrained config says).
    """
    kind, name = _split_source(source)
    cfg = {"input_size": [224, 224], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
           "interpolation": "bilinear"}
    if kind == "timm":
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=model)
        cfg.update(input_size=list(data["input_size"][1:]), mean=list(data["mean"]),
                   std=list(data["std"]), interpolation=data["interpolation"])
    elif kind == "torchvision":
        import torchvision

        try:
            transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError):
            return cfg
        size = transforms.crop_size[0]
        cfg.update(input_size=[size, size], mean=list(transforms.mean), std=list(transforms.std),
                   interpolation=transforms.interpolation.value)
    img_size = (kwargs or {}).get("img_size", (kwargs or {}).get("image_size"))
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        cfg["input_size"] = [img_size, img_size]
    elif isinstance(img_size, (list, tuple)) and len(img_size) == 2:
        cfg["input_size"] = [int(v) for v in img_size]
    return cfg


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every tensor or fail with the missing, unexpected and mismatched names.

    Raises:
        ValueError: naming up to 10 keys of each kind of mismatch.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{label} {len(keys)}: {'; '.join(keys[:10])}{more}")
    if problems:
        raise ValueError("weights do not fit the model: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names from timm's installed metadata (no network)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def read_labels(path: Path) -> list[str]:
    """Class names from a TorchServe ``index_to_name.json`` (``{"0": "name", ...}``).

    Values may also be ``[wnid, name]`` pairs, as in TorchServe's examples.

    Raises:
        ValueError: if the file is not such a mapping or its keys are not 0..N-1.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read labels file '{path}': {exc}") from exc
    if isinstance(data, list):
        data = {str(i): v for i, v in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"labels file '{path}' must map class ids to names")
    try:
        keys = sorted(int(k) for k in data)
    except ValueError as exc:
        raise ValueError(f"labels file '{path}' has a key that is not a class id: {exc}") from exc
    if keys != list(range(len(keys))):
        raise ValueError(f"labels file '{path}' must have ids 0..{len(keys) - 1} without gaps")
    names = []
    for i in range(len(keys)):
        value = data[str(i)]
        names.append(str(value[-1] if isinstance(value, list) else value))
    return names
