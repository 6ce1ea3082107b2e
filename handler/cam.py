"""Batched Grad-CAM engine, pure torch.

One forward for the whole batch in which autograd records only the head above the target layer,
one ``torch.autograd.grad`` per batch (per round of targets), the CAM methods computed from the
same activations and gradients, and the post-processing (normalisation, upsampling into each
image's frame, colour map, blending) done on the model's device.

The target layer's output may be NCHW, NHWC or tokens (:mod:`handler.layouts`, decided once when
the engine is built): activation and gradient are brought to ``(N, C, h, w)`` by the same views
before any CAM method, so the maths below knows no layout.

Nothing here imports TorchServe or PIL: the glue decodes requests and encodes responses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handler.buckets import bucket_for, pad_batch

# The layer picker and the layouts live beside the engine; re-exported for callers of the engine.
from handler.layouts import (
    Layout,
    LayoutSpec,
    ModelHints,
    auto_target,
    find_target_layer,
    frozen,
    infer_layout,
    layer_layout,
    list_layers,
    resolve_layer,
)
from handler.vocab import CAM_METHODS

__all__ = [
    "METHODS",
    "CamEngine",
    "CamPass",
    "Frames",
    "frozen",
    "Layout",
    "LayoutSpec",
    "list_layers",
    "find_target_layer",
    "resolve_layer",
    "cam_weights",
    "compute_cams",
    "jet_lut",
    "normalize_maps",
    "upsample_maps",
    "to_uint8",
    "blend",
    "to_host",
    "device_tensor",
    "device_index",
    "eager_module",
]

METHODS = CAM_METHODS  # one unit per name in cam_weights
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_EPS = 1e-7


# --------------------------------------------------------------------------- the pass


def _make_leaf(store: dict, output) -> Tensor:
    """The layer's output made a leaf that requires grad, kept in ``store``; a clone goes on.

    The backbone below the layer runs with grad off (:func:`_forward`); it is switched on here,
    for the head above the layer, and :func:`_forward` switches it back when the model returns.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"target layer outputs {type(output).__name__}, not a tensor")
    if "activation" in store:
        raise RuntimeError("target layer runs more than once per forward: choose a module used once")
    torch.set_grad_enabled(True)
    leaf = output.detach().requires_grad_(True)
    store["activation"] = leaf
    return leaf.clone()


@contextmanager
def _leaf_at(layer: nn.Module, store: dict) -> Iterator[None]:
    """Re-make the layer's output a leaf that requires grad, so autograd records only the head.

    The leaf is kept as the activation; the model continues on a clone of it, which keeps
    in-place ops after the layer (``ReLU(inplace=True)``, ``out += identity``) legal and the
    activation unmodified.
    """

    def _hook(_module, _inputs, output):
        return _make_leaf(store, output)

    handle = layer.register_forward_hook(_hook)
    try:
        yield
    finally:
        handle.remove()


def eager_module(model: nn.Module) -> nn.Module:
    """The plain module under a ``torch.compile`` wrapper (and :mod:`handler.compiled`'s frozen one)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "compiled", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class LeafCapture(nn.Module):
    """The target layer of a compiled model, wrapped: it runs the layer, then makes the leaf.

    ``torch.compile`` does not run forward hooks of modules nested in containers (a ViT's
    ``blocks.11.norm1`` never calls its hook under compile), so a compiled model gets this module
    in the layer's place instead of a hook. The leaf is made outside the graphs
    (``torch._dynamo.disable``): the graph breaks there, as it does at a hook.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.store: dict | None = None
        self.passthrough = False
        self._leaf = torch._dynamo.disable(self._make)

    def _make(self, output):
        if self.passthrough:  # an attention pass on the eager model needs the whole graph
            return output
        if self.store is None:
            raise RuntimeError("LeafCapture ran outside a Grad-CAM forward")
        return _make_leaf(self.store, output)

    def forward(self, *args, **kwargs):
        return self._leaf(self.layer(*args, **kwargs))

    @contextmanager
    def passing(self) -> Iterator[None]:
        """The layer's output goes on unchanged inside the block (handler.attention_cam's eager pass)."""
        self.passthrough = True
        try:
            yield
        finally:
            self.passthrough = False


@contextmanager
def _captured_by(capture: LeafCapture, store: dict) -> Iterator[None]:
    capture.store = store
    try:
        yield
    finally:
        capture.store = None


