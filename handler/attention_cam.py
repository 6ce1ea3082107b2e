"""Transformer-native explanations from attention probabilities, pure torch.

Chefer et al., 2021 ("Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers"): gradient-weighted attention rollout. Per block ``b``,
``A_bar_b = mean_heads(relu(dy/dA_b * A_b))`` and ``R = I``, ``R = R + A_bar_b @ R`` through the
blocks; the map is the readout row of ``R`` (the class token's, or the patch tokens' mean under
average pooling) at the patch tokens, on the patch grid.

The probabilities ``A_b`` exist only on the unfused attention path. Everything else serves with
fused attention (``F.scaled_dot_product_attention``): a batch is split (:func:`batch_pass`), the
requests that ask for an attention method run in a pass of their own with the attention modules
switched to the unfused path and a hook on each ``attn_drop`` (whose output is the probability
matrix), and both go back when the pass ends. The modules, the prefix tokens, the grid and the
readout are found once, when the model loads (:func:`attention_explainer`).

A compiled model (:mod:`handler.compiled`) keeps its graphs: the attention pass runs its eager
module, which the compiled graphs never see switched or hooked.

Nothing here imports TorchServe or PIL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from handler.cam import device_index, eager_module
from handler.layouts import ModelHints, _is_torchvision_vit
from handler.vocab import ATTENTION_METHODS

__all__ = [
    "ATTENTION_METHODS",
    "AttentionExplainer",
    "AttentionPass",
    "attention_explainer",
    "batch_pass",
    "chefer_maps",
]

_ROW_SUM_TOL = 1e-3  # attention rows are probabilities: they sum to 1


def chefer_maps(attentions: Sequence[Tensor], grads: Sequence[Tensor], readout: Tensor, prefix: int,
                grid: tuple[int, int]) -> Tensor:
    """Chefer et al. (2021) maps ``(P, h, w)`` from each block's probabilities and gradients.

    ``A_bar_b = mean_heads(relu(g_b * A_b))``; ``R = prod_b (I + A_bar_b)`` (last block leftmost);
    map ``= readout @ R`` at the patch tokens. The readout row is carried from the last block
    down (``v = v + v @ A_bar_b``): the same product as rolling ``R`` forward, one vector-matrix
    product per block instead of a matrix product.

    Args:
        attentions: per block, ``(P, heads, T, T)`` attention probabilities.
        grads: per block, the class score's gradient with respect to them, same shape.
        readout: ``(P, T)`` or ``(T,)`` weights of the tokens the head reads (the class token: a
            one-hot row).
        prefix: tokens before the patch tokens.
        grid: ``(h, w)`` of the patch tokens.
    """
    if len(attentions) != len(grads) or not attentions:
        raise ValueError("attentions and grads must hold one entry per block")
    first = attentions[0]
    dtype = torch.promote_types(first.dtype, torch.float32)  # fp32 maths under autocast, fp64 kept
    v = readout.to(first.device, dtype).expand(first.shape[0], first.shape[-1]).clone()
    for a, g in zip(reversed(attentions), reversed(grads), strict=True):
        a_bar = (g.to(dtype) * a.to(dtype)).clamp(min=0).mean(dim=1)
        v = v + torch.bmm(v[:, None], a_bar)[:, 0]
    return v[:, prefix:].unflatten(1, grid).clamp(min=0)


@dataclass(frozen=True)
class _Plan:
    """What is found once, at load: where the probabilities are, and how to read the map."""

    attention: tuple[str, ...]  # names of the attention modules, in block order
    prefix: int
    grid: tuple[int, int]
    readout: tuple[float, ...]  # weight of each token in the head's read-out


class AttentionPass:
    """What one attention forward leaves: the logits and every block's probabilities (graph kept)."""

    def __init__(self, logits: Tensor, attentions: list[Tensor], plan: _Plan, batched: bool) -> None:
        self.logits = logits
        self.attentions = attentions
        self._plan = plan
        self._batched = batched

    def cams(self, rows: Sequence[int], classes: Tensor, methods: Sequence[str] | None = None) -> Tensor:
        """Raw maps ``(P, h, w)`` of P (image row, class) targets; one gradient pass per round of
        classes (one target per image a round), or one vmapped pass for all rounds."""
        host_rows = [int(r) for r in rows]
        if methods is not None and any(m not in ATTENTION_METHODS for m in methods):
            raise ValueError(f"attention passes compute {', '.join(ATTENTION_METHODS)} only")
        count = len(host_rows)
        plan = self._plan
        device = self.logits.device
        if count == 0:
            dtype = torch.promote_types(self.logits.dtype, torch.float32)
            return torch.zeros((0, *plan.grid), device=device, dtype=dtype)
        rounds, seen = [], {}
        for row in host_rows:
            rounds.append(seen.get(row, 0))
            seen[row] = rounds[-1] + 1
        n, num_classes = self.logits.shape
        total = max(rounds) + 1
        flat = [(rnd * n + row) * num_classes for rnd, row in zip(rounds, host_rows, strict=True)]
        index = device_index(flat, device) + classes.reshape(-1).to(device)
        seed = self.logits.new_zeros((total, n, num_classes))
        seed.view(-1).scatter_(0, index, 1.0)
        try:
            if self._batched and total > 1:
                grads = torch.autograd.grad(self.logits, self.attentions, grad_outputs=seed, is_grads_batched=True)
            else:
                per_round = [torch.autograd.grad(self.logits, self.attentions, grad_outputs=seed[r],
                                                 retain_graph=r < total - 1) for r in range(total)]
                grads = [torch.stack(g) for g in zip(*per_round, strict=True)]
        except RuntimeError as exc:
            if "does not require grad" in str(exc) or "not have been used" in str(exc):
                raise RuntimeError("the class score is not connected to every attention block") from exc
            raise
        pick_round = device_index(rounds, device)
        pick_row = device_index(host_rows, device)
        attentions = [a.detach()[pick_row] for a in self.attentions]
        grads = [g[pick_round, pick_row] for g in grads]
        readout = torch.tensor(plan.readout)
        return chefer_maps(attentions, grads, readout, plan.prefix, plan.grid)


