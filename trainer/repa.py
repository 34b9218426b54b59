"""REPA's alignment loss on stored encoder features (and REG's class-token loss beside it).

    latentdit train --store S --run R --repa-coeff 0.5 --repa-depth 8     # REPA's defaults
    latentdit train ... --repa-coeff 0.5 --repa-depth 4 --reg             # and REG's token

REPA (Yu et al. 2025, "Representation Alignment for Generation"; sihyun-yu/REPA `loss.py`,
`models/sit.py`): the output h of DiT block `depth` (1-based: REPA's `(i + 1) == encoder_depth`)
goes through a projector MLP (Linear, SiLU, Linear, SiLU, Linear; hidden -> 2048 -> 2048 -> the
feature width D) and is aligned token by token with a frozen vision encoder's patch tokens z:

    L = L_objective + coeff * L_proj,   L_proj = mean over samples and tokens of -cos(z, proj(h))

Here z comes from the store (`features`, (D, T) per variant, T = h*w tokens in row-major order,
written by `latentdit encode --features`), dequantized on the device, the same sample and variant
(image or flip) as the latents. The projector belongs to the trained model (`DiT.projector`): the
optimizer, gradient clipping, the EMA and checkpoints hold it, as REPA's do; sampling drops it.

Token grids. REPA at 512 px resamples DINOv2's position embedding to 32x32 and feeds it a 448-px
image, so the encoder emits the DiT's 32x32 grid. Stored features have the grid they were encoded
with (16x16 for DINOv2 at 224 px), so when the DiT's token grid differs (patch 1 on 32x32 latents,
patch 4, a 512-px store encoded at 224 px) the stored grid is interpolated to the DiT's: bilinear
upsampling (align_corners=False), area averaging when the DiT's grid is coarser. That differs from
REPA at 512 px: an upsampled 16x16 grid carries no detail finer than the 224-px view the encoder
saw, where REPA's encoder sees the image at 448 px. Encode the features at the DiT's grid to avoid
it.

With REG (`trainer.reg`) the class token `features_cls` is denoised with the latents and also
leads the aligned tokens (REG aligns its T + 1 tokens).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from foundation.errors import LatentditError
from latent_store.arrays import LATENTS
from trainer.model import REPA_KEYS
from trainer.objective import Loss, ModelFn, Objective
from trainer.presets import REG_COEFF, REPA_DEPTH, REPA_PROJECTOR_DIM
from trainer.reg import FEATURES_CLS, pack, unpack

if TYPE_CHECKING:  # type names only: the store's modules import zarr
    from latent_store import LatentStore
    from trainer.config import TrainConfig
    from trainer.model import DiT

log = logging.getLogger(__name__)

FEATURES = "features"  # the store's array of encoder patch tokens, (D, T) per variant
PROJECTOR = "projector."  # its parameters' prefix in a DiT's state dict
PROJECTOR_FILE = "projector.safetensors"  # an imported REPA checkpoint's projector (`import`)


class RepaError(LatentditError):
    """The store or the checkpoint cannot serve REPA (or REG) training."""


def alignment_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """REPA's proj_loss: -cos(z, z~) per token, averaged over tokens, then over samples.

    projected, features: (B, T, D). In float32 whatever the autocast dtype.
    """
    z_tilde = F.normalize(projected.float(), dim=-1)
    z = F.normalize(features.float(), dim=-1)
    return -(z * z_tilde).sum(dim=-1).mean()


def token_grid(tokens: int, where: str) -> int:
    """The side of a square grid of `tokens` tokens; RepaError naming `where` otherwise."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise RepaError(
            f"{where}: {tokens} feature tokens are not a square grid (h*w with h = w); "
            "encode the features of a square crop"
        )
    return side


