"""Tiny randomly initialized transformers vision encoders, saved with `save_pretrained`.

    folder = make_tiny_vision_encoder(tmp / "dinov2", "dinov2")       # then --features folder
    folder = make_tiny_vision_encoder(tmp / "reg", "dinov2_with_registers")

Each is the real transformers class (Dinov2Model, Dinov2WithRegistersModel, ViTModel), only
narrow and shallow (hidden 32, 2 layers, 4-px patches, trained size 16 px: a 4x4 position table),
with a final LayerNorm whose affine parameters are not the identity, so that a test sees which
output it reads. `make_text_model` saves a tiny BERT: a model that is not a vision encoder.
"""

from __future__ import annotations

from pathlib import Path

HIDDEN = 32
PATCH = 4
TRAINED_SIZE = 16  # pixels: a 4x4 grid of 4-px patches
REGISTERS = 2


def make_tiny_vision_encoder(path: Path, model_type: str = "dinov2", *, seed: int = 0) -> Path:
    """A tiny `model_type` encoder (dinov2, dinov2_with_registers, vit) saved in `path`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN,
        patch_size=PATCH,
        image_size=TRAINED_SIZE,
    )
    if model_type == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **common))
    elif model_type == "dinov2_with_registers":
        config = transformers.Dinov2WithRegistersConfig(
            mlp_ratio=2, num_register_tokens=REGISTERS, **common
        )
        model = transformers.Dinov2WithRegistersModel(config)
    elif model_type == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**common))
    else:
        raise ValueError(f"no tiny {model_type}")
    with torch.no_grad():
        for p in model.parameters():  # init draws zeros for tokens and identity norms
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return path


def make_text_model(path: Path) -> Path:
    """A tiny BertModel: a transformers model that is no vision encoder."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    transformers.BertModel(config).save_pretrained(path)
    return path
