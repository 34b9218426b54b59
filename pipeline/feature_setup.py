"""Declare a store's feature arrays: calibrated on the calibration images when they are made,
checked against the encoder given when a store that has them is resumed.

    planned = planned_arrays(encoder, cfg, flip=True)           # the layout, for comparisons
    made = calibrate_features(encoder, cfg, crops, flip=True)    # the declarations, calibrated
    write_projection(store, made)                                # beside them, sealed by checksum

Calibration runs the encoder on the crops that calibrate the latents (all variants). With
`--features-dims K` it fits a PCA on their patch tokens (every token of every image and variant
a row, at most CALIBRATION_VALUES values): mu their mean, W the K principal axes (unit rows, in
order of decreasing variance, each signed so that its largest entry is positive). Both arrays
then hold y = W (z - mu): the patch tokens (K, T) and the class token (K, 1), so that they keep
one width. The projection is stored as `features_projection`, float32 (K + 1, D): row 0 mu, rows
1..K W; the declaration of `features` seals its checksum. uint8 arrays get per-channel affine
parameters from the (projected) values (`latent_store.calibrate`); the error that storing them
adds is measured on the same values and recorded (`made_by["quantization_error"]`: the rms error
relative to the values' rms, and the mean cosine similarity of each token to its stored version).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from latent_store import ArraySpec, LatentStore, QuantParams, calibrate
from latent_store.attached import ATTACHED, attachment_checksum, read_attached, write_attached
from latent_store.quantize import dequantize, quantize
from pipeline.feature_graph import NAMES, Projection, encode_views
from pipeline.features import RAE, FeatureEncoder, FeaturesError, trunk_digest
from pipeline.features_config import FEATURES, FEATURES_CLS, FeaturesConfig

log = logging.getLogger(__name__)

CALIBRATION_VALUES = 1 << 26  # token values kept for the PCA and quantization (256 MB float32)
PROJECTION = "projection"  # the attachment key: `features_projection`
# what must match for a store's features to be resumed with an encoder (of made_by)
IDENTITY = ("class", "model_type", "weights", "hidden_size", "patch_size", "grid", "preprocess")
TOKENS = {FEATURES: "patch", FEATURES_CLS: "class"}
# The quantization range of each array (`latent_store.calibrate`). Patch tokens: its defaults
# (0.01-99.99th percentiles + 5% of the width on each side) over ~10^5 tokens put the range near
# 4 std out. The class token has one row per image and variant (512-1024): there the percentiles
# are the extremes, 3 std out, and a 5% margin would leave ~1e-3 of new values clipped (what
# validate fails), so it spans the extremes + 25% of the width (~4.3 std for a Gaussian).
CALIBRATION = {
    FEATURES: {},
    FEATURES_CLS: {"lower_percentile": 0.0, "upper_percentile": 100.0, "margin": 0.25},
}


@dataclass(frozen=True)
class Calibrated:
    """The calibrated declarations of the feature arrays, and the projection they use."""

    arrays: tuple[ArraySpec, ...]
    projection: Projection | None


def _describe(name: str, encoder: FeatureEncoder, width: int, dims: int | None) -> str:
    g = encoder.grid
    what = (
        f"patch tokens ({width}, {g * g}): {g}x{g} tokens in row-major order"
        if name == FEATURES
        else f"class token ({width}, 1)"
    )
    projected = f", projected on {dims} principal components: y = W (z - mu)" if dims else ""
    return (
        f"{encoder.facts['encoder']} {what}, channel first, per variant; its last_hidden_state "
        f"after the final LayerNorm{projected} (made_by)"
    )


def _declare(
    encoder: FeatureEncoder,
    cfg: FeaturesConfig,
    quant: dict[str, QuantParams | None],
    made_by: dict[str, dict[str, Any]],
) -> tuple[ArraySpec, ...]:
    width = cfg.dims or encoder.hidden
    shapes = {FEATURES: (width, encoder.tokens), FEATURES_CLS: (width, 1)}
    return tuple(
        ArraySpec(
            name=name,
            shape=shapes[name],
            dtype=cfg.stored_dtype,
            quant=quant[name],
            description=_describe(name, encoder, width, cfg.dims),
            made_by=made_by[name],
        )
        for name in NAMES
    )


def planned_arrays(encoder: FeatureEncoder, cfg: FeaturesConfig) -> tuple[ArraySpec, ...]:
    """The feature arrays' layout (placeholder parameters), to compare with a store's."""
    width = cfg.dims or encoder.hidden
    placeholder = QuantParams(offset=(0.0,) * width, scale=(1.0,) * width)
    quant = {n: placeholder if cfg.stored == "uint8" else None for n in NAMES}
    return _declare(encoder, cfg, quant, {n: _made_by(encoder, n, cfg) for n in NAMES})


def _made_by(encoder: FeatureEncoder, name: str, cfg: FeaturesConfig) -> dict[str, Any]:
    return {**encoder.facts, "tokens": TOKENS[name], "dims": cfg.dims, "dtype": cfg.dtype}


def _subsample(rows: torch.Tensor, start: int, stride: int) -> torch.Tensor:
    """The rows whose global index (start + i) is a multiple of `stride`."""
    first = (-start) % stride
    return rows[first::stride]


def calibration_values(
    encoder: FeatureEncoder, crops: torch.Tensor, *, flip: bool, batch_size: int
) -> dict[str, torch.Tensor]:
    """float32 rows (N, D) of the encoder's tokens of `crops` (uint8 (n, H, W, 3)), per array:
    every (image, variant, token), the patch tokens thinned to at most CALIBRATION_VALUES values."""
    variants = 2 if flip else 1
    patches = len(crops) * variants * encoder.tokens
    stride = max(1, math.ceil(patches * encoder.hidden / CALIBRATION_VALUES))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in NAMES}
    seen = 0
    for b in range(0, len(crops), batch_size):
        patch, cls = encode_views(encoder, crops[b : b + batch_size], flip=flip)
        patch = patch.transpose(-1, -2).reshape(-1, encoder.hidden).cpu()  # (b*V*T, D)
        rows[FEATURES].append(_subsample(patch, seen, stride))
        rows[FEATURES_CLS].append(cls.reshape(-1, encoder.hidden).cpu())
        seen += len(patch)
    return {n: torch.cat(r) for n, r in rows.items()}


def fit_pca(rows: torch.Tensor, dims: int) -> Projection:
    """The first `dims` principal axes of rows (N, D) and their mean."""
    x = rows.double()
    mean = x.mean(0)
    centered = x - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centered.T @ centered / len(x))
    order = torch.argsort(eigenvalues, descending=True)[:dims]
    axes = eigenvectors[:, order].T  # (K, D)
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    axes = axes * signs
    return Projection(mean=mean.float().numpy(), components=axes.float().numpy())


def storing_error(values: torch.Tensor, quant: QuantParams | None) -> dict[str, float]:
    """What storing rows (N, K) adds: rms error relative to the values' rms, and the mean cosine
    similarity of each row to its stored version (uint8 with `quant`, else float16)."""
    if quant is None:
        stored = values.half().float()
    else:
        codes, _ = quantize(values[:, :, None], quant, dims=1)
        stored = dequantize(codes, quant, dims=1)[:, :, 0]
    error = (stored - values).double()
    rms = float(
        error.square().mean().sqrt() / values.double().square().mean().sqrt().clamp_min(1e-30)
    )
    cosine = float(torch.nn.functional.cosine_similarity(stored, values, dim=1).double().mean())
    return {"relative_rms": rms, "cosine": cosine, "rows": len(values)}


def calibrate_features(
    encoder: FeatureEncoder,
    cfg: FeaturesConfig,
    crops: torch.Tensor,
    *,
    flip: bool,
    batch_size: int,
    projection: Projection | None = None,
) -> Calibrated:
    """The declarations of the feature arrays, calibrated on the calibration crops.

    projection: the one a store's `features` declare already (else, with cfg.dims, fitted here).
    """
    rows = calibration_values(encoder, crops, flip=flip, batch_size=batch_size)
    info = None
    if cfg.dims is not None:
        if cfg.dims > encoder.hidden:
            raise FeaturesError(
                f"--features-dims {cfg.dims}: {cfg.encoder} makes {encoder.hidden}-wide tokens; "
                f"give at most {encoder.hidden}"
            )
        if projection is None:
            projection = fit_pca(rows[FEATURES], cfg.dims)
        total = float(rows[FEATURES].double().var(0, correction=0).sum())
        rows = {n: projection.apply(r[:, :, None])[:, :, 0] for n, r in rows.items()}
        kept = float(rows[FEATURES].double().var(0, correction=0).sum()) / max(total, 1e-30)
        checksum = attachment_checksum(projection.to_array())
        info = {
            "dims": cfg.dims,
            "explained_variance": kept,
            "fitted_on_tokens": len(rows[FEATURES]),
            "formula": "y = W (z - mu)",
            "array": f"{FEATURES}_{PROJECTION}: float32 (K + 1, D), row 0 mu, rows 1..K W",
            "checksum": checksum,
        }
        log.info(
            "PCA to %d of %d dims keeps %.2f%% of the variance",
            cfg.dims,
            encoder.hidden,
            100 * kept,
        )
    quant, made_by = {}, {}
    for name in NAMES:
        quant[name] = None  # float16: stored as they are
        if cfg.stored == "uint8":
            quant[name] = calibrate(rows[name][:, :, None], dims=1, **CALIBRATION[name])
        made_by[name] = {
            **_made_by(encoder, name, cfg),
            "projection": info,
            "calibration": {"images": len(crops), "variants": 2 if flip else 1},
            "quantization_error": storing_error(rows[name], quant[name]),
        }
    if info is not None:
        made_by[FEATURES][ATTACHED] = {PROJECTION: info["checksum"]}
    log.info("feature storing error: %s", {n: m["quantization_error"] for n, m in made_by.items()})
    return Calibrated(arrays=_declare(encoder, cfg, quant, made_by), projection=projection)


def write_projection(store: LatentStore, made: Calibrated) -> None:
    """Write the projection beside the arrays that declare it (nothing without one)."""
    if made.projection is not None:
        write_attached(store, FEATURES, PROJECTION, made.projection.to_array())


def read_projection(store: LatentStore) -> Projection | None:
    """The store's feature projection, checked against its sealed checksum; None without one."""
    if PROJECTION not in ((store.spec.array(FEATURES).made_by or {}).get(ATTACHED) or {}):
        return None
    return Projection.from_array(read_attached(store, FEATURES, PROJECTION))