@dataclass
class CamPass:
    """What one forward leaves: logits (graph above the target layer only) and the activation."""

    logits: Tensor
    activation: Tensor

    def gradients(self, rows: Sequence[Tensor], classes: Sequence[Tensor], batched: bool) -> Tensor:
        """d(score)/d(activation) for rounds of (image row, class) targets.

        Args:
            rows: per round, the image rows that have a target in it.
            classes: per round, the class of each of those rows.
            batched: one vmapped gradient pass for all rounds instead of one pass per round.

        Returns:
            ``(rounds, *activation shape)`` gradients, in the layer's own layout; rows without a
            target in a round are zero.
        """
        rounds = len(rows)
        if rounds == 0:
            return self.activation.new_zeros((0, *self.activation.shape))
        try:
            if batched and rounds > 1:
                # One-hot seeds by a scatter of flat indices. Not ``seed[r, row, cls] = 1.0``:
                # on CUDA that index_put_ copies its value from a host scalar and waits for the
                # device (found by tests/test_cam_cuda.py's sync-debug tests on an H200).
                n, num_classes = self.logits.shape
                flat = torch.cat([(r * n + row) * num_classes + cls
                                  for r, (row, cls) in enumerate(zip(rows, classes, strict=True))])
                seed = self.logits.new_zeros((rounds, n, num_classes))
                seed.view(-1).scatter_(0, flat, 1.0)
                (grads,) = torch.autograd.grad(
                    self.logits, self.activation, grad_outputs=seed, is_grads_batched=True
                )
                return grads
            grads = []
            for r, (row, cls) in enumerate(zip(rows, classes, strict=True)):
                score = self.logits[row, cls].sum()
                (grad,) = torch.autograd.grad(
                    score, self.activation, retain_graph=r < rounds - 1, allow_unused=False
                )
                grads.append(grad)
            return grads[0][None] if rounds == 1 else torch.stack(grads)
        except RuntimeError as exc:
            if "does not require grad" in str(exc) or "not have been used" in str(exc):
                raise RuntimeError("target score is not connected to the target layer") from exc
            raise


def _forward(model: nn.Module, layer: nn.Module, x: Tensor, autocast: torch.dtype | None,
             capture: LeafCapture | None = None) -> CamPass:
    store: dict = {}
    leaf_at = _leaf_at(layer, store) if capture is None else _captured_by(capture, store)
    # Grad is off below the target layer and on above it (the leaf switches it on): a compiled
    # backbone is then an inference graph, which inductor can freeze (handler.compiled);
    # ``no_grad`` puts the caller's grad mode back on the way out.
    with torch.inference_mode(False), torch.no_grad(), leaf_at:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(x)
    if "activation" not in store:
        raise RuntimeError("target layer did not run in the forward pass")
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise RuntimeError("the model must return (N, num_classes) logits")
    return CamPass(logits=logits, activation=store["activation"])


def cam_weights(method: str, activation: Tensor, grad: Tensor) -> Tensor:
    """Raw class activation maps ``(P, H, W)``, ReLU applied, from ``(P, C, H, W)`` inputs.

    - Grad-CAM (Selvaraju et al., 2017): ``alpha_k = mean_hw(dy/dA_k)``,
      ``L = relu(sum_k alpha_k A_k)``.
    - Grad-CAM++ (Chattopadhyay et al., 2018): ``alpha_k = sum_hw relu(g) * g^2 /
      (2 g^2 + sum_hw(A_k) g^3)``.
    - XGrad-CAM (Fu et al., 2020): ``alpha_k = sum_hw(g * A_k) / sum_hw(A_k)``.
    - LayerCAM (Jiang et al., 2021): ``L = relu(sum_k relu(g) * A_k)``.
    - HiResCAM (Draelos & Carin, 2020): ``L = relu(sum_k g * A_k)``.

    The maths runs in fp32 for fp32, bf16 and fp16 activations (in fp64 for fp64 ones).

    Raises:
        ValueError: for an unknown method.
    """
    dtype = torch.promote_types(activation.dtype, torch.float32)
    a = activation.to(dtype)
    g = grad.to(dtype)
    if method == "gradcam":
        cam = torch.einsum("pc,pchw->phw", g.mean(dim=(2, 3)), a)
    elif method == "hirescam":
        cam = (g * a).sum(dim=1)
    elif method == "layercam":
        cam = (g.clamp(min=0) * a).sum(dim=1)
    elif method == "xgradcam":
        weights = (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + _EPS)
        cam = torch.einsum("pc,pchw->phw", weights, a)
    elif method == "gradcam++":
        g2 = g.pow(2)
        denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6
        aij = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
        weights = (g.clamp(min=0) * aij).sum(dim=(2, 3))
        cam = torch.einsum("pc,pchw->phw", weights, a)
    else:
        raise ValueError(f"unknown CAM method '{method}'; choose one of {', '.join(METHODS)}")
    return cam.clamp(min=0)


