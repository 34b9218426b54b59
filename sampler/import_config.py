"""`ImportConfig`: the options of `latentdit import` (no torch here: `--help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from foundation.config import option
from sampler.errors import CheckpointImportError

FORMATS = ("dit", "sit", "repa")
WEIGHT_SETS = ("ema", "model")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of DiT's, SiT's and REPA's FID evaluations


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    """What to import, and where to write the run."""

    checkpoint: Path = option(
        help="Official DiT/SiT/REPA checkpoint (.pt).", argument=True, exists=True
    )
    run: Path = option(help="Run folder to create (must not hold a checkpoint yet).")
    format: str = option(
        "dit",
        "Source: dit (DDPM, learned sigma), sit (linear flow, SiT time: 0 = noise) or repa (REPA's SiT: linear flow, 1 = noise; projectors dropped).",
    )
    model: str | None = option(
        None,
        "Preset (DiT-XL/2 or SiT-XL/2 ...); None: the checkpoint's args or the preset its shapes match.",
    )
    hidden_size: int | None = option(None, "Hidden size (must match the weights).", min=1)
    depth: int | None = option(None, "Number of blocks (must match the weights).", min=1)
    num_heads: int | None = option(None, "Attention heads (the weights cannot tell).", min=1)
    vae: str = option(
        DEFAULT_VAE,
        "VAE id or folder the model was trained with (its scaling_factor normalizes latents).",
    )
    weights: str = option("ema", "From a train.py checkpoint: ema or model weights.")
    classes: Path | None = option(None, "Class list, one per line in label order: 'id name...' (e.g. LOC_synset_mapping.txt); None: ids 0..K-1.", exists=True, dir_okay=False)  # fmt: skip

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CheckpointImportError(
                f"--format {self.format!r} is not one of {', '.join(FORMATS)}"
            )
        if self.weights not in WEIGHT_SETS:
            raise CheckpointImportError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHT_SETS)}")  # fmt: skip
