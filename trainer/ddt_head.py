"""The DDT head of DiT^DH: a shallow, wide transformer after the DiT trunk, for wide latents.

RAE (Zheng et al. 2025, "Diffusion Transformers with Representation Autoencoders") puts the head
of DDT (Wang et al. 2025, "DDT: Decoupled Diffusion Transformer") after a DiT trunk to denoise
latents with hundreds of channels (DINOv2-B: 768x16x16) without widening the whole trunk. The
structure follows bytetriper/RAE `src/stage2/models/DDT.py` (DiTwDDTHead, LightningDDTBlock,
DDTFinalLayer); this is a reimplementation, no code is copied:

    s = W_proj silu(z + t_emb)        z (B, T, D): the trunk's output tokens, no final norm;
                                      t_emb (B, D): the timestep embedding (not the label);
                                      W_proj: D -> W (none when the widths agree)
    h = W_in patches(x)               the head embeds the noisy latent again, at width W;
                                      no additive position table (RoPE with --pos-embed rope)
    h = block(h, s)   x head_depth    adaLN-Zero blocks modulated per token by s: RMSNorm,
                                      SwiGLU (hidden 2/3 of mlp_ratio x W), q/k RMSNorm
    out = W_out modulate(RMSNorm(h), s)   final layer, per-token shift and scale

Initialization as RAE's (`initialize_weights` with xavier_uniform_init=False): PyTorch's default
for the head's linears, Xavier for its patch embedding, zeros for every adaLN layer and for the
output layer, so a fresh model predicts 0. RAE's DiT-DH-XL: depth 2, width 2048, 16 heads
(`trainer.presets.DDT_HEAD`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.layers import DiTBlock, FinalLayer, RMSNorm, SwiGLU, rope_angles_2d

BlockRunner = Callable[
    [int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor
]
"""run(j, block, h, s, rope) -> h: how head block j is called (the DiT's recompute policy)."""


class DDTHead(nn.Module):
    """The head's layers; see the module docstring."""

    def __init__(
        self,
        *,
        trunk_width: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_values: int,
        out_values: int,
        qk_norm: bool,
        rope_grid: int | None,
    ) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(patch_values, width)
        self.projector = nn.Linear(trunk_width, width) if trunk_width != width else nn.Identity()
        self.blocks = nn.ModuleList(
            DiTBlock(
                width, num_heads, mlp_ratio, qk_norm=qk_norm, norm=RMSNorm, qk=RMSNorm, mlp=SwiGLU
            )
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(width, out_values, norm=RMSNorm)
        angles = (
            None if rope_grid is None else rope_angles_2d(width // num_heads, rope_grid, rope_grid)
        )
        self.register_buffer("rope", angles, persistent=False)  # None: no RoPE

    def forward(
        self,
        patches: torch.Tensor,
        trunk: torch.Tensor,
        t_emb: torch.Tensor,
        run: BlockRunner | None = None,
    ) -> torch.Tensor:
        """(B, T, out_values) from the noisy latent's patches (B, T, P), the trunk's output
        tokens (B, T, D) and the timestep embedding (B, D); `run` calls each block (default:
        block(h, s, rope))."""
        s = self.projector(F.silu(trunk + t_emb[:, None]))  # per-token conditions (B, T, W)
        h = self.x_embedder(patches)
        for j, block in enumerate(self.blocks):
            h = run(j, block, h, s, self.rope) if run else block(h, s, self.rope)
        return self.final_layer(h, s)

    def reset_parameters(self) -> None:
        """RAE's initialization (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.RMSNorm)):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        for layer in [*self.blocks, self.final_layer]:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
