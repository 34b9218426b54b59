"""The DiT's building blocks: attention, adaLN-Zero blocks, the final layer, positions, norms, MLPs.

A block's condition `c` is either one vector per sample (B, D), as in the DiT trunk, or one per
token (B, T, D), as in the DDT head (`trainer.ddt_head`); `modulate` and the gates broadcast either.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

FREQ_EMBED_DIM = 256  # sinusoidal timestep features fed to the timestep MLP (DiT)
MAX_PERIOD = 10_000  # of the sinusoidal timestep and position features (Vaswani et al. 2017)
ROPE_THETA = 10_000.0
NORM_EPS = 1e-6
SWIGLU_SHRINK = 2 / 3  # SwiGLU's hidden width as a share of the GELU MLP's (Shazeer 2020; RAE)

Norm = Callable[[int], nn.Module]
Mlp = Callable[[int, float], nn.Module]


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


def per_token(v: torch.Tensor) -> torch.Tensor:
    """A condition (B, D) as (B, 1, D), to broadcast over tokens; (B, T, D) stays as it is."""
    return v[:, None] if v.ndim == 2 else v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) scaled and shifted by (B, D) per sample, or (B, T, D) per token."""
    return x * (1 + per_token(scale)) + per_token(shift)


def layer_norm(dim: int) -> nn.Module:
    """DiT's norm: LayerNorm without affine parameters (adaLN supplies scale and shift)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


def affine_layer_norm(dim: int) -> nn.Module:
    """LayerNorm with a learned scale and shift: the q/k norm of the DiT trunk (--qk-norm)."""
    return nn.LayerNorm(dim, eps=NORM_EPS)


class RMSNorm(nn.RMSNorm):
    """RMSNorm with a learned scale, computed in float32 and returned in the input's dtype (RAE's)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


def gelu_mlp(dim: int, mlp_ratio: float) -> nn.Module:
    """DiT's MLP: Linear, tanh-GELU, Linear with hidden width dim * mlp_ratio."""
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
    )


def build_projector(hidden: int, projector_dim: int, features_dim: int) -> nn.Sequential:
    """REPA's projector (sihyun-yu/REPA `models/sit.py` `build_mlp`): Linear, SiLU, Linear, SiLU,
    Linear (hidden -> projector_dim -> projector_dim -> features_dim).

    Initialized as REPA's `initialize_weights` does every linear: Xavier uniform, zero bias.
    """
    mlp = nn.Sequential(
        nn.Linear(hidden, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, features_dim),
    )
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return mlp


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU's hidden width: 2/3 of the GELU MLP's, so both cost about the same (RAE's rule)."""
    return int(SWIGLU_SHRINK * int(dim * mlp_ratio))


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with (a, b) = w12(x) split in halves (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash kernels on GPU)."""

    def __init__(
        self, dim: int, num_heads: int, *, qk_norm: bool, norm: Norm = affine_layer_norm
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = norm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(head_dim) if qk_norm else nn.Identity()

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
    """Transformer block with adaLN-Zero conditioning (DiT section 3.2).

    `norm`, `qk` (the q/k norms of --qk-norm) and `mlp` choose the layers: DiT's LayerNorms and
    GELU MLP by default, RMSNorms and SwiGLU in the DDT head (RAE's LightningDDTBlock).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        qk_norm: bool,
        norm: Norm = layer_norm,
        qk: Norm = affine_layer_norm,
        mlp: Mlp = gelu_mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, norm=qk)
        self.norm2 = norm(dim)
        self.mlp = mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + per_token(gate1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + per_token(gate2) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm (no gate), then a linear map from tokens to patches."""

    def __init__(self, dim: int, patch_values: int, *, norm: Norm = layer_norm) -> None:
        super().__init__()
        self.norm = norm(dim)
        self.linear = nn.Linear(dim, patch_values)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulated(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The tokens before the linear map: the norm, shifted and scaled by the condition."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.modulated(x, c))
