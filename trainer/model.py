"""The DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): adaLN-Zero blocks.

    model = build_model("DiT-B/2", input_size=32, in_channels=4, num_classes=1000)
    out = model(x, t, y)        # x (B, C, H, W), t (B,) model time, y (B,) labels -> (B, C, H, W)

Label `model.null_class` (= num_classes) is the unconditional class used by classifier-free
guidance; the label table has num_classes + 1 rows. The model predicts one tensor of the input's
shape (velocity or noise, per the objective); with `learn_sigma` it predicts 2C channels: the
prediction, then the variance interpolation v in [-1, 1] of Nichol & Dhariwal 2021 (eq. 15), as
the official DiT checkpoints do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundation.errors import LatentditError
from trainer.presets import DIT_PRESETS, PATCH_SIZES, POS_EMBEDS

FREQ_EMBED_DIM = 256  # sinusoidal timestep features fed to the timestep MLP (DiT)
MAX_PERIOD = 10_000  # of the sinusoidal timestep and position features (Vaswani et al. 2017)
ROPE_THETA = 10_000.0
NORM_EPS = 1e-6
INIT_STD = 0.02  # label and timestep embeddings (DiT's initialize_weights)


class ModelConfigError(LatentditError):
    """A model preset or size does not fit the data."""


def timestep_features(t: torch.Tensor, dim: int = FREQ_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal features of (B,) float times: [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid_h*grid_w, dim), rows in row-major token order.

    Half the channels encode the column (x), half the row (y), as in MAE and DiT.
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, xs.flatten()), _sincos_1d(dim // 2, ys.flatten())], 1)
    return table.float()


def rope_angles_2d(head_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Axial 2-D RoPE angles (T, head_dim/2): the first half of the pairs rotate by row, the rest by column."""
    quarter = head_dim // 4
    freqs = 1.0 / ROPE_THETA ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows = ys.flatten().double()[:, None] * freqs[None]
    cols = xs.flatten().double()[:, None] * freqs[None]
    return torch.cat([rows, cols], dim=1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, heads, T, head_dim) by angles (T, head_dim/2)."""
    pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2)
    cos, sin = angles.cos(), angles.sin()
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)").type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads
        )
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # LayerNorm autocasts up
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT section 3.2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from tokens to patches."""

    def __init__(self, dim: int, patch_values: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(dim, patch_values)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT over latents (B, C, H, W); see the module docstring."""

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        pos_embed: str = "sincos",
        grad_checkpointing: bool = False,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "input_size": input_size,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "qk_norm": qk_norm,
            "pos_embed": pos_embed,
            "grad_checkpointing": grad_checkpointing,
            "learn_sigma": learn_sigma,
        }
        check_config(self.config)
        self.patch_size, self.grid = patch_size, input_size // patch_size
        self.null_class = num_classes  # label of the unconditional class (guidance)
        self.checkpoint_blocks = depth if grad_checkpointing else 0
        """Training recomputes the activations of blocks [0, checkpoint_blocks) in backward."""
        patch_values = patch_size * patch_size * in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.x_embedder = nn.Linear(patch_values, hidden_size)  # a patch-size conv, as a linear
        self.t_embedder = nn.Sequential(
            nn.Linear(FREQ_EMBED_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        # Fixed tables derived from the config: buffers, not parameters, and not saved.
        head_dim = hidden_size // num_heads
        if pos_embed == "sincos":
            self.register_buffer(
                "pos_embed",
                sincos_pos_embed_2d(hidden_size, self.grid, self.grid),
                persistent=False,
            )
            self.rope = None
        else:
            self.pos_embed = None
            self.register_buffer(
                "rope", rope_angles_2d(head_dim, self.grid, self.grid), persistent=False
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=INIT_STD)
        nn.init.normal_(self.t_embedder[0].weight, std=INIT_STD)
        nn.init.normal_(self.t_embedder[2].weight, std=INIT_STD)
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) float, t (B,) float model time, y (B,) long labels -> (B, C, H, W).

        With learn_sigma the output is (B, 2C, H, W): the prediction, then the variance values.
        """
        p = self.patch_size
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        h = self.x_embedder(tokens)
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        c = self.t_embedder(timestep_features(t).to(h.dtype)) + self.y_embedder(y)
        for i, block in enumerate(self.blocks):
            if self.training and i < self.checkpoint_blocks:
                h = checkpoint(block, h, c, self.rope, use_reentrant=False)
            else:
                h = block(h, c, self.rope)
        out = self.final_layer(h, c)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=p, q=p)


