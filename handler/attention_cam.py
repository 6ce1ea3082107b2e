"""Transformer-native explanations from attention probabilities, pure torch.

``chefer``: Chefer et al., 2021 ("Generic Attention-model Explainability for Interpreting Bi-Modal
and Encoder-Decoder Transformers"): gradient-weighted attention rollout. Per block ``b``,
``A_bar_b = mean_heads(relu(dy/dA_b * A_b))`` and ``R = I``, ``R = R + A_bar_b @ R`` through the
blocks; the map is the readout row of ``R`` (the class token's, or the patch tokens' mean under
average pooling) at the patch tokens, on the patch grid.

``legrad``: Bousselham et al., ICCV 2025 ("LeGrad: An Explainability Method for Vision Transformers
via Feature Formation Sensitivity"). Per block ``l``, the model's own head (final norm, pooling,
classifier) applied to that block's output tokens gives a class score ``s_l`` (``s_L`` is the
logit); the map is ``sum_l mean_{heads, query tokens}(relu(ds_l/dA_l))`` at the patch tokens, over
the last :data:`LEGRAD_BLOCKS` blocks (the authors' released default, ``LeWrapper(layer_index=-2)``:
the head was trained on the last block's tokens only, and on the ground-truth ViT of
docs/performance.md every block summed points less often than the last two). The gradient is the
signal itself, not weighted by ``A``; each ``s_l`` reaches ``A_l`` through block ``l`` alone.

The probabilities ``A_b`` exist only on the unfused attention path. Everything else serves with
fused attention (``F.scaled_dot_product_attention``): a batch is split (:func:`batch_pass`), the
requests that ask for an attention method run in a pass of their own with the attention modules
switched to an unfused path, and they go back when the pass ends:

- timm (ViT, DeiT, Eva): each module's ``fused_attn`` off and a hook on its ``attn_drop``, whose
  output is the probability matrix;
- torchvision's ViT: its ``nn.MultiheadAttention`` modules never hand out probabilities a gradient
  can reach (``need_weights=False``, and with weights on they return a copy off the graph), so
  each one's ``forward`` is, for the pass, :func:`_explicit_attention`: the same projections and
  softmax written out, with the probabilities kept. At load a dry pass checks that this path
  gives the model's own logits.

The modules, the prefix tokens, the grid and the readout are found once, when the model loads
(:func:`attention_explainer`).

A compiled model (:mod:`handler.compiled`) keeps its graphs: the attention pass runs its eager
module, which the compiled graphs never see switched or hooked.

Nothing here imports TorchServe or PIL.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handler.cam import device_index, eager_module
from handler.layouts import ModelHints, _is_torchvision_vit
from handler.vocab import ATTENTION_METHODS

__all__ = [
    "ATTENTION_METHODS",
    "LEGRAD_BLOCKS",
    "AttentionExplainer",
    "AttentionPass",
    "attention_explainer",
    "attention_refusal",
    "batch_pass",
    "chefer_maps",
]

_ROW_SUM_TOL = 1e-3  # attention rows are probabilities: they sum to 1
#: The last blocks whose gradients legrad sums (the LeGrad authors' default, layer_index=-2).
LEGRAD_BLOCKS = 2
# torchvision's explicit attention path against the model's own logits, relative to their range
_LOGITS_TOL = 1e-3
_LOGITS_TOL_HALF = 5e-2  # under bf16/fp16 autocast


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
    kind: str = "timm"  # "timm": fused_attn and attn_drop; "torchvision": nn.MultiheadAttention
    legrad_blocks: tuple[str, ...] = ()  # names of the blocks whose outputs legrad reads, in order


def _explicit_attention(module: nn.MultiheadAttention, store: list[Tensor], query: Tensor, key: Tensor,
                        value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
                        attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[Tensor, None]:
    """``module``'s self-attention (batch first) written out, its ``(N, heads, T, T)`` probabilities
    appended to ``store`` on the autograd graph: what ``nn.MultiheadAttention`` computes in eval
    mode, in the order ``F.multi_head_attention_forward`` does (packed in-projection, scaled
    ``q k^T``, softmax, ``@ v``, out-projection). Bound to a module for one pass only."""
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise RuntimeError("attention masks are not supported on the explicit attention path")
    if query is not key or key is not value:
        raise RuntimeError("the explicit attention path computes self-attention only")
    batch, tokens, width = query.shape
    heads = module.num_heads
    qkv = F.linear(query, module.in_proj_weight, module.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (q * (width // heads) ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1)
    store.append(probs)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
    return module.out_proj(out), None


def _explicit_refusal(module: nn.Module) -> str:
    """Why ``module`` cannot take :func:`_explicit_attention` ("" when it can)."""
    if not isinstance(module, nn.MultiheadAttention):
        return f"{type(module).__name__} is not an nn.MultiheadAttention"
    if not module.batch_first:
        return "it is not batch_first"
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        return "its query, key and value have separate projections"
    if module.bias_k is not None or module.add_zero_attn:
        return "it adds key/value biases or a zero attention slot"
    return ""


class AttentionPass:
    """What one attention forward leaves: the logits, every block's probabilities and, where
    ``legrad`` is asked for, the class scores of the blocks it reads (graph kept).

    Args:
        logits: ``(N, classes)``.
        attentions: per block, ``(N, heads, T, T)`` probabilities on the graph.
        plan: the explainer's plan.
        batched: one vmapped gradient pass for several classes per image.
        layer_scores: per block legrad reads (the last :data:`LEGRAD_BLOCKS`), ``(N, classes)``: the
            head applied to that block's output (the last is ``logits``); None where the pass was
            made without them.
    """

    def __init__(self, logits: Tensor, attentions: list[Tensor], plan: _Plan, batched: bool,
                 layer_scores: list[Tensor] | None = None) -> None:
        self.logits = logits
        self.attentions = attentions
        self.layer_scores = layer_scores
        self._plan = plan
        self._batched = batched

    def _grads(self, score: Tensor, inputs: Sequence[Tensor], seed: Tensor,
               pick: tuple[Tensor, Tensor] | None) -> list[Tensor]:
        """The gradients of ``score`` seeded per round (``seed``: ``(rounds, N, classes)``) with
        respect to ``inputs``, each ``(P, ...)`` in target order (``pick``: round and row; None
        where the targets are the rows in order, one round: the gradients as they come)."""
        total = seed.shape[0]
        try:
            if pick is None:
                return list(torch.autograd.grad(score, inputs, grad_outputs=seed[0], retain_graph=True))
            if self._batched and total > 1:
                grads = torch.autograd.grad(score, inputs, grad_outputs=seed, is_grads_batched=True,
                                            retain_graph=True)
            else:
                per_round = [torch.autograd.grad(score, inputs, grad_outputs=seed[r], retain_graph=True)
                             for r in range(total)]
                grads = [torch.stack(g) for g in zip(*per_round, strict=True)]
        except RuntimeError as exc:
            if "does not require grad" in str(exc) or "not have been used" in str(exc):
                raise RuntimeError("the class score is not connected to every attention block") from exc
            raise
        return [g[pick] for g in grads]

    def cams(self, rows: Sequence[int], classes: Tensor, methods: Sequence[str] | None = None) -> Tensor:
        """Raw maps ``(P, h, w)`` of P (image row, class) targets, each by its method (``chefer``
        when None); one gradient pass per round of classes (one target per image a round), or
        one vmapped pass for all rounds."""
        host_rows = [int(r) for r in rows]
        methods = list(methods) if methods is not None else ["chefer"] * len(host_rows)
        if any(m not in ATTENTION_METHODS for m in methods):
            raise ValueError(f"attention passes compute {', '.join(ATTENTION_METHODS)} only")
        count = len(host_rows)
        plan = self._plan
        device = self.logits.device
        dtype = torch.promote_types(self.logits.dtype, torch.float32)
        if count == 0:
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
        # The common case (one target per image, in row order) needs no gather of the gradients.
        in_order = total == 1 and host_rows == list(range(n))
        pick = None if in_order else (device_index(rounds, device), device_index(host_rows, device))
        single = len(set(methods)) == 1
        out = None if single else torch.empty((count, *plan.grid), device=device, dtype=dtype)
        # Each method's targets in one go; a target another method asked for is seeded too (its
        # gradient is dropped), so that rounds and seeds stay those of the whole request.
        for method in dict.fromkeys(methods):
            at = device_index([p for p, m in enumerate(methods) if m == method], device)
            if method == "chefer":
                grads = self._grads(self.logits, self.attentions, seed, pick)
                attentions = [a.detach() if pick is None else a.detach()[pick[1]] for a in self.attentions]
                maps = chefer_maps(attentions, grads, torch.tensor(plan.readout), plan.prefix, plan.grid)
            else:
                maps = self._legrad(seed, pick)
            if single:
                return maps.to(dtype)
            out[at] = maps[at].to(dtype)
        return out

    def _legrad(self, seed: Tensor, pick: tuple[Tensor, Tensor] | None) -> Tensor:
        """LeGrad maps ``(P, h, w)``: per block, one gradient of its class score through that block."""
        plan = self._plan
        if self.layer_scores is None:
            raise RuntimeError("legrad needs a pass made with layer scores")
        total = None
        for score, attention in zip(self.layer_scores, self.attentions[-len(self.layer_scores):], strict=True):
            (grad,) = self._grads(score, [attention], seed, pick)
            signal = grad.float().clamp(min=0).mean(dim=(1, 2))[:, plan.prefix:]  # heads, query tokens
            total = signal if total is None else total + signal
        return total.unflatten(1, plan.grid)


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
        # Methods this model cannot serve though others can, and why (filled at load).
        self.refused: dict[str, str] = {}
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
        """The attention modules on their unfused path, their probabilities kept; undone after."""
        if self.plan.kind == "torchvision":
            with self._explicit(model, store):
                yield
            return
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

    @contextmanager
    def _explicit(self, model: nn.Module, store: list[Tensor]) -> Iterator[None]:
        """torchvision: each ``nn.MultiheadAttention`` runs :func:`_explicit_attention` (an
        instance attribute, which ``nn.Module.__call__`` finds first), removed after."""
        modules = self._modules(model)
        try:
            for m in modules:
                m.forward = functools.partial(_explicit_attention, m, store)
            yield
        finally:
            for m in modules:
                m.__dict__.pop("forward", None)

    def forward(self, engine, x: Tensor, layer_scores: bool = False) -> AttentionPass:
        """One forward of ``engine``'s eager model with the probabilities on the graph.

        Args:
            engine: the :class:`handler.cam.CamEngine` (its precision and, compiled, its capture).
            x: the prepared batch.
            layer_scores: also the class scores of the blocks legrad reads: the model's head
                applied to each one's output, on the graph.
        """
        model = eager_module(engine.model)
        store: list[Tensor] = []
        outputs: list[Tensor] = []
        capture = engine.capture
        passthrough = capture.passing() if capture is not None else nullcontext()
        blocks = [model.get_submodule(name) for name in self.plan.legrad_blocks] if layer_scores else []
        with self._lock:  # the hooks too: another pass's forward must not feed this one's outputs
            handles = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in blocks]
            try:
                with self._unfused(model, store), passthrough:
                    with torch.inference_mode(False), torch.enable_grad():
                        with torch.autocast(x.device.type, dtype=engine.autocast,
                                            enabled=engine.autocast is not None):
                            # The input requires grad (parameters never do), so the graph runs from
                            # the first block's attention to the logits.
                            logits = model(x.detach().requires_grad_(True))
                            scores = [_head(model, self.plan.kind, z) for z in outputs] if layer_scores else None
            finally:
                for handle in handles:
                    handle.remove()
        if len(store) != len(self.plan.attention):
            raise RuntimeError(f"{len(store)} attention probabilities for {len(self.plan.attention)} blocks")
        if layer_scores and len(outputs) != len(self.plan.legrad_blocks):
            raise RuntimeError(f"{len(outputs)} block outputs for {len(self.plan.legrad_blocks)} blocks")
        return AttentionPass(logits, store, self.plan, self.batched_targets, scores)


def _head(model: nn.Module, kind: str, tokens: Tensor) -> Tensor:
    """The model's head on a block's output tokens ``(N, T, D)``: what its forward does after the
    last block (final norm, pooling or the class token, classifier)."""
    if kind == "torchvision":
        return model.heads(model.encoder.ln(tokens)[:, 0])
    return model.forward_head(model.norm(tokens))


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


def _timm_modules(model: nn.Module, name: str) -> tuple[list[str], list[str], str]:
    """The names of a timm ViT/Eva's attention modules and of its blocks, one per block, or []
    and why not."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or not isinstance(getattr(model, "num_prefix_tokens", None), int) \
            or not len(blocks):
        return [], [], (f"{'/'.join(ATTENTION_METHODS)} explain a transformer through its attention, and {name} "
                        "has no timm ViT/Eva or torchvision ViT attention blocks; use a gradient method (gradcam...)")
    names, block_names = [], []
    blocks_name = next(n for n, m in model.named_modules() if m is blocks)
    for i, block in enumerate(blocks):
        found = [n for n, m in block.named_modules() if hasattr(m, "fused_attn") and isinstance(
            getattr(m, "attn_drop", None), nn.Module)]
        if len(found) != 1:
            return [], [], f"block {i} of {name} has {len(found)} timm attention modules, not one"
        names.append(f"{blocks_name}.{i}.{found[0]}".replace("..", ".").rstrip("."))
        block_names.append(f"{blocks_name}.{i}".lstrip("."))
    return names, block_names, ""


