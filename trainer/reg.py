"""REG's class token (Wu et al. 2025, "Representation Entanglement for Generation").

REG (Martinser/REG `models/sit.py`, `loss.py`, `samplers.py`) entangles one high-level token with
the latents: the vision encoder's class token c0 (stored as `features_cls`, (D, 1) per variant)
is noised with the latents' time t and its own noise, embedded (Linear D -> hidden, then a
LayerNorm with affine parameters), and put before the patch tokens (no position: REG's table is
zero there). The blocks see T + 1 tokens; the final layer's adaLN-modulated norm of token 0 goes
through its own linear (zero-initialized) to predict the class token's target, trained with
weight `reg_coeff` (REG's --cls 0.03) beside the latents' loss. At sampling time the class token
is generated from noise together with the latents, so a REG model's state is both:

    state = pack(latents (B, C, H, W), class token (B, D))  ->  (B, C*H*W + D)

`DiT.forward` takes and returns that packed state for a REG model, so every solver, guidance and
the objectives' corruption run on it unchanged (guidance then acts on the class token as on every
latent channel; REG's generate.py offers a separate --cls-cfg-scale, not offered here).
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES_CLS = "features_cls"  # the store's array of the encoder's class token, (D, 1) per variant
NORM_EPS = 1e-6  # REG's wg_norm


def pack(latents: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents and (B, D) class tokens as one (B, C*H*W + D) state."""
    return torch.cat([latents.flatten(1), token], dim=1)


def unpack(state: torch.Tensor, latent_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: (latents (B, *latent_shape), class tokens (B, D))."""
    n = int(torch.Size(latent_shape).numel())
    return state[:, :n].reshape(-1, *latent_shape), state[:, n:]


class ClassToken(nn.Module):
    """REG's layers for the class token: its embedding (cls_projectors2, wg_norm) and its output
    (the final layer's linear_cls)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.out = nn.Linear(hidden, dim)

    def reset_parameters(self) -> None:
        """As REG's initialize_weights: Xavier embedding, zero output (a fresh model predicts 0)."""
        nn.init.xavier_uniform_(self.embed.weight)
        nn.init.zeros_(self.embed.bias)
        self.norm.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """(B, D) noisy class tokens -> (B, 1, hidden) input tokens."""
        return self.norm(self.embed(token))[:, None]