def compute_cams(
    model: nn.Module,
    target_layer: str | nn.Module,
    x: Tensor,
    targets: Sequence[int] | Tensor,
    method: str = "gradcam",
    layout: Layout | LayoutSpec | None = None,
) -> Tensor:
    """Raw maps ``(N, h, w)`` of one class per image for a caller's own model.

    The model's ``requires_grad`` flags are restored afterwards, hooks are removed and no
    parameter's ``.grad`` is touched.

    Args:
        layout: the target layer's layout; a :class:`LayoutSpec` or None detects it from the
            model and the activation's shape.

    Raises:
        ValueError: if ``targets`` does not hold one class per image, or the layout cannot be
            told.
    """
    targets = torch.as_tensor(targets, device=x.device).reshape(-1)
    if targets.numel() != x.shape[0]:
        raise ValueError("per-sample targets must match the batch size")
    layer = resolve_layer(model, target_layer) if isinstance(target_layer, str) else target_layer
    with frozen(model):
        cam_pass = _forward(model, layer, x, None)
        rows = torch.arange(x.shape[0], device=x.device)
        grads = cam_pass.gradients([rows], [targets], batched=False)
    if not isinstance(layout, Layout):
        spec = layout or LayoutSpec()
        hints = ModelHints.from_model(model, tuple(x.shape[2:]), spec)
        layout = infer_layout(tuple(cam_pass.activation.shape), hints, spec)
    return cam_weights(method, layout.to_nchw(cam_pass.activation.detach()), layout.to_nchw(grads[0]))


# --------------------------------------------------------------------------- post-processing


def jet_lut(device: torch.device | str = "cpu") -> Tensor:
    """The 'jet' colour map as a ``(256, 3)`` uint8 lookup table (no matplotlib needed)."""
    v = torch.linspace(0, 1, 256, device=device)
    rgb = torch.stack([1.5 - (4 * v - k).abs() for k in (3.0, 2.0, 1.0)], dim=1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class Frames:
    """Where each map goes: the output frame and the image's box inside the model input.

    All tensors have one row per map. ``size`` is ``(height, width)`` of the output frame;
    ``box`` is ``(x0, y0, x1, y1)`` of the image inside the model input, as fractions.
    """

    size: Tensor
    box: Tensor


def _sampling_grid(frames: Frames, height: int, width: int) -> Tensor:
    """grid_sample coordinates that map each frame pixel centre onto its image box."""
    dev = frames.box.device
    h = frames.size[:, 0:1].to(torch.float32)
    w = frames.size[:, 1:2].to(torch.float32)
    u = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5)[None] / w  # (P, W)
    v = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5)[None] / h  # (P, H)
    box = frames.box.to(torch.float32)
    gx = (box[:, 0:1] + u * (box[:, 2:3] - box[:, 0:1])) * 2 - 1
    gy = (box[:, 1:2] + v * (box[:, 3:4] - box[:, 1:2])) * 2 - 1
    return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)


def normalize_maps(cams: Tensor) -> Tensor:
    """Per-map min-max scaling into [0, 1] (as pytorch-grad-cam's ``scale_cam_image``)."""
    flat = cams.flatten(1)
    low = flat.amin(dim=1)[:, None, None]
    cams = cams - low
    return cams / (cams.flatten(1).amax(dim=1)[:, None, None] + _EPS)