class AttentionExplainer:
    """Attention passes over one served model: its plan found once, its switch guarded by a lock.

    Build it with :func:`attention_explainer`, which checks the model first.

    Args:
        plan: what the load found.
        batched_targets: one vmapped gradient pass for several classes per image.
    """

    def __init__(self, plan: _Plan, batched_targets: bool = True) -> None:
        self.plan = plan
        self.batched_targets = batched_targets
        self.grid = plan.grid
        # One attention pass at a time per explainer: the unfused switch is the model's state.
        self._lock = threading.Lock()
        self._bound: tuple[nn.Module, list[nn.Module]] | None = None

    def _modules(self, model: nn.Module) -> list[nn.Module]:
        # Names were found at load; a model compiled in the background is another object, bound once.
        if self._bound is None or self._bound[0] is not model:
            self._bound = (model, [model.get_submodule(name) for name in self.plan.attention])
        return self._bound[1]

    @contextmanager
    def _unfused(self, model: nn.Module, store: list[Tensor]) -> Iterator[None]:
        """The attention modules on their unfused path, each ``attn_drop`` output kept; both undone."""
        modules = self._modules(model)
        flags = [m.fused_attn for m in modules]
        handles = []

        def _keep(_module, _inputs, output):
            store.append(output)

        try:
            for m in modules:
                m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(_keep))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, flag in zip(modules, flags, strict=True):
                m.fused_attn = flag

    def forward(self, engine, x: Tensor) -> AttentionPass:
        """One forward of ``engine``'s eager model with the probabilities on the graph.

        Args:
            engine: the :class:`handler.cam.CamEngine` (its precision and, compiled, its capture).
            x: the prepared batch.
        """
        model = eager_module(engine.model)
        store: list[Tensor] = []
        capture = engine.capture
        passthrough = capture.passing() if capture is not None else nullcontext()
        with self._lock, self._unfused(model, store), passthrough:
            with torch.inference_mode(False), torch.enable_grad():
                with torch.autocast(x.device.type, dtype=engine.autocast, enabled=engine.autocast is not None):
                    # The input requires grad (parameters never do), so the graph runs from the
                    # first block's attention to the logits.
                    logits = model(x.detach().requires_grad_(True))
        if len(store) != len(self.plan.attention):
            raise RuntimeError(f"{len(store)} attention probabilities for {len(self.plan.attention)} blocks")
        return AttentionPass(logits, store, self.plan, self.batched_targets)