def tokens_on_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Stored features (B, D, T) as (B, grid*grid, D) tokens: resampled when T != grid^2
    (bilinear up, area down; see the module docstring)."""
    b, d, t = features.shape
    side = math.isqrt(t)
    if side != grid:
        image = features.float().view(b, d, side, side)
        if grid < side:
            image = F.interpolate(image, size=(grid, grid), mode="area")
        else:
            image = F.interpolate(image, size=(grid, grid), mode="bilinear", align_corners=False)
        features = image.flatten(2)
    return features.transpose(1, 2)


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """The training loss with REPA: the objective's on the latents, plus `coeff` times the
    alignment loss, plus (REG) `reg_coeff` times the class token's. `batch_loss` takes a named
    batch as `train_step` gives it; its terms are the objective's, "proj", and "cls" (REG)."""

    objective: Objective
    coeff: float
    grid: int
    """The DiT's token grid side (input size / patch size)."""
    reg_coeff: float | None = None
    """REG's class-token loss weight; None: no REG."""

    @property
    def arrays(self) -> tuple[str, ...]:
        """The declared arrays the batches must carry besides the latents."""
        return (FEATURES, FEATURES_CLS) if self.reg_coeff is not None else (FEATURES,)

    def batch_loss(
        self,
        model_fn: ModelFn,
        batch: dict[str, torch.Tensor],
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        offset: int = 0,
        total: int | None = None,
    ) -> Loss:
        """The loss of one micro-batch; draws as the objective does (REG: its noise for the
        latents and the class token in one draw, `trainer.reg.pack`)."""
        x0, targets = batch[LATENTS], tokens_on_grid(batch[FEATURES], self.grid)
        reg = self.reg_coeff is not None
        if reg:
            c0 = batch[FEATURES_CLS][..., 0]  # (B, D): the class token
            targets = torch.cat([c0[:, None].float(), targets], dim=1)  # REG aligns T + 1 tokens
            x0 = pack(x0, c0.to(x0.dtype))
        x_t, t, target = self.objective.corrupt(x0, generator, offset=offset, total=total)
        out, projected = model_fn(x_t, t, y, align=True)
        out, target = out.float(), target.float()
        if reg:
            shape = batch[LATENTS].shape[1:]
            (out, cls_out), (target, cls_target) = unpack(out, shape), unpack(target, shape)
            x_t, x0 = unpack(x_t, shape)[0], batch[LATENTS]
        base = self.objective.loss_of(out, x0=x0, x_t=x_t, t=t, target=target)
        proj = alignment_loss(projected, targets)
        value, terms = base.value + self.coeff * proj, {**base.terms, "proj": proj.detach()}
        if reg:
            cls = F.mse_loss(cls_out, cls_target)
            value, terms["cls"] = value + self.reg_coeff * cls, cls.detach()
        return Loss(value, terms)


def features_fingerprint(store: LatentStore, name: str) -> str:
    """A digest of array `name`'s checksums in every shard record: it changes with its data."""
    spec = store.spec.array(name)
    records = store.records(name) if spec.added else store.records()
    h = hashlib.blake2b(digest_size=16)
    for record in records:
        part = record.arrays.get(name) if record is not None else None
        h.update((part.checksum if part is not None else "-").encode())
    return f"blake2b-128:{h.hexdigest()}"


def features_meta(store: LatentStore, name: str) -> dict[str, Any]:
    """What a checkpoint records of the features it was trained on (checked on resume)."""
    array = store.spec.array(name)
    fingerprint = features_fingerprint(store, name)
    return {**array.layout(), "description": array.description, "fingerprint": fingerprint}


def _features_shape(store: LatentStore, name: str, flag: str) -> tuple[int, ...]:
    if name not in store.spec.names:
        raise RepaError(
            f"{flag} needs the vision encoder's {name!r} in the store, and {store.path} has "
            f"only {', '.join(store.spec.names)}: encode it with `latentdit encode ... --features "
            f"ENCODER` (docs/encode.md), or drop {flag}"
        )
    return store.spec.array(name).shape