def check_same_features(
    path: str, have: ArraySpec, encoder: FeatureEncoder, cfg: FeaturesConfig
) -> None:
    """Refuse (one line) resuming a store's features with another encoder or other options."""
    made = dict(have.made_by or {})
    now = _made_by(encoder, FEATURES, cfg)
    diffs = [(k, made.get(k), now[k]) for k in IDENTITY if made.get(k) != now[k]]
    if (made.get("dims"), have.dtype) != (cfg.dims, cfg.stored_dtype):
        diffs.append(("dims, dtype", (made.get("dims"), have.dtype), (cfg.dims, cfg.stored_dtype)))
    if diffs:
        name, a, b = diffs[0]
        raise FeaturesError(
            f"--features {cfg.encoder}: {path} holds features made by {made.get('encoder')} "
            f"otherwise ({name}: {_short(a)} (store) vs {_short(b)} (now)); re-run with the "
            "encoder and --features-* options that made them, or choose another --out"
        )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refuse_rae_duplicate(vae, encoder: FeatureEncoder, cfg: FeaturesConfig) -> None:
    """Refuse features that would repeat an RAE store's latents: an encoder with the weights of
    the --vae AutoencoderRAE's encoder (its final LayerNorm aside) on the same token grid."""
    if vae.family != RAE or getattr(vae.model, "encoder", None) is None or encoder.grid != vae.grid:
        return
    if trunk_digest(vae.model.encoder, encoder.kind) != trunk_digest(encoder, encoder.kind):
        return
    raise FeaturesError(
        f"--features {cfg.encoder}: the encoder of --vae {vae.name} ({RAE}) has these weights, "
        f"on the same {vae.grid}x{vae.grid} grid: the store's latents are these patch tokens "
        "already (normalized per position by its latents_mean / latents_std), so storing them "
        "again only doubles the bytes per image; drop --features, or name another encoder"
    )