def _readout(model: nn.Module, prefix: int, tokens: int) -> tuple[tuple[float, ...] | None, str]:
    """The weights of the tokens the head reads, or None and why it cannot be told."""
    if getattr(model, "attn_pool", None) is not None:
        return None, "its head pools the tokens with attention of its own (global_pool 'map')"
    pool = getattr(model, "global_pool", "token")
    weights = [0.0] * tokens
    if pool == "token":
        if prefix < 1:
            return None, "its head reads a class token but the model has none"
        reads = (0, 1) if getattr(model, "head_dist", None) is not None and prefix >= 2 else (0,)
        for t in reads:  # a distilled DeiT averages its class and distillation heads
            weights[t] = 1 / len(reads)
    elif pool == "avg":
        for t in range(prefix, tokens):
            weights[t] = 1 / (tokens - prefix)
    else:
        return None, f"its head pools the tokens with global_pool {pool!r}; token and avg are supported"
    return tuple(weights), ""


def attention_explainer(engine, batched_targets: bool | None = None) -> tuple[AttentionExplainer | None, str]:
    """The attention explainer of an engine's model, or None and why the model has none.

    Supported: timm's VisionTransformer family (ViT, DeiT, register tokens) and Eva, with class
    token or average pooling, whose grid is the engine's. One dry forward at load checks that
    every block hands its ``attn_drop`` a ``(N, heads, T, T)`` probability matrix.
    """
    model = eager_module(engine.model)
    name = type(model).__name__
    if _is_torchvision_vit(model):
        return None, ("torchvision's VisionTransformer computes attention in nn.MultiheadAttention with "
                      "need_weights=False, so its probabilities never exist; serve a timm ViT for "
                      f"{'/'.join(ATTENTION_METHODS)}")
    blocks = getattr(model, "blocks", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(blocks, nn.Module) or not isinstance(prefix, int) or not len(blocks):
        return None, (f"{'/'.join(ATTENTION_METHODS)} explains a transformer through its attention, and {name} "
                      "has no timm ViT/Eva attention blocks; use a gradient method (gradcam...)")
    names = []
    blocks_name = next(n for n, m in model.named_modules() if m is blocks)
    for i, block in enumerate(blocks):
        found = [n for n, m in block.named_modules() if hasattr(m, "fused_attn") and isinstance(
            getattr(m, "attn_drop", None), nn.Module)]
        if len(found) != 1:
            return None, f"block {i} of {name} has {len(found)} timm attention modules, not one"
        names.append(f"{blocks_name}.{i}.{found[0]}".replace("..", ".").rstrip("."))
    hints = ModelHints.from_model(model, engine.input_size)
    grid = hints.token_grid
    if grid is None:
        return None, f"the patch grid of {name} cannot be told at {engine.input_size}"
    if tuple(grid) != tuple(engine.layout.grid):
        return None, (f"the target layer's grid {engine.layout.grid} is not the patch grid {grid}: the maps of "
                      "one answer must share a grid")
    tokens = prefix + grid[0] * grid[1]
    readout, why = _readout(model, prefix, tokens)
    if readout is None:
        return None, f"{name}: {why}"
    plan = _Plan(tuple(names), prefix, (int(grid[0]), int(grid[1])), readout)
    explainer = AttentionExplainer(plan, engine.batched_targets if batched_targets is None else batched_targets)
    try:
        probe = explainer.forward(engine, engine.example())
    except RuntimeError as exc:
        return None, f"{name}'s attention modules do not hand their probabilities to attn_drop ({exc})"
    for a in probe.attentions:
        if a.dim() != 4 or a.shape[-2:] != (tokens, tokens) or not torch.allclose(
                a.detach().float().sum(dim=-1), torch.ones((), device=a.device), atol=_ROW_SUM_TOL):
            return None, f"{name}'s attn_drop does not receive ({tokens} x {tokens}) attention probabilities"
    return explainer, ""


# --------------------------------------------------------------------------- the split batch


class _EnginePass:
    """A batch with no attention request: the engine's pass as it is."""

    def __init__(self, engine, cam_pass) -> None:
        self.engine, self.cam_pass, self.logits = engine, cam_pass, cam_pass.logits

    def cams(self, rows: Sequence[int], classes: Tensor, methods: Sequence[str]) -> Tensor:
        return self.engine.cams(self.cam_pass, rows, classes, methods)


class _SplitPass:
    """A batch split in two: gradient methods on the engine (fused attention), attention methods in
    a pass of their own. ``logits`` in batch order; maps in target order."""

    def __init__(self, engine, explainer: AttentionExplainer, x: Tensor, attention_rows: list[int]) -> None:
        n = x.shape[0]
        self.engine = engine
        chosen = set(attention_rows)
        self.other_rows = [r for r in range(n) if r not in chosen]
        self.attention_rows = attention_rows
        self.where = {r: (False, i) for i, r in enumerate(self.other_rows)}
        self.where.update({r: (True, i) for i, r in enumerate(attention_rows)})
        device = x.device
        self.cam_pass = None
        parts, order = [], []
        if self.other_rows:
            self.cam_pass = engine.forward(x[device_index(self.other_rows, device)])
            parts.append(self.cam_pass.logits)
            order += self.other_rows
        self.attention = explainer.forward(engine, x[device_index(attention_rows, device)])
        parts.append(self.attention.logits)
        order += attention_rows
        inverse = [0] * n
        for i, r in enumerate(order):
            inverse[r] = i
        self.logits = torch.cat([p.detach() for p in parts])[device_index(inverse, device)]

    def cams(self, rows: Sequence[int], classes: Tensor, methods: Sequence[str]) -> Tensor:
        rows = [int(r) for r in rows]
        device = classes.device
        groups: dict[bool, list[int]] = {False: [], True: []}
        for p, r in enumerate(rows):
            groups[self.where[r][0]].append(p)
        parts, order = [], []
        for attention, picks in groups.items():
            if not picks:
                continue
            local = [self.where[rows[p]][1] for p in picks]
            sub = classes[device_index(picks, device)]
            if attention:
                parts.append(self.attention.cams(local, sub, [methods[p] for p in picks]))
            else:
                parts.append(self.engine.cams(self.cam_pass, local, sub, [methods[p] for p in picks]).float())
            order += picks
        if not parts:
            return torch.zeros((0, *self.attention._plan.grid), device=device)
        inverse = [0] * len(rows)
        for i, p in enumerate(order):
            inverse[p] = i
        return torch.cat(parts)[device_index(inverse, device)]


def batch_pass(engine, explainer: AttentionExplainer | None, x: Tensor, job_methods: Sequence[str]):
    """The batch's pass: the engine's alone, or split where some rows ask for an attention method.

    Args:
        engine: the serving :class:`handler.cam.CamEngine`.
        explainer: the model's attention explainer (None: no row may ask for an attention method).
        x: the prepared batch.
        job_methods: each row's ``cam_method``.

    Returns:
        An object with ``logits`` ``(N, classes)`` and ``cams(rows, classes, methods)``.
    """
    rows = [r for r, m in enumerate(job_methods) if m in ATTENTION_METHODS]
    if not rows:
        return _EnginePass(engine, engine.forward(x))
    if explainer is None:
        raise ValueError(f"{'/'.join(ATTENTION_METHODS)} asked of a model without an attention explainer")
    return _SplitPass(engine, explainer, x, rows)