def model_sizes(cfg: TrainConfig, store: LatentStore) -> dict[str, int]:
    """The DiT options that REPA and REG add (`REPA_KEYS`, reg_dim), sized to the store's
    features; {} without --repa-coeff. Refuses a store without features, or with features that
    are not (D, T) tokens on a square grid."""
    if cfg.repa_coeff is None:
        return {}
    shape = _features_shape(store, FEATURES, "--repa-coeff")
    if len(shape) != 2:
        raise RepaError(f"{store.path}: {FEATURES!r} is {shape} per sample, not (D, T) tokens")
    token_grid(shape[1], f"{store.path} {FEATURES!r} {shape}")
    sizes = {
        "repa_depth": cfg.repa_depth or REPA_DEPTH,
        "repa_projector_dim": cfg.repa_projector_dim or REPA_PROJECTOR_DIM,
        "repa_features_dim": shape[0],
    }
    if cfg.reg:
        cls_shape = _features_shape(store, FEATURES_CLS, "--reg")
        if len(cls_shape) != 2 or cls_shape[1] != 1:
            raise RepaError(
                f"{store.path}: {FEATURES_CLS!r} is {cls_shape} per sample, not (D, 1): one class "
                "token"
            )
        sizes["reg_dim"] = cls_shape[0]
    return sizes


def alignment_for(
    cfg: TrainConfig, store: LatentStore, objective: Objective, model: DiT
) -> Alignment | None:
    """The REPA (and REG) loss of a run, or None without --repa-coeff."""
    if cfg.repa_coeff is None:
        return None
    grid = model.grid
    stored = token_grid(store.spec.array(FEATURES).shape[1], FEATURES)
    if stored != grid:
        how = "bilinear" if grid > stored else "area"
        log.info("REPA: stored %d^2 feature grid resampled (%s) to %d^2 tokens", stored, how, grid)
    reg = (cfg.reg_coeff or REG_COEFF) if cfg.reg else None
    return Alignment(objective=objective, coeff=cfg.repa_coeff, grid=grid, reg_coeff=reg)


def alignment_meta(alignment: Alignment, store: LatentStore) -> dict[str, Any]:
    """meta.json's "repa": the loss weights and the features trained on."""
    return {
        "coeff": alignment.coeff,
        "reg_coeff": alignment.reg_coeff,
        "features": {name: features_meta(store, name) for name in alignment.arrays},
    }


def check_resumed_features(latest: Path, theirs: dict | None, ours: dict | None) -> None:
    """Refuse a resume on features other than the checkpoint's (encoder, dims, or data)."""
    if theirs == ours:
        return
    if theirs is None or ours is None:
        which = "with" if theirs else "without"
        raise RepaError(
            f"{latest} was trained {which} REPA; resume it as it was, or use a new --run"
        )
    for name, was in theirs["features"].items():
        now = ours["features"].get(name, {})
        changed = [k for k in {**was, **now} if was.get(k) != now.get(k)]
        if changed:
            parts = "; ".join(
                f"{k}: {was.get(k)!r} (run) vs {now.get(k)!r} (store)" for k in changed
            )
            raise RepaError(
                f"{latest} was trained on other {name!r} than the store holds ({parts}); use the "
                "store it was trained on, or a new --run"
            )
    raise RepaError(
        f"{latest} holds REPA settings {theirs} other than this run's {ours}; use a new --run"
    )


# --- checkpoints: sampling drops the projector, --init keeps it where it fits ----------------------


def sampling_config(config: dict[str, Any]) -> dict[str, Any]:
    """A DiT config without the projector (what sampling builds)."""
    return {k: v for k, v in config.items() if k not in REPA_KEYS}


def without_projector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(PROJECTOR)}


def init_state(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> dict:
    """The --init weights for `model` from a checkpoint's `state`: its DiT, and its projector
    (in its weights, or an import's `projector.safetensors`) where `model` has one of the same
    shapes; otherwise the run's own fresh projector, with a warning saying why."""
    mine = {k: v for k, v in model.state_dict().items() if k.startswith(PROJECTOR)}
    theirs = {k: v for k, v in state.items() if k.startswith(PROJECTOR)}
    if not theirs and (folder / PROJECTOR_FILE).is_file():
        theirs = load_file(folder / PROJECTOR_FILE)
    state = without_projector(state)
    if not mine:
        return state
    shapes = [{k: tuple(v.shape) for k, v in d.items()} for d in (theirs, mine)]
    if shapes[0] == shapes[1]:
        log.info("--init %s: its REPA projector fits and is kept", folder)
        return state | theirs
    why = "has no REPA projector" if not theirs else f"has a projector of other shapes {shapes[0]}"
    log.warning("--init %s %s; this run's projector %s starts fresh", folder, why, shapes[1])
    return state | mine
