"""References for the attention methods (handler/attention_cam.py): Chefer et al. (2021) as the
paper writes it, and LeGrad (Bousselham et al., ICCV 2025) as its paper does, one image and one
class at a time on timm's own unfused attention. A torchvision
ViT is checked through its timm twin (:func:`devkit.vit_twins.timm_twin`, re-exported here), so
its maps are compared with code that shares nothing with the explicit attention path."""

from __future__ import annotations

import copy

import torch
from torch import nn

from devkit.vit_twins import timm_twin

__all__ = ["chefer_reference", "legrad_reference", "timm_twin"]


def chefer_reference(model: nn.Module, image: torch.Tensor, cls: int, readout: str = "token") -> torch.Tensor:
    """Chefer et al. (2021) on a timm ViT/Eva: unfused attention, ``A_bar = mean_h relu(grad * A)``,
    ``R = I; R = R + A_bar @ R`` per block, the read-out row of ``R`` at the patch tokens, as a
    square grid. ``readout``: ``token`` (class token), ``distilled`` (class and distillation
    tokens averaged) or ``avg`` (the patch tokens' mean)."""
    m = copy.deepcopy(model)
    attn = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
    probs: list[torch.Tensor] = []
    for mod in attn:
        mod.fused_attn = False
        mod.attn_drop.register_forward_hook(lambda _m, _i, out: probs.append(out))
    with torch.enable_grad():
        logits = m(image[None].clone().requires_grad_(True))
        grads = torch.autograd.grad(logits[0, cls], probs)
    tokens = probs[0].shape[-1]
    prefix = m.num_prefix_tokens
    relevance = torch.eye(tokens, dtype=probs[0].dtype)
    for a, g in zip(probs, grads, strict=True):
        relevance = relevance + (g[0] * a[0]).clamp(min=0).mean(dim=0) @ relevance
    if readout == "token":
        row = relevance[0]
    elif readout == "distilled":
        row = (relevance[0] + relevance[1]) / 2
    else:
        row = relevance[prefix:].mean(dim=0)
    side = int(round((tokens - prefix) ** 0.5))
    return row[prefix:].reshape(side, side)


def legrad_reference(model: nn.Module, image: torch.Tensor, cls: int, blocks: int = 2) -> torch.Tensor:
    """LeGrad on a timm ViT/Eva, one image and one class: per block ``l`` of the last ``blocks``
    (the authors' default: 2), the class score ``s_l = head(norm(z_l))[cls]`` of the block's output
    ``z_l``; the map is ``sum_l mean_{heads, query tokens} relu(ds_l / dA_l)`` at the patch tokens,
    as a square grid."""
    m = copy.deepcopy(model)
    probs: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
            mod.attn_drop.register_forward_hook(lambda _m, _i, out: probs.append(out))
    for block in m.blocks:
        block.register_forward_hook(lambda _m, _i, out: outs.append(out))
    prefix = m.num_prefix_tokens
    total = None
    with torch.enable_grad():
        m(image[None].clone().requires_grad_(True))
        for a, z in zip(probs[-blocks:], outs[-blocks:], strict=True):
            score = m.forward_head(m.norm(z))[0, cls]
            (grad,) = torch.autograd.grad(score, a, retain_graph=True)
            signal = grad[0].clamp(min=0).mean(dim=(0, 1))[prefix:]
            total = signal if total is None else total + signal
    side = int(round(total.numel() ** 0.5))
    return total.reshape(side, side)
