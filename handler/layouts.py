"""Activation layouts and the target-layer picker, pure torch.

A target layer's output is a map in one of three layouts:

- ``nchw``: ``(N, C, h, w)``, CNNs;
- ``nhwc``: ``(N, h, w, C)``, timm models with ``output_fmt == 'NHWC'`` (Swin, SwinV2, MambaOut...);
- ``nlc``: ``(N, k + h * w, C)`` tokens, ``k`` prefix tokens (class, distillation, register
  tokens: timm's ``num_prefix_tokens``) before the patch tokens of an ``h x w`` grid (ViT, DeiT,
  EVA, BEiT, DINOv2; LeViT's stages with ``k = 0``).

:meth:`Layout.to_nchw` brings an activation and its gradient to ``(..., C, h, w)`` with the
same views (no copy), so the CAM methods never see a layout. Which layout a layer has is
decided once, from the model (timm attributes, torchvision's ViT, the patch grid) and from the
layer's output shape at the served input size; an override (:class:`LayoutSpec`) wins.

The picker (:func:`find_target_layer`) runs one probe forward and one gradient pass with a
hook on every module, and only ever chooses a layer that (1) outputs a map in a known layout,
(2) is not an ``Identity``/pass-through, part of an attention module (q/k/v, proj...) or inside
a class-attention block (CaiT's ``blocks_token_only``: it returns the class token alone), (3) runs once per
forward, (4) receives a non-zero gradient at its patch positions (under class-token pooling a
ViT's last block output and its ``norm2`` get exactly zero) and (5) gives a Grad-CAM map that
is not constant. Among those it takes the last one on the grid of the model's own feature
hierarchy (timm's ``feature_info``).

Nothing here imports TorchServe or PIL.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

__all__ = [
    "LAYOUTS",
    "Layout",
    "LayoutSpec",
    "ModelHints",
    "LayerInfo",
    "classify",
    "token_parameters",
    "infer_layout",
    "probe_layers",
    "list_layers",
    "pick_layer",
    "find_target_layer",
    "auto_target",
    "resolve_layer",
    "layer_layout",
    "frozen",
]

LAYOUTS = ("nchw", "nhwc", "nlc")
_FLAT = 1e-4  # a map whose spread is below this fraction of its peak is constant (rounding noise)
_MAX_PREFIX = 16  # most undeclared prefix tokens looked for (class, distillation, registers)


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """How a layer's output holds its map.

    Attributes:
        kind: ``nchw``, ``nhwc`` or ``nlc``.
        grid: ``(h, w)`` of the map.
        prefix: ``nlc`` only: tokens before the patch tokens, dropped from the map.
    """

    kind: str
    grid: tuple[int, int]
    prefix: int = 0

    def to_nchw(self, t: Tensor) -> Tensor:
        """``(..., <layout>)`` to ``(..., C, h, w)`` by views; any leading dimensions."""
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.movedim(-1, -3)
        return t[..., self.prefix :, :].unflatten(-2, self.grid).movedim(-1, -3)

    def describe(self) -> str:
        """E.g. ``nlc 14x14 (+1 prefix token)``."""
        text = f"{self.kind} {self.grid[0]}x{self.grid[1]}"
        if self.kind == "nlc" and self.prefix:
            text += f" (+{self.prefix} prefix token{'s' if self.prefix > 1 else ''})"
        return text

    def to_config(self) -> dict:
        """The handler config keys that pin this layout (see :class:`LayoutSpec`)."""
        if self.kind == "nlc":
            return {"layout": "nlc", "prefix_tokens": self.prefix, "grid": list(self.grid)}
        return {"layout": self.kind, "prefix_tokens": None, "grid": None}


@dataclass(frozen=True)
class LayoutSpec:
    """What the user pinned: ``kind`` (``auto`` or a layout), ``prefix`` tokens, ``grid``.

    ``None`` leaves a value to detection.

    Raises:
        ValueError: for an unknown kind, a negative prefix, a bad grid, or a prefix with a
            layout that has none.
    """

    kind: str = "auto"
    prefix: int | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be auto, {', '.join(LAYOUTS)}; got '{self.kind}'")
        if self.prefix is not None and (isinstance(self.prefix, bool) or not isinstance(self.prefix, int)
                                        or self.prefix < 0):
            raise ValueError(f"prefix tokens must be an integer >= 0, got {self.prefix!r}")
        if self.prefix and self.kind in ("nchw", "nhwc"):
            raise ValueError(f"prefix tokens apply to the nlc layout, not {self.kind}")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or not all(isinstance(v, int) and v > 0 for v in grid) or grid[0] * grid[1] < 2:
                raise ValueError(f"grid must be two positive integers H W (more than one cell), got {self.grid!r}")
            object.__setattr__(self, "grid", grid)


@dataclass(frozen=True)
class ModelHints:
    """What a model says about its layouts at one input size.

    Attributes:
        input_size: ``(H, W)`` the model sees.
        prefix: prefix tokens of token layers (timm ``num_prefix_tokens``; torchvision's ViT: 1).
        token_grid: patch grid of a plain ViT (every token layer uses it), or None.
        output_fmt: timm's ``output_fmt`` (``NHWC`` for Swin...), upper case, or None.
        feature_modules: timm ``feature_info`` module names, shallow to deep.
    """

    input_size: tuple[int, int]
    prefix: int = 0
    token_grid: tuple[int, int] | None = None
    output_fmt: str | None = None
    feature_modules: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_model(cls, model: nn.Module, input_size: tuple[int, int], spec: LayoutSpec | None = None) -> ModelHints:
        """Read the hints from timm's and torchvision's attributes; ``spec`` overrides them."""
        size = (int(input_size[0]), int(input_size[1]))
        prefix, grid = 0, None
        timm_prefix = getattr(model, "num_prefix_tokens", None)
        patch_embed = getattr(model, "patch_embed", None)
        if isinstance(timm_prefix, int) and not isinstance(timm_prefix, bool):
            prefix = timm_prefix
            if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
                grid = tuple(int(v) for v in patch_embed.dynamic_feat_size(size))
            elif getattr(patch_embed, "grid_size", None) is not None:
                grid = tuple(int(v) for v in patch_embed.grid_size)
        elif _is_torchvision_vit(model):
            prefix = 1  # torchvision's VisionTransformer prepends one class token
            grid = (size[0] // model.patch_size, size[1] // model.patch_size)
        else:
            prefix = token_parameters(model)
        fmt = getattr(model, "output_fmt", None)
        fmt = str(getattr(fmt, "value", fmt)).upper() if fmt is not None else None
        info = getattr(model, "feature_info", None)
        modules = tuple(str(f["module"]) for f in info if isinstance(f, dict) and f.get("module")) \
            if isinstance(info, list) else ()
        hints = cls(size, prefix, grid, fmt, modules)
        if spec is not None:
            if spec.prefix is not None:
                hints = replace(hints, prefix=spec.prefix)
            if spec.grid is not None:
                hints = replace(hints, token_grid=spec.grid)
        return hints


_TOKEN_PARAM = re.compile(r"(?:^|\.)(cls|class|dist|reg|register)_tokens?(?:_?\d+)?$")


def token_parameters(model: nn.Module) -> int:
    """Prefix tokens a model holds as parameters (``cls_token``, ``dist_token``, ``reg_token``
    of shape ``(1, k, C)``), for models that do not say ``num_prefix_tokens``. Numbered copies
    count once: CoaT's ``cls_token1..4`` (one per stage) and CrossViT's ``cls_token_0/1`` (one per
    branch) each put one class token before their stage's or branch's patch tokens."""
    kinds: dict[str, int] = {}
    for name, p in model.named_parameters():
        match = _TOKEN_PARAM.search(name)
        if match is None or p.dim() not in (2, 3) or (p.dim() == 3 and p.shape[0] != 1):
            continue
        kind = match.group(1)
        kinds[kind] = max(kinds.get(kind, 0), int(p.shape[-2]))
    return sum(kinds.values())


def _is_torchvision_vit(model: nn.Module) -> bool:
    # Duck-typed (subclasses and copies count), so that torchvision is never imported for it.
    return all(hasattr(model, a) for a in ("conv_proj", "class_token", "patch_size", "encoder"))


def _fits(h: int, w: int, size: tuple[int, int]) -> bool:
    """``(h, w)`` is the input divided by one reduction ``r``, rounded either way per axis:
    some ``r`` with ``H / r`` in ``(h - 1, h + 1)`` and ``W / r`` in ``(w - 1, w + 1)``."""
    height, width = size
    if h < 1 or w < 1 or h * w < 2 or h > height or w > width:
        return False
    return (h - 1) / height < (w + 1) / width and (w - 1) / width < (h + 1) / height


def _token_grid(count: int, size: tuple[int, int]) -> tuple[int, int] | list[tuple[int, int]] | None:
    """The grid of ``count`` patch tokens at input ``size``: the factorisation whose aspect
    matches the input's; the two grids if two match equally well, None if none does."""
    height, width = size
    options = sorted(
        (abs(h / height - (count // h) / width), h, count // h)
        for h in range(1, count + 1) if count % h == 0 and _fits(h, count // h, size)
    )
    if not options:
        return None
    if len(options) > 1 and options[1][0] - options[0][0] < 1e-12:
        return [(h, w) for _, h, w in options[:2]]
    return options[0][1], options[0][2]


def classify(shape: tuple[int, ...], batch: int, hints: ModelHints,
             spec: LayoutSpec = LayoutSpec()) -> tuple[Layout | None, str]:
    """The layout of an output of ``shape`` for a batch of ``batch`` inputs.

    Returns:
        ``(layout, "")``, or ``(None, why)`` when the output is no map or its layout is
        ambiguous (``why`` then starts with ``ambiguous``).
    """
    if len(shape) not in (3, 4) or shape[0] != batch:
        return None, "not a map"
    size = hints.input_size
    found: list[Layout] = []
    if len(shape) == 4:
        for kind, (h, w) in (("nchw", shape[2:]), ("nhwc", shape[1:3])):
            if spec.kind not in ("auto", kind):
                continue
            if (spec.grid is None and _fits(h, w, size)) or spec.grid == (h, w):
                found.append(Layout(kind, (h, w)))
        if len(found) == 2:
            preferred = {"NHWC": "nhwc", "NCHW": "nchw"}.get(hints.output_fmt or "", spec.kind)
            found = [lay for lay in found if lay.kind == preferred]
            if not found:
                return None, (f"ambiguous: {shape[1]}x{shape[2]}x{shape[3]} reads as NCHW or NHWC; "
                              "pass --layout nchw or --layout nhwc")
    elif spec.kind in ("auto", "nlc"):
        length = shape[1]
        prefixes = [spec.prefix] if spec.prefix is not None else list(dict.fromkeys((hints.prefix, 0)))
        token_grid = spec.grid or hints.token_grid
        for k in prefixes:
            count = length - k
            if count < 2:
                continue
            if token_grid is not None:
                if token_grid[0] * token_grid[1] == count:
                    found.append(Layout("nlc", token_grid, k))
                    break
                continue
            grid = _token_grid(count, size)
            if isinstance(grid, list):
                grids = " or ".join(f"{h}x{w}" for h, w in grid)
                flags = " or ".join(f"--grid {h} {w}" for h, w in grid)
                return None, f"ambiguous: {count} tokens could be a {grids} grid; pass --layout nlc " \
                             f"--prefix-tokens {k} {flags}"
            if grid is not None:
                found.append(Layout("nlc", grid, k))
                break
        if not found and spec.prefix is None and hints.prefix == 0 and token_grid is None:
            # Tokens of a model that declares no prefix tokens, which fit a grid after a few:
            # a class token the model does not tell about (a ViT of one's own).
            for k in range(1, _MAX_PREFIX + 1):
                grid = _token_grid(length - k, size) if length - k >= 2 else None
                if isinstance(grid, tuple):
                    return None, (f"ambiguous: {length} tokens fit a {grid[0]}x{grid[1]} grid after {k} "
                                  f"prefix token{'s' if k > 1 else ''} the model does not declare (it holds "
                                  "none as a cls_token parameter); "
                                  f"pass --layout nlc --prefix-tokens {k} (or --prefix-tokens 0 if none is one)")
    if not found:
        return None, "not a map"
    return found[0], ""


def infer_layout(shape: tuple[int, ...], hints: ModelHints, spec: LayoutSpec = LayoutSpec(),
                 name: str = "target layer") -> Layout:
    """The layout of one layer's output, or an error that says what to pass.

    Raises:
        ValueError: if the output is no map in any layout at this input size, or ambiguous.
    """
    layout, why = classify(tuple(shape), shape[0], hints, spec)
    if layout is not None:
        return layout
    h, w = hints.input_size
    if why.startswith("ambiguous"):
        what, flags = why[len("ambiguous: "):].split("; pass ")
        raise ValueError(f"{name} outputs {tuple(shape)}, {what}: pass the layout: {flags}")
    pinned = f" as {spec.kind}" if spec.kind != "auto" else ""
    raise ValueError(
        f"{name} outputs {tuple(shape)}, which is no map{pinned} of a {h}x{w} input: expected "
        f"(N, C, h, w), (N, h, w, C) or (N, {hints.prefix} prefix + h*w tokens, C) with h:w = {h}:{w}; "
        "choose another layer (--list-layers) or pass --layout, --prefix-tokens and --grid"
    )


# --------------------------------------------------------------------------- the probe


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters stop requiring grad inside the block; their flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class LayerInfo:
    """One module as the probe saw it.

    Attributes:
        name: dotted module name.
        type: module class name.
        shape: output shape for one image.
        order: position in execution order (a container follows its children).
        layout: the map's layout, or None (``note`` says why).
        note: why the module cannot be the automatic target; empty for a candidate.
        live: its patch positions receive a non-zero gradient of the top class.
        flat: its Grad-CAM map (before the ReLU) is constant on the probe's random images.
        stage: a module of the model's feature hierarchy (timm ``feature_info``).
        source: the first module that returned this output tensor (a container returns its
            last child's).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    order: int
    layout: Layout | None = None
    note: str = ""
    live: bool | None = None
    flat: bool | None = None
    stage: bool = False
    source: str = ""

    @property
    def candidate(self) -> bool:
        """A map in a known layout that the picker may consider (gradient aside)."""
        return self.layout is not None and not self.note

    @property
    def usable(self) -> bool:
        """A candidate whose map means something: live gradient, not constant."""
        return self.candidate and bool(self.live) and not self.flat


# Attention modules by class (``Attention``, ``WindowAttention``, CaiT's ``ClassAttn`` and
# ``TalkingHeadAttn``, CoaT's ``FactorAttnConvRelPosEnc``), except blocks that hold one
# (``SelfAttnBlock``); and by attribute name, for modules of one's own.
_ATTN_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_BLOCK_CLASS = re.compile(r"block", re.IGNORECASE)
_ATTN_NAMES = frozenset({
    "attn", "attention", "self_attn", "self_attention", "cross_attn", "cross_attention", "mha",
    "q", "k", "v", "qk", "kv", "qkv", "q_proj", "k_proj", "v_proj", "qkv_proj", "in_proj", "attn_drop",
    "q_norm", "k_norm",
})


def _internals(model: nn.Module) -> set[str]:
    """Names of attention modules and everything inside them (q/k/v and their norms, attn_drop,
    proj...): their outputs are branches and head-split tensors, never the model's map."""
    roots = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and ("attention" in kind.lower() or (_ATTN_CLASS.search(kind) and not _BLOCK_CLASS.search(kind))
                     or name.rsplit(".", 1)[-1].lower() in _ATTN_NAMES):
            roots.append(name)
    return {n for n, _ in model.named_modules() if any(n == r or n.startswith(r + ".") for r in roots)}


def _is_view_of(output: Tensor, source: object) -> bool:
    """``output`` only re-indexes ``source``'s memory (a permute or reshape module)."""
    if not isinstance(source, Tensor) or output.numel() != source.numel() or output.device != source.device:
        return False
    return output.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def flat_maps(activation: Tensor, grad: Tensor) -> bool:
    """Grad-CAM maps (before the ReLU) of ``(N, C, h, w)`` inputs that are constant for every
    image, including all-zero ones."""
    dtype = torch.promote_types(activation.dtype, torch.float32)
    a, g = activation.to(dtype), grad.to(dtype)
    cam = torch.einsum("nc,nchw->nhw", g.mean(dim=(2, 3)), a).flatten(1)
    spread = cam.amax(dim=1) - cam.amin(dim=1)
    return bool((spread <= _FLAT * cam.abs().amax(dim=1)).all())


def probe_layers(model: nn.Module, input_size: tuple[int, int], spec: LayoutSpec = LayoutSpec(),
                 *, batch: int = 2, seed: int = 0) -> list[LayerInfo]:
    """Every module's output, layout and gradient in one forward and one gradient pass.

    The input is seeded noise; the score is each image's top class. Gradients are taken with
    ``torch.autograd.grad`` with respect to the input only: no parameter's ``.grad`` changes.

    Args:
        model: the classifier, in eval mode.
        input_size: ``(H, W)`` it is served at.
        spec: layout overrides (``--layout``, ``--prefix-tokens``, ``--grid``).
        batch: probe images; more than one tells per-image tensors from window batches.
        seed: seed of the noise.

    Returns:
        A :class:`LayerInfo` per module whose output is a tensor, in execution order.

    Raises:
        ValueError: if the model does not return ``(N, num_classes)`` logits.
    """
    hints = ModelHints.from_model(model, input_size, spec)
    internal = _internals(model)
    stages = set(hints.feature_modules)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 3, *hints.input_size), generator=gen).to(device, dtype)
    infos: dict[str, LayerInfo] = {}
    tensors: dict[str, tuple[Tensor, int]] = {}  # name -> (activation, its version)
    grads: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    outputs: dict[int, tuple[str, Tensor]] = {}  # id -> first module and the tensor (kept alive)
    handles = []

    def _recorder(name: str, module: nn.Module):
        def _hook(_module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1 or not isinstance(output, Tensor):
                return
            source = outputs.setdefault(id(output), (name, output))[0]
            info = LayerInfo(name, type(module).__name__, (1, *output.shape[1:]), len(infos),
                             stage=name in stages, source=source)
            info.layout, info.note = classify(tuple(output.shape), batch, hints, spec)
            if name in internal:
                info.note = "inside attention"
            elif info.layout is not None:
                if isinstance(module, nn.Identity) or any(output is i for i in inputs):
                    info.note = "pass-through"
                elif any(_is_view_of(output, i) for i in inputs):
                    info.note = "view of its input"
            infos[name] = info
            if info.candidate:
                tensors[name] = (output.detach(), output._version)
                if output.requires_grad:
                    output.register_hook(lambda g, n=name: grads.__setitem__(n, g))

        return _hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(_recorder(name, module)))
        # Frozen: the gradient reaches the input only, and nothing the model caches in its
        # forward (LeViT's attention biases) keeps a graph.
        with torch.inference_mode(False), torch.enable_grad(), frozen(model):
            x.requires_grad_(True)
            logits = model(x)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"the model must return (N, num_classes) logits, got {shape}")
            score = logits.float().max(dim=1).values.sum()
            torch.autograd.grad(score, x, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    # Class-attention blocks (CaiT's blocks_token_only, CrossViT's fusion) take the patch tokens
    # and return the class token alone: a map inside one is that block's branch, which the later
    # blocks and the rest of the model never see; the patch tokens before it feed them all.
    token_only = [n for n, i in infos.items() if len(i.shape) == 3 and 1 <= i.shape[1] <= max(hints.prefix, 1)]
    for name, info in infos.items():
        if info.candidate and any(name.startswith(r + ".") for r in token_only):
            info.note = "inside a class-attention block"
    for name, info in infos.items():
        if calls[name] > 1 and not info.note:
            info.note = "runs more than once"
        if not info.candidate or name not in tensors:
            continue
        grad = grads.get(name)
        if grad is None:
            info.live, info.flat = False, True
            continue
        activation, version = tensors[name]
        g = info.layout.to_nchw(grad)
        info.live = bool((g != 0).any())
        # An in-place op after the layer (ReLU(inplace=True)) changed the kept activation: its
        # map cannot be judged here (the container around both holds the final values).
        changed = activation._version != version
        info.flat = not info.live or (not changed and flat_maps(info.layout.to_nchw(activation), g))
    return sorted(infos.values(), key=lambda i: i.order)


def list_layers(model: nn.Module, example: Tensor, spec: LayoutSpec = LayoutSpec()) -> list[LayerInfo]:
    """Candidate target layers: maps in a known layout that are no attention internal,
    pass-through or repeated module, in execution order, dead ones included.

    Args:
        model: the classifier, in eval mode.
        example: an input batch of the served size (only its size is used).
        spec: layout overrides.
    """
    return [i for i in probe_layers(model, tuple(example.shape[2:]), spec) if i.candidate]


def pick_layer(infos: list[LayerInfo], hints: ModelHints) -> LayerInfo:
    """The automatic target among probed layers.

    The last usable candidate (live gradient, map not constant) on the grid of the model's
    deepest feature stage (timm ``feature_info``; the last usable candidate when the model has
    none). When a feature stage's module returns that very map (ConvNeXt's ``stages.3`` inside
    the ``stages`` container), the stage is returned: same map, the model's own name for it.

    Raises:
        ValueError: if no layer is usable, or a later layer's layout is ambiguous.
    """
    usable = [i for i in infos if i.usable]
    candidates = [i for i in infos if i.candidate]
    if candidates and not any(i.live for i in candidates):
        raise ValueError("the class score's gradient is zero at every layer: is the classifier head all zeros "
                         "(untrained; torchvision starts a ViT's head at zero)?")
    if not usable:
        dead = [i.name for i in candidates][-3:]
        hint = f" (the last maps, {', '.join(dead)}, get zero gradient or constant maps)" if dead else ""
        raise ValueError(f"no layer outputs a map that the class score depends on{hint}: "
                         "pass --target-layer and the layout")
    by_name = {i.name: i for i in infos}
    anchor = next((by_name[m] for m in reversed(hints.feature_modules)
                   if m in by_name and by_name[m].layout is not None), None)
    same = [i for i in usable if anchor is not None and i.layout.grid == anchor.layout.grid]
    choice = (same or usable)[-1]
    later = [i for i in infos if i.order > choice.order and i.note.startswith("ambiguous")]
    if later:
        why = later[-1].note.replace("; pass ", ": pass the layout: ")
        raise ValueError(f"layer '{later[-1].name}' {later[-1].shape}: {why}; or "
                         f"--target-layer {choice.name} (the last usable map before it, no layout flag needed)")
    return next((i for i in infos if i.stage and i.source == choice.source), choice)


def find_target_layer(model: nn.Module, example: Tensor, spec: LayoutSpec = LayoutSpec()) -> str:
    """The automatic target layer's name (one probe forward and gradient pass).

    Raises:
        ValueError: if no module outputs a usable map at this input size.
    """
    return auto_target(model, tuple(example.shape[2:]), spec)[0]


def auto_target(model: nn.Module, input_size: tuple[int, int],
                spec: LayoutSpec = LayoutSpec()) -> tuple[str, Layout]:
    """The automatic target layer's name and layout (see :func:`pick_layer`).

    Raises:
        ValueError: if no module outputs a usable map at this input size.
    """
    infos = probe_layers(model, input_size, spec)
    choice = pick_layer(infos, ModelHints.from_model(model, input_size, spec))
    return choice.name, choice.layout


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted name, or an error that lists the closest names.

    Raises:
        ValueError: if ``name`` names no module of ``model``.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(f"target layer '{name}' is not a module of {type(model).__name__}{hint}")


def layer_layout(model: nn.Module, name: str, example: Tensor, spec: LayoutSpec = LayoutSpec()) -> Layout:
    """The layout of a named layer's output at the example's size (one no-grad forward).

    Raises:
        ValueError: if the layer does not run, outputs no tensor, or no map in any layout.
    """
    layer = resolve_layer(model, name)
    seen: list = []
    handle = layer.register_forward_hook(lambda _m, _i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(example)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"target layer '{name}' did not run in the forward pass")
    if not isinstance(seen[0], Tensor):
        raise ValueError(f"target layer '{name}' outputs {type(seen[0]).__name__}, not a tensor")
    hints = ModelHints.from_model(model, tuple(example.shape[2:]), spec)
    return infer_layout(tuple(seen[0].shape), hints, spec, name=f"target layer '{name}'")
