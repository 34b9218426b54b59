"""The DiT family by name (a registry, as DiT's `DiT_models`), importable without torch.

DiT-{S,B,L,XL}/{1,2,4,8}      the DiT paper's sizes at each patch size
DiT-DH-{S,B,L,XL}/{1,2,4,8}   the same trunks with RAE's DDT head (DiT^DH, for wide latents)
"""

# DiT paper (Peebles & Xie 2023) Table 1: (hidden size, depth, heads) per model size.
MODEL_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
# Patch 1 for latents with few, wide positions (RAE's 768x16x16, f16c32 VAEs' 32x16x16).
PATCH_SIZES = (1, 2, 4, 8)
# RAE's DiT^DH head (Zheng et al. 2025): bytetriper/RAE configs/stage2/training/ImageNet256/
# DiTDH-XL_DINOv2-B.yaml and DiTDH-S_DINOv2-B.yaml give hidden_size [trunk, 2048], depth
# [trunk, 2], num_heads [trunk, 16] for every trunk size.
DDT_HEAD = {"head_depth": 2, "head_width": 2048, "head_heads": 16}
HEAD_PREFIX = "DiT-DH"
# REPA's defaults (sihyun-yu/REPA train.py --proj-coeff, --encoder-depth; models/sit.py
# projector_dim) and REG's class-token weight (Martinser/REG train.sh --cls).
REPA_COEFF, REPA_DEPTH, REPA_PROJECTOR_DIM = 0.5, 8, 2048
REG_COEFF = 0.03
POS_EMBEDS = ("sincos", "rope")


def _presets(prefix: str, extra: dict[str, int]) -> dict[str, dict[str, int]]:
    return {
        f"{prefix}-{name}/{p}": {"hidden_size": d, "depth": n, "num_heads": h, "patch_size": p}
        | extra
        for name, (d, n, h) in MODEL_SIZES.items()
        for p in PATCH_SIZES
    }


DIT_PRESETS: dict[str, dict[str, int]] = _presets("DiT", {}) | _presets(HEAD_PREFIX, DDT_HEAD)


def has_head(preset: str) -> bool:
    """Whether a preset carries the DDT head."""
    return "head_depth" in DIT_PRESETS.get(preset, {})


def preset_names() -> str:
    """The registry in short: 'DiT-{S,B,L,XL}/{1,2,4,8}, DiT-DH-{S,B,L,XL}/{1,2,4,8}'."""
    sizes, patches = ",".join(MODEL_SIZES), ",".join(map(str, PATCH_SIZES))
    return ", ".join(f"{prefix}-{{{sizes}}}/{{{patches}}}" for prefix in ("DiT", HEAD_PREFIX))


__all__ = [
    "DDT_HEAD",
    "DIT_PRESETS",
    "HEAD_PREFIX",
    "MODEL_SIZES",
    "PATCH_SIZES",
    "POS_EMBEDS",
    "REG_COEFF",
    "REPA_COEFF",
    "REPA_DEPTH",
    "REPA_PROJECTOR_DIM",
    "has_head",
    "preset_names",
]