def _torchvision_modules(model: nn.Module, name: str) -> tuple[list[str], list[str], str]:
    """The names of a torchvision ViT's ``nn.MultiheadAttention`` modules and of its encoder
    layers, one per layer, or [] and why not."""
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if not isinstance(layers, nn.Module) or not len(layers):
        return [], [], f"{name} has no encoder.layers to read attention from"
    layers_name = next(n for n, m in model.named_modules() if m is layers)
    names, block_names = [], []
    for i, (child, layer) in enumerate(layers.named_children()):
        found = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if len(found) != 1:
            return [], [], f"encoder layer {i} of {name} has {len(found)} nn.MultiheadAttention modules, not one"
        why = _explicit_refusal(found[0][1])
        if why:
            return [], [], f"the attention of encoder layer {i} of {name} cannot be read: {why}"
        names.append(f"{layers_name}.{child}.{found[0][0]}".rstrip("."))
        block_names.append(f"{layers_name}.{child}")
    return names, block_names, ""


def _same_logits(got: Tensor, want: Tensor, tolerance: float) -> bool:
    """``got`` equals ``want`` within ``tolerance`` of ``want``'s range (same shape)."""
    got, want = got.detach().float(), want.detach().float()
    scale = float(want.amax() - want.amin()) or 1.0
    return got.shape == want.shape and float((got - want).abs().max()) <= tolerance * scale