def check_config(config: dict[str, Any]) -> None:
    """Raise ModelConfigError naming the bad value when a DiT config can't be built."""
    size, p = config["input_size"], config["patch_size"]
    if size % p:
        raise ModelConfigError(
            f"latent size {size} is not divisible by patch size {p}: choose a preset with a "
            f"patch size dividing {size} (one of {[q for q in PATCH_SIZES if size % q == 0]})"
        )
    d, heads = config["hidden_size"], config["num_heads"]
    if d % heads:
        raise ModelConfigError(f"hidden size {d} is not divisible by {heads} heads")
    if config["pos_embed"] not in POS_EMBEDS:
        raise ModelConfigError(f"pos_embed {config['pos_embed']!r} is not one of {POS_EMBEDS}")
    if config["pos_embed"] == "sincos" and d % 4:
        raise ModelConfigError(f"2-D sin-cos positions need a hidden size divisible by 4, got {d}")
    if config["pos_embed"] == "rope" and (d // heads) % 4:
        raise ModelConfigError(f"2-D RoPE needs a head size divisible by 4, got {d // heads}")


def build_model(
    preset: str, *, input_size: int, in_channels: int, num_classes: int, **overrides: Any
) -> DiT:
    """Build a DiT from a `DIT_PRESETS` name; `overrides` replace any constructor argument."""
    if preset not in DIT_PRESETS:
        raise ModelConfigError(
            f"unknown model preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}"
        )
    kwargs = {**DIT_PRESETS[preset], **overrides}
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


def paper_parameter_count(model: DiT) -> int:
    """Parameters as the DiT paper counts them: ours plus the fixed position table.

    The reference code holds its sin-cos table as a frozen (1, T, D) parameter; here it is a
    buffer. DiT-XL/2 with learn_sigma at 32x32 latents: 675,129,632 (the paper's 675M).
    """
    c = model.config
    table = (c["input_size"] // c["patch_size"]) ** 2 * c["hidden_size"]
    return sum(p.numel() for p in model.parameters()) + (table if c["pos_embed"] == "sincos" else 0)


def model_from_config(config: dict[str, Any]) -> DiT:
    """Rebuild a DiT from its `model.config` (as stored in a checkpoint's meta.json)."""
    return DiT(**config)


def forward_flops(config: dict[str, Any]) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass for one sample.

    Counts the matrix products (patch embedding, qkv, attention scores and values, projections,
    MLP, adaLN, output); elementwise work is left out. DiT-XL/2 at 32x32: ~237 GFLOP (the DiT
    paper's 118.6 "GFLOPs" are multiply-adds).
    """
    d, depth = config["hidden_size"], config["depth"]
    tokens = (config["input_size"] // config["patch_size"]) ** 2
    patch_values = config["patch_size"] ** 2 * config["in_channels"]
    mlp = int(d * config["mlp_ratio"])
    per_block = tokens * (3 * d * d + d * d + 2 * d * mlp) + 2 * tokens * tokens * d + 6 * d * d
    outputs = 2 if config.get("learn_sigma") else 1  # output channels per input channel
    macs = depth * per_block + (1 + outputs) * tokens * d * patch_values + 2 * d * d
    macs += FREQ_EMBED_DIM * d + d * d  # timestep MLP
    return 2.0 * macs