def upsample_maps(maps: Tensor, frames: Frames, out_size: tuple[int, int] | None = None) -> Tensor:
    """Bilinear upsampling of ``(P, h, w)`` maps into each frame, padded to the largest.

    One ``grid_sample`` for all maps: equal to ``F.interpolate(..., mode="bilinear")`` per map
    when the box is the whole input, and it crops letterbox padding away otherwise.

    Args:
        maps: ``(P, h, w)`` maps.
        frames: each map's output frame and image box.
        out_size: ``(H, W)`` of the output, at least every frame's size. Pass it when the
            frames are known on the host: otherwise it is read back from ``frames.size``,
            which waits for the device.

    Returns:
        ``(P, H, W)`` float maps; pixels past a frame's own size are padding.
    """
    if out_size is None:
        out_size = tuple(int(v) for v in frames.size.amax(dim=0).tolist())
    height, width = out_size
    grid = _sampling_grid(frames, height, width)
    out = F.grid_sample(
        maps[:, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[:, 0]


def to_uint8(maps: Tensor) -> Tensor:
    """[0, 1] floats to uint8 grey levels."""
    return (maps * 255).round_().clamp_(0, 255).to(torch.uint8)


def blend(heat: Tensor, images: Tensor, lut: Tensor, alpha: float) -> Tensor:
    """Colour-map uint8 maps ``(P, H, W)`` and blend onto uint8 images ``(P, H, W, 3)``."""
    colour = lut[heat.long()].to(torch.float32)
    mixed = alpha * colour + (1 - alpha) * images.to(torch.float32)
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- the engine


class CamEngine:
    """The served model plus everything it needs per batch, set up once.

    Args:
        model: an image classifier returning ``(N, num_classes)`` logits.
        target_layer: dotted module name, or ``"auto"`` (needs ``input_size``).
        device: where the model runs.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        input_size: ``(height, width)`` the model sees.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; the CAM maths stays fp32).
        channels_last: use the channels-last memory format.
        batched_targets: one vmapped gradient pass for several classes per image instead of
            one pass per round of classes.
        layout: the target layer's output layout, ``auto``, ``nchw``, ``nhwc`` or ``nlc``.
        prefix_tokens: ``nlc``: tokens before the patch tokens (None: from the model).
        grid: ``(h, w)`` of the map (None: from the model and the output's shape).

    Raises:
        ValueError: for an unknown precision, target layer or layout, or a layer whose output
            is no map in the layout asked for.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str = "auto",
        *,
        device: torch.device | str = "cpu",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_size: tuple[int, int] = (224, 224),
        precision: str = "fp32",
        channels_last: bool = False,
        batched_targets: bool = True,
        layout: str = "auto",
        prefix_tokens: int | None = None,
        grid: Sequence[int] | None = None,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, not '{precision}'")
        self.device = torch.device(device)
        self.autocast = _PRECISIONS[precision]
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batched_targets = batched_targets
        self.input_size = tuple(input_size)
        # Set by handler.compiled for a compiled model: pad batches to these sizes, or mark the
        # batch dimension dynamic.
        self.batch_buckets: tuple[int, ...] | None = None
        self.dynamic_batch = False
        self.capture: LeafCapture | None = None
        # The served model is frozen once: its parameters never require grad.
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        # The layout is decided here, once: per batch only views run.
        spec = LayoutSpec(layout, prefix_tokens, tuple(grid) if grid is not None else None)
        if target_layer == "auto":
            target_layer, self.layout = auto_target(self.model, self.input_size, spec)
        else:
            self.layout = layer_layout(self.model, target_layer, self.example(), spec)
        self.target_layer = target_layer
        self.layer = resolve_layer(self.model, target_layer)
        self.lut = jet_lut(self.device)

    def example(self, batch: int = 1) -> Tensor:
        """A zero input batch at the served size (for dry runs), in the model's dtype."""
        param = next(self.model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros((batch, 3, *self.input_size), device=self.device, dtype=dtype)
        return x.contiguous(memory_format=self.memory_format)

    def prepare(self, pixels: Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` host pixels to the normalised device batch."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) * self.inv_std
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, x: Tensor) -> CamPass:
        """One forward in which autograd records only the head above the target layer.

        For a compiled model (:mod:`handler.compiled`) the batch is padded to its bucket size, or
        its size marked dynamic, so that no batch size compiles anew; ``logits`` then keep the
        batch's own rows and ``activation`` the padded ones.
        """
        n = x.shape[0]
        if self.batch_buckets:
            x = pad_batch(x, bucket_for(n, self.batch_buckets)).contiguous(memory_format=self.memory_format)
        elif self.dynamic_batch and n > 1:
            torch._dynamo.mark_dynamic(x, 0)
        cam_pass = _forward(self.model, self.layer, x, self.autocast, self.capture)
        if cam_pass.logits.shape[0] != n:
            cam_pass = CamPass(logits=cam_pass.logits[:n], activation=cam_pass.activation)
        return cam_pass

    def cams(
        self, cam_pass: CamPass, rows: Sequence[int] | Tensor, classes: Tensor, methods: Sequence[str]
    ) -> Tensor:
        """Raw maps ``(P, h, w)`` for P (image row, class, method) targets of one pass.

        Several targets may name the same image: they are split into rounds with at most one
        target per image, each round one gradient pass (or one vmapped pass for all rounds).

        Args:
            cam_pass: what :meth:`forward` returned.
            rows: the image row of each target. Pass a host sequence: a device tensor has to
                be read back first, which waits for the forward to finish.
            classes: the class of each target, a tensor on the model's device.
            methods: the CAM method of each target.

        Raises:
            ValueError: if ``rows``, ``classes`` and ``methods`` differ in length.
        """
        # Rounds are worked out on the host, where boolean masks on the device would wait for
        # the device once per round and once per method.
        host_rows = rows.tolist() if isinstance(rows, Tensor) else [int(r) for r in rows]
        count = len(host_rows)
        if classes.numel() != count or len(methods) != count:
            raise ValueError("rows, classes and methods must hold one entry per target")
        layout = self.layout
        activation = layout.to_nchw(cam_pass.activation.detach())
        if count == 0:
            return activation.new_zeros((0, *activation.shape[2:]), dtype=torch.float32)
        device = activation.device
        rows = device_index(host_rows, device)
        rounds, seen = [], {}
        for row in host_rows:
            rounds.append(seen.get(row, 0))
            seen[row] = rounds[-1] + 1
        if max(rounds) == 0:
            grads = layout.to_nchw(cam_pass.gradients([rows], [classes], self.batched_targets)[0])
            if host_rows == list(range(activation.shape[0])):
                g, a = grads, activation  # one target per image, in order: no gathers
            else:
                g, a = grads[rows], activation[rows]
        else:
            picks = [device_index([p for p, r in enumerate(rounds) if r == k], device)
                     for k in range(max(rounds) + 1)]
            grads = layout.to_nchw(cam_pass.gradients([rows[i] for i in picks], [classes[i] for i in picks],
                                                      self.batched_targets))
            g, a = grads[device_index(rounds, device), rows], activation[rows]
        kinds = sorted(set(methods))
        if len(kinds) == 1:
            return cam_weights(kinds[0], a, g)
        out = torch.empty((count, *a.shape[2:]), device=a.device,
                          dtype=torch.promote_types(a.dtype, torch.float32))
        for method in kinds:
            pick = device_index([p for p, m in enumerate(methods) if m == method], device)
            out[pick] = cam_weights(method, a[pick], g[pick])
        return out


def device_tensor(values, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """Host values (lists, tuples, numbers) as a tensor on ``device``, copied without waiting.

    ``torch.tensor(values, device=cuda)`` copies synchronously, which first waits for all the
    work queued on the device; built on the host and copied with ``non_blocking``, the copy
    just joins the queue.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def device_index(values: Sequence[int], device: torch.device | str) -> Tensor:
    """A host list of indices as a long tensor on ``device``, copied without waiting."""
    return device_tensor(list(values), device, torch.long)


def to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy a batch's device results to the host in one transfer.

    On an accelerator the tensors are packed into one byte buffer, copied once into pinned
    memory, and unpacked as views; on the CPU they are returned as they are.
    """
    first = next(iter(tensors.values()), None)
    if first is None or first.device.type == "cpu":
        return tensors
    parts, layout = [], []
    # Widest dtypes first keep every view's offset aligned to its element size.
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
        t = t.contiguous()
        parts.append(t.reshape(-1).view(torch.uint8))
        layout.append((name, t.dtype, t.shape, t.numel() * t.element_size()))
    packed = torch.cat(parts)
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    torch.cuda.current_stream(first.device).synchronize()
    out, offset = {}, 0
    for name, dtype, shape, nbytes in layout:
        out[name] = host[offset : offset + nbytes].view(dtype).reshape(shape)
        offset += nbytes
    return out