def attention_refusal(explainer: AttentionExplainer | None, why: str, method: str) -> str:
    """Why ``method`` (an attention method) cannot be served, or "" when it can: ``why`` where
    the model has no explainer (what :func:`attention_explainer` returned), else the explainer's
    own refusal of that method."""
    return why if explainer is None else explainer.refused.get(method, "")


def attention_explainer(engine, batched_targets: bool | None = None,
                        legrad_blocks: int = LEGRAD_BLOCKS) -> tuple[AttentionExplainer | None, str]:
    """The attention explainer of an engine's model, or None and why the model has none. A model
    whose head is not its final norm, pooling and classifier on the last block's tokens keeps
    ``chefer`` and refuses ``legrad`` (:attr:`AttentionExplainer.refused`).

    Supported: timm's VisionTransformer family (ViT, DeiT, register tokens) and Eva, with class
    token or average pooling, and torchvision's VisionTransformer, whose grid is the engine's. One
    dry forward at load checks that every block hands over a ``(N, heads, T, T)`` probability
    matrix, that the head applied to the last block's output gives the logits (so each block's
    class score is the head's), and on torchvision's that the explicit attention path gives the
    model's own logits.

    Args:
        engine: the serving :class:`handler.cam.CamEngine`.
        batched_targets: one vmapped gradient pass for several classes per image (the engine's
            setting by default).
        legrad_blocks: how many last blocks legrad sums (:data:`LEGRAD_BLOCKS`; the benchmark's
            ablation passes every block).
    """
    model = eager_module(engine.model)
    name = type(model).__name__
    torchvision = _is_torchvision_vit(model)
    names, block_names, why = (_torchvision_modules if torchvision else _timm_modules)(model, name)
    if not names:
        return None, why
    hints = ModelHints.from_model(model, engine.input_size)
    grid, prefix = hints.token_grid, 1 if torchvision else model.num_prefix_tokens
    if grid is None:
        return None, f"the patch grid of {name} cannot be told at {engine.input_size}"
    if tuple(grid) != tuple(engine.layout.grid):
        return None, (f"the target layer's grid {engine.layout.grid} is not the patch grid {grid}: the maps of "
                      "one answer must share a grid")
    tokens = prefix + grid[0] * grid[1]
    # torchvision's head reads the class token (x[:, 0]).
    readout, why = ((1.0,) + (0.0,) * (tokens - 1), "") if torchvision else _readout(model, prefix, tokens)
    if readout is None:
        return None, f"{name}: {why}"
    plan = _Plan(tuple(names), prefix, (int(grid[0]), int(grid[1])), readout,
                 "torchvision" if torchvision else "timm", tuple(block_names[-legrad_blocks:]))
    explainer = AttentionExplainer(plan, engine.batched_targets if batched_targets is None else batched_targets)
    example = engine.example()
    if torchvision:  # a seeded non-constant input: zeros would make every patch token alike
        noise = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
        example = noise.to(example.device, example.dtype).contiguous(memory_format=engine.memory_format)
    try:
        probe = explainer.forward(engine, example)
    except RuntimeError as exc:
        where = "nn.MultiheadAttention modules" if torchvision else "attention modules"
        return None, f"{name}'s {where} do not hand over their probabilities ({exc})"
    head_refusal = (f"the head of {name} is not its final norm, pooling and classifier on the last block's "
                    "tokens, so the class score of a block cannot be told")
    try:
        scored = explainer.forward(engine, example, layer_scores=True)
    except (RuntimeError, AttributeError, TypeError) as exc:
        scored, explainer.refused["legrad"] = None, f"{head_refusal} ({exc})"
    for a in probe.attentions:
        if a.dim() != 4 or a.shape[-2:] != (tokens, tokens) or not torch.allclose(
                a.detach().float().sum(dim=-1), torch.ones((), device=a.device), atol=_ROW_SUM_TOL):
            return None, f"{name}'s attention modules do not hold ({tokens} x {tokens}) attention probabilities"
    tolerance = _LOGITS_TOL if engine.autocast is None else _LOGITS_TOL_HALF
    if scored is not None:  # legrad alone needs the head's reading of a block; chefer does not
        if not _same_logits(scored.layer_scores[-1], scored.logits, tolerance):
            explainer.refused["legrad"] = head_refusal
    if torchvision:
        with torch.inference_mode(), torch.autocast(example.device.type, dtype=engine.autocast,
                                                    enabled=engine.autocast is not None):
            own = model(example)
        if not _same_logits(probe.logits, own, tolerance):
            return None, (f"{name}'s encoder layers do not use their nn.MultiheadAttention as torchvision's "
                          "EncoderBlock does: the explicit attention path changes the logits")
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

    def __init__(self, engine, explainer: AttentionExplainer, x: Tensor, attention_rows: list[int],
                 layer_scores: bool = False) -> None:
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
        self.attention = explainer.forward(engine, x[device_index(attention_rows, device)], layer_scores)
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
    refused = [m for m in dict.fromkeys(job_methods) if m in explainer.refused]
    if refused:
        raise ValueError(f"{refused[0]} asked of a model that refuses it: {explainer.refused[refused[0]]}")
    return _SplitPass(engine, explainer, x, rows, layer_scores="legrad" in job_methods)
