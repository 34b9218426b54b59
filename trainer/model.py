"""The DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): adaLN-Zero blocks.

    model = build_model("DiT-B/2", input_size=32, in_channels=4, num_classes=1000)
    out = model(x, t, y)        # x (B, C, H, W), t (B,) model time, y (B,) labels -> (B, C, H, W)

Label `model.null_class` (= num_classes) is the unconditional class used by classifier-free
guidance; the label table has num_classes + 1 rows. The model predicts one tensor of the input's
shape (velocity or noise, per the objective); with `learn_sigma` it predicts 2C channels: the
prediction, then the variance interpolation v in [-1, 1] of Nichol & Dhariwal 2021 (eq. 15), as
the official DiT checkpoints do. With `head_depth` and `head_width` a DDT head (RAE's DiT^DH,
`trainer.ddt_head`) follows the trunk and predicts instead of the trunk's final layer.
With `repa_depth` (and the projector's widths) the model holds REPA's projector, which reads block
`repa_depth`'s output when called with `align=True` (`trainer.repa`); with `reg_dim` it denoises
REG's class token with the latents, on a packed state (`trainer.reg`).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundation.errors import LatentditError
from trainer.ddt_head import DDTHead
from trainer.layers import (
    FREQ_EMBED_DIM,
    DiTBlock,
    FinalLayer,
    build_projector,
    rope_angles_2d,
    sincos_pos_embed_2d,
    swiglu_hidden,
    timestep_features,
)
from trainer.presets import DDT_HEAD, DIT_PRESETS, PATCH_SIZES, POS_EMBEDS
from trainer.reg import ClassToken, pack, unpack

INIT_STD = 0.02  # label and timestep embeddings (DiT's initialize_weights)
HEAD_KEYS = tuple(DDT_HEAD)  # ("head_depth", "head_width", "head_heads")
# Preset entries that training options may override (TrainConfig fields of the same names).
MODEL_OVERRIDES = ("hidden_size", "depth", "num_heads", *HEAD_KEYS)
REPA_KEYS = ("repa_depth", "repa_projector_dim", "repa_features_dim")  # its projector (training)
REG_KEY = "reg_dim"  # REG's class-token width (`trainer.reg`)


class ModelConfigError(LatentditError):
    """A model preset or size does not fit the data."""


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
        head_depth: int | None = None,
        head_width: int | None = None,
        head_heads: int = DDT_HEAD["head_heads"],
        repa_depth: int | None = None,
        repa_projector_dim: int | None = None,
        repa_features_dim: int | None = None,
        reg_dim: int | None = None,
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
        if head_depth is not None or head_width is not None:  # listed only with a head, so a
            # head-less config (and checkpoint meta) is exactly what it was before heads existed
            head = {"head_depth": head_depth, "head_width": head_width, "head_heads": head_heads}
            self.config |= head
        extra = {
            "repa_depth": repa_depth,
            "repa_projector_dim": repa_projector_dim,
            "repa_features_dim": repa_features_dim,
            REG_KEY: reg_dim,
        }
        self.config |= {k: v for k, v in extra.items() if v is not None}  # listed when set
        check_config(self.config)
        self.patch_size, self.grid = patch_size, input_size // patch_size
        self.null_class = num_classes  # label of the unconditional class (guidance)
        self.num_blocks = depth + (head_depth or 0)
        """Trunk blocks, then head blocks: what `checkpoint_blocks` counts."""
        self.checkpoint_blocks = self.num_blocks if grad_checkpointing else 0
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
        out_values = patch_size * patch_size * self.out_channels
        self.head: DDTHead | None = None
        self.final_layer: FinalLayer | None = None
        if head_depth is None:
            self.final_layer = FinalLayer(hidden_size, out_values)
        else:  # the head predicts: the trunk has no final layer (RAE's DiTwDDTHead)
            self.head = DDTHead(
                trunk_width=hidden_size,
                width=head_width,
                depth=head_depth,
                num_heads=head_heads,
                mlp_ratio=mlp_ratio,
                patch_values=patch_values,
                out_values=out_values,
                qk_norm=qk_norm,
                rope_grid=self.grid if pos_embed == "rope" else None,
            )
        self.projector = None  # REPA's, on block repa_depth's output: training only
        if repa_depth is not None:
            self.projector = build_projector(hidden_size, repa_projector_dim, repa_features_dim)
        self.class_token = None if reg_dim is None else ClassToken(reg_dim, hidden_size)
        self.latent_shape = (in_channels, input_size, input_size)
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
            angles = rope_angles_2d(head_dim, self.grid, self.grid)
            if reg_dim is not None:  # REG's class token leads, unrotated (angle 0)
                angles = torch.cat([angles.new_zeros(1, angles.shape[1]), angles])
            self.register_buffer("rope", angles, persistent=False)
        self.reset_parameters()

    @property
    def transformer_blocks(self) -> list[nn.Module]:
        """Every transformer block in order: the trunk's, then the head's (e.g. to compile each)."""
        return [*self.blocks, *(self.head.blocks if self.head is not None else [])]

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output.

        The head, if any, is initialized as RAE's (`DDTHead.reset_parameters`), REPA's projector
        and REG's class-token layers as theirs.
        """
        in_head = set(self.head.modules()) if self.head is not None else set()
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in in_head:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=INIT_STD)
        nn.init.normal_(self.t_embedder[0].weight, std=INIT_STD)
        nn.init.normal_(self.t_embedder[2].weight, std=INIT_STD)
        final = [self.final_layer] if self.final_layer is not None else []
        for block in [*self.blocks, *final]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer is not None:
            nn.init.zeros_(self.final_layer.linear.weight)
        if self.head is not None:
            self.head.reset_parameters()
        if self.class_token is not None:
            self.class_token.reset_parameters()

    def _block(
        self, i: int, block: nn.Module, h: torch.Tensor, c: torch.Tensor, rope
    ) -> torch.Tensor:
        """Block `i` of `num_blocks`, recomputed in backward when i < checkpoint_blocks."""
        if self.training and i < self.checkpoint_blocks:
            return checkpoint(block, h, c, rope, use_reentrant=False)
        return block(h, c, rope)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, align: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) float, t (B,) float model time, y (B,) long labels -> (B, C, H, W).

        With learn_sigma the output is (B, 2C, H, W): the prediction, then the variance values.
        A REG model takes and returns the packed state (B, C*H*W + reg_dim) (`trainer.reg`).
        With `align` (a model with REPA's projector) it returns (output, projected tokens
        (B, T, features_dim)): the projector on block `repa_depth`'s output.
        """
        p, token = self.patch_size, None
        if self.class_token is not None:
            x, token = unpack(x, self.latent_shape)
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        h = self.x_embedder(tokens)
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        if token is not None:  # REG: the class token leads, without a position
            h = torch.cat([self.class_token(token).to(h.dtype), h], dim=1)
        t_emb = self.t_embedder(timestep_features(t).to(h.dtype))
        c = t_emb + self.y_embedder(y)
        projected = None
        for i, block in enumerate(self.blocks):
            h = self._block(i, block, h, c, self.rope)
            if align and i + 1 == self.config["repa_depth"]:  # REPA: (i + 1) == encoder_depth
                projected = self.projector(h)
        if self.head is not None:  # head block j is block depth + j of the recompute count
            depth = len(self.blocks)
            out = self.head(tokens, h, t_emb, lambda j, *args: self._block(depth + j, *args))
        elif token is None:
            out = self.final_layer(h, c)
        else:  # REG: the patches from tokens 1.., the class token from token 0
            m = self.final_layer.modulated(h, c)
            out, token = self.final_layer.linear(m[:, 1:]), self.class_token.out(m[:, 0])
        out = rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=p, q=p)
        out = out if token is None else pack(out, token.to(out.dtype))
        return (out, projected) if align else out


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
    if "head_depth" in config:
        _check_head(config)
    _check_alignment(config)


def _check_alignment(config: dict[str, Any]) -> None:
    """REPA's projector keys come together, read a trunk block; REG's token needs the plain trunk."""
    repa = [config.get(k) for k in REPA_KEYS]
    if any(v is not None for v in repa):
        if any(v is None or v < 1 for v in repa):
            raise ModelConfigError(f"REPA's projector needs all of {REPA_KEYS} >= 1, got {repa}")
        if repa[0] > config["depth"]:
            raise ModelConfigError(
                f"REPA reads block {repa[0]}, beyond the trunk's {config['depth']} blocks"
            )
    if config.get(REG_KEY) is None:
        return
    if config[REG_KEY] < 1 or "head_depth" in config or config["learn_sigma"]:
        raise ModelConfigError(
            f"REG's class token (width {config[REG_KEY]} >= 1) needs a DiT without the DDT head "
            "and without learn_sigma"
        )


def _check_head(config: dict[str, Any]) -> None:
    depth, width, heads = (config[k] for k in HEAD_KEYS)
    if depth is None or width is None:
        raise ModelConfigError(
            f"a DDT head needs both a depth and a width (got head_depth {depth}, head_width "
            f"{width}): give both (RAE: 2 and 2048), or neither for no head"
        )
    if depth < 1 or width < 1 or heads < 1:
        raise ModelConfigError(
            f"head depth, width and heads must be >= 1, got {depth}, {width}, {heads}"
        )
    if width % heads:
        raise ModelConfigError(f"head width {width} is not divisible by {heads} head heads")
    if config["pos_embed"] == "rope" and (width // heads) % 4:
        raise ModelConfigError(
            f"2-D RoPE needs a head size divisible by 4, got {width // heads} in the head"
        )


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


def _block_macs(tokens: int, width: int, mlp_macs: int, *, per_token_condition: bool) -> int:
    """Multiply-adds of one adaLN block for one sample: qkv, scores and values, projection, MLP
    (`mlp_macs` per token) and the adaLN linear (once per sample, or per token in the head)."""
    attention = tokens * 4 * width * width + 2 * tokens * tokens * width
    ada_ln = (tokens if per_token_condition else 1) * width * 6 * width
    return attention + tokens * mlp_macs + ada_ln


def forward_flops(config: dict[str, Any]) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass for one sample.

    Counts the matrix products (patch embeddings, qkv, attention scores and values, projections,
    MLPs, adaLN, the head's condition projection, REPA's projector, output); elementwise work is
    left out.
    DiT-XL/2 at 32x32: ~237 GFLOP (the DiT paper's 118.6 "GFLOPs" are multiply-adds).
    """
    d, depth = config["hidden_size"], config["depth"]
    tokens = (config["input_size"] // config["patch_size"]) ** 2
    patch_values = config["patch_size"] ** 2 * config["in_channels"]
    out_values = patch_values * (2 if config.get("learn_sigma") else 1)
    gelu_mlp = 2 * d * int(d * config["mlp_ratio"])
    macs = tokens * patch_values * d + FREQ_EMBED_DIM * d + d * d  # patches, timestep MLP
    if config.get(REG_KEY):  # REG: one more token, its embedding and its output
        tokens, macs = tokens + 1, macs + 2 * config[REG_KEY] * d
    if config.get("repa_depth"):  # REPA's projector on every token read at repa_depth
        p, z = config["repa_projector_dim"], config["repa_features_dim"]
        macs += tokens * (d * p + p * p + p * z)
    macs += depth * _block_macs(tokens, d, gelu_mlp, per_token_condition=False)
    if config.get("head_depth") is None:
        return 2.0 * (macs + d * 2 * d + tokens * d * out_values)  # final adaLN, output
    w = config["head_width"]
    swiglu = 3 * w * swiglu_hidden(w, config["mlp_ratio"])
    macs += tokens * patch_values * w + (tokens * d * w if w != d else 0)  # embed, condition
    macs += config["head_depth"] * _block_macs(tokens, w, swiglu, per_token_condition=True)
    macs += tokens * w * 2 * w + tokens * w * out_values  # per-token final adaLN, output
    return 2.0 * macs
