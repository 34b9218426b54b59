"""The DiT family by name (a registry, as DiT's `DiT_models`), importable without torch."""

# DiT paper (Peebles & Xie 2023) Table 1: (hidden size, depth, heads) per model size.
MODEL_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{name}/{p}": {"hidden_size": d, "depth": n, "num_heads": h, "patch_size": p}
    for name, (d, n, h) in MODEL_SIZES.items()
    for p in PATCH_SIZES
}
POS_EMBEDS = ("sincos", "rope")

__all__ = ["DIT_PRESETS", "MODEL_SIZES", "PATCH_SIZES", "POS_EMBEDS"]
