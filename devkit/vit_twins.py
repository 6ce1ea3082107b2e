"""The same ViT in timm's and in torchvision's VisionTransformer: one parameter table, both ways.

Both compute the same function when built alike (patch convolution, class token, learned positions
added after it, pre-norm blocks with packed q/k/v projections, exact GELU, LayerNorm eps 1e-6,
the class token read by the head), so a model's twin gives the same logits and, because the
attention is the same, the same attention maps. torchvision's maps in the product come from an
explicit attention path (handler/attention_cam.py); its twin's come from timm's own unfused
attention, code the served path does not share. Used by the tests and by
scripts/bench/bench_faithfulness.py.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["timm_twin", "torchvision_twin"]


def _pairs(depth: int) -> list[tuple[str, str]]:
    """``(timm name, torchvision name)`` of every parameter."""
    pairs = [
        ("cls_token", "class_token"), ("pos_embed", "encoder.pos_embedding"),
        ("patch_embed.proj.weight", "conv_proj.weight"), ("patch_embed.proj.bias", "conv_proj.bias"),
        ("norm.weight", "encoder.ln.weight"), ("norm.bias", "encoder.ln.bias"),
        ("head.weight", "heads.head.weight"), ("head.bias", "heads.head.bias"),
    ]
    for i in range(depth):
        timm, tv = f"blocks.{i}", f"encoder.layers.encoder_layer_{i}"
        parts = [("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "self_attention.out_proj"),
                 ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.3")]
        for a, b in parts:
            pairs += [(f"{timm}.{a}.weight", f"{tv}.{b}.weight"), (f"{timm}.{a}.bias", f"{tv}.{b}.bias")]
        pairs += [(f"{timm}.attn.qkv.weight", f"{tv}.self_attention.in_proj_weight"),
                  (f"{timm}.attn.qkv.bias", f"{tv}.self_attention.in_proj_bias")]
    return pairs


def _copy(state: dict[str, Tensor], pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    return {dst: state[src].detach().clone() for src, dst in pairs}


def timm_twin(tv_vit: nn.Module) -> nn.Module:
    """timm's VisionTransformer with a torchvision VisionTransformer's weights (eval mode)."""
    from timm.models.vision_transformer import VisionTransformer

    layers = list(tv_vit.encoder.layers)
    width = tv_vit.hidden_dim
    twin = VisionTransformer(img_size=tv_vit.image_size, patch_size=tv_vit.patch_size, embed_dim=width,
                             depth=len(layers), num_heads=layers[0].self_attention.num_heads,
                             mlp_ratio=layers[0].mlp[0].out_features / width,
                             num_classes=tv_vit.heads.head.out_features, global_pool="token")
    pairs = [(tv, timm) for timm, tv in _pairs(len(layers))]
    twin.load_state_dict(_copy(tv_vit.state_dict(), pairs), strict=True)
    return twin.to(next(tv_vit.parameters()).dtype).eval()


def torchvision_twin(timm_vit: nn.Module) -> nn.Module:
    """torchvision's VisionTransformer with a timm class-token ViT's weights (eval mode).

    Raises:
        ValueError: the timm model is not one torchvision can express (no class token, other
            pooling, register tokens, non-square input or patches, layer scale, qk norm...).
    """
    from torchvision.models import VisionTransformer

    size, patch = timm_vit.patch_embed.img_size, timm_vit.patch_embed.patch_size
    blocks = list(timm_vit.blocks)
    if getattr(timm_vit, "global_pool", None) != "token" or timm_vit.num_prefix_tokens != 1 \
            or size[0] != size[1] or patch[0] != patch[1]:
        raise ValueError("torchvision's ViT has one class token, square inputs and patches, and token pooling")
    state = timm_vit.state_dict()
    pairs = _pairs(len(blocks))
    extra = set(state) - {timm for timm, _ in pairs}
    if extra:
        raise ValueError(f"parameters torchvision's ViT has no place for: {sorted(extra)[:4]}")
    width = timm_vit.embed_dim
    twin = VisionTransformer(image_size=size[0], patch_size=patch[0], num_layers=len(blocks),
                             num_heads=blocks[0].attn.num_heads, hidden_dim=width,
                             mlp_dim=blocks[0].mlp.fc1.out_features, num_classes=timm_vit.num_classes)
    twin.load_state_dict(_copy(state, pairs), strict=True)
    return twin.to(next(timm_vit.parameters()).dtype).eval()
