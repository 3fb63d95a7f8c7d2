"""ViT-Lite backbones for small images, built from timm's ``VisionTransformer`` (plain timm model, standard
``nn.Linear`` layers, timm's fused attention).

Configuration of "ViT-Lite-7/4" from the CCT paper (Hassani et al., "Escaping the Big Data Paradigm with Compact
Transformers", arXiv 2104.05704), used by the vit_locality family ("Inducing Spatial Locality in Vision Transformers
through the Training Protocol", arXiv 2605.16390, which does not state its architecture - this is our choice):
32x32 input, patch 4 (8x8 = 64 tokens + CLS), width 256, depth 7, 4 heads, MLP ratio 2, learned position embeddings,
pre-norm blocks, no dropout, classification from the CLS token.

Registered names:
- ``vit_lite_7_4``: 32x32 inputs, patch 4 (CIFAR).
- ``vit_lite_7_8``: 64x64 inputs, patch 8 (Tiny-ImageNet; keeps the 8x8 token grid).

``forward`` returns logits; as in timm, ``forward_features`` returns the token sequence (B, 1 + N, 256) and
``forward_head(tokens, pre_logits=True)`` the pooled CLS feature (``num_features`` wide).

Training keeps timm's fused ``scaled_dot_product_attention``; the attention probabilities are read by
``lightning_methods.analysis.attention`` without changing the model (see ``AttentionRecorder``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_methods.models.registry import register_backbone


def _cct_init(model: VisionTransformer) -> None:
    """The CCT initialisation (official SHI-Labs/Compact-Transformers): linear weights trunc-normal(0.02) with zero
    biases, LayerNorm (1, 0), learned position embeddings trunc-normal(0.2), a zero class token and a
    Kaiming-normal patch-embedding convolution."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if model.pos_embed is not None:
        nn.init.trunc_normal_(model.pos_embed, std=0.2)
    if model.cls_token is not None:
        nn.init.zeros_(model.cls_token)
    proj = model.patch_embed.proj
    nn.init.kaiming_normal_(proj.weight)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def vit_lite(
    num_classes: int = 100,
    img_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 256,
    depth: int = 7,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    qkv_bias: bool = False,
    init: Literal["cct", "timm"] = "cct",
    **kwargs: Any,
) -> VisionTransformer:
    """A timm ``VisionTransformer`` with the ViT-Lite configuration (defaults: ViT-Lite-7/4 for 32x32 inputs).

    Args:
        num_classes: size of the classification layer.
        img_size: input height and width in pixels.
        patch_size: patch side in pixels; must divide ``img_size`` (the token grid is ``img_size // patch_size``).
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block (must divide ``embed_dim``).
        mlp_ratio: hidden width of the MLPs relative to ``embed_dim``.
        qkv_bias: bias in the query/key/value projection (False as in CCT's ViT-Lite; timm's default is True).
        init: ``"cct"`` (CCT's initialisation, see :func:`_cct_init`) or ``"timm"`` (timm's default ViT init).
        **kwargs: further ``VisionTransformer`` arguments (``drop_path_rate``, ``attn_drop_rate``, ``global_pool``,
            ``class_token``, ``reg_tokens``, ``dynamic_img_size``, ...).

    Raises:
        ValueError: if ``patch_size`` does not divide ``img_size`` or ``num_heads`` does not divide ``embed_dim``.
    """
    if patch_size <= 0 or img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}: choose a patch size that "
                         f"divides the image side (e.g. 4 for 32x32, 8 for 64x64)")
    if num_heads <= 0 or embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if init not in ("cct", "timm"):
        raise ValueError(f"init must be 'cct' or 'timm', got {init!r}")
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim,
                              depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, **kwargs)
    if init == "cct":
        with torch.no_grad():
            _cct_init(model)
    return model


register_backbone("vit_lite_7_4", partial(vit_lite, img_size=32, patch_size=4))
register_backbone("vit_lite_7_8", partial(vit_lite, img_size=64, patch_size=8))
