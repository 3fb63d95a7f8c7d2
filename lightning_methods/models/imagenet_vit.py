"""timm's ViT-S/16 (``vit_small_patch16_224``; Dosovitskiy et al., *An Image is Worth 16x16 Words*, arXiv 2010.11929)
and DeiT-Tiny (``deit_tiny_patch16_224``; Touvron et al., *Training data-efficient image transformers & distillation
through attention*, arXiv 2012.12877) in the backbone registry as ``imagenet_vit_s16`` and ``imagenet_deit_tiny``.

Both are timm's ``VisionTransformer`` built with the architecture arguments of those two timm model names (patch 16,
class token, 12 blocks; ViT-S: width 384, 6 heads; DeiT-Tiny: width 192, 3 heads), never with pretrained weights (no
network), so parameter names and counts equal ``timm.create_model(name, pretrained=False)`` and timm checkpoints of
those models load with ``strict=True``. ``forward_features`` returns the pooled (class-token, after the final
LayerNorm) features as every package backbone does; timm's token sequence is ``forward_tokens``. ``img_size``
(default 224) sets the patch grid and the position embeddings (e.g. 64 for Tiny-ImageNet: a 4x4 grid).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_methods.models.registry import register_backbone

#: timm model name -> its architecture arguments (timm ``vision_transformer.py``)
ARCHS = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
}


class ImageNetViT(VisionTransformer):
    """timm's ``VisionTransformer`` with pooled ``forward_features``.

    Args:
        arch: ``"vit_small_patch16_224"`` or ``"deit_tiny_patch16_224"``.
        num_classes: size of the classification head (1000 for ImageNet-1k).
        img_size: input resolution the position embeddings are built for (224).
        **kwargs: further ``VisionTransformer`` arguments (``drop_path_rate``, ``drop_rate``, ...).
    """

    def __init__(
        self, arch: str = "vit_small_patch16_224", num_classes: int = 1000, img_size: int = 224, **kwargs: Any
    ) -> None:
        if arch not in ARCHS:
            raise ValueError(f"unknown ViT architecture {arch!r}; known: {', '.join(ARCHS)}")
        super().__init__(img_size=img_size, num_classes=num_classes, **{**ARCHS[arch], **kwargs})
        self.arch = arch

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features``: the normalized token sequence ``(N, 1 + patches, width)``."""
        return super().forward_features(x)

    def forward_features(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.forward_head(self.forward_tokens(x), pre_logits=True)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.head(self.forward_features(x))


register_backbone("imagenet_vit_s16", partial(ImageNetViT, "vit_small_patch16_224"))
register_backbone("imagenet_deit_tiny", partial(ImageNetViT, "deit_tiny_patch16_224"))
