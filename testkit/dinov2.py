"""A tiny DINOv2 (transformers `Dinov2Model`) saved with save_pretrained, loaded by folder."""

from __future__ import annotations

from pathlib import Path

# ViT of width 32, 2 blocks, patch 14, trained size 56 (4 x 4 patches): at EDM2's 224 px input
# (16 x 16 patches) its position embeddings are resized, as those of ViT-L/14 (37 x 37) are.
TINY_DINOV2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 56,
    "patch_size": 14,
}


def make_tiny_dinov2(path: Path, *, seed: int = 0, std: float = 0.2) -> Path:
    """Random weights (every parameter N(0, std^2), LayerNorm and layer-scale weights around 1, so
    that every weight moves the output), saved to `path` with save_pretrained."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**TINY_DINOV2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            around_one = name.endswith(
                ("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")
            )
            p.copy_(torch.randn_like(p) * std + (1.0 if around_one else 0.0))
    model.save_pretrained(path)
    return path
