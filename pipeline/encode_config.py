"""The options of one encode job, checked once: the frozen config the CLI fills in."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from foundation.autoencoders.loading import VaeConfig
from foundation.compile import COMPILE_MODES
from foundation.config import option
from foundation.files import DEFAULT_MAX_FILE_MB
from foundation.precision import NAMES as DTYPES
from foundation.urls import check_options_apply, parse_storage_options
from latent_store import VARIANTS, LatentditError
from latent_store.schema import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE, POSTERIOR_MODES
from pipeline.features_config import FeaturesConfig
from pipeline.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig
from pipeline.source import LABEL_KEY

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# The default --max-failures: a handful of bad files is normal in a small folder (2 of 135 is
# not a broken dataset), 1% is normal at scale, and more than a tenth of a source failing means
# the wrong folder, a truncated download or a decoder problem.
FAILURES_TOLERATED = 10
FAILURE_FRACTION = 0.01
FAILURE_SHARE_MAX = 0.10
FAILURE_RULE = (
    f"max({FAILURES_TOLERATED}, {FAILURE_FRACTION:.0%} of the images), "
    f"never more than {FAILURE_SHARE_MAX:.0%}"
)
DEVICES = ("cpu", "cuda")
# What the speed options mean when left unset (None): SPEED_DEFAULTS on every device, except where
# CUDA_DEFAULTS says otherwise on a GPU. bench/gpu_perf.sh (its encode_* steps) times each option
# against these defaults on one GPU, side by side, with the codes' agreement with eager bf16; one
# that measurably wins becomes one line of CUDA_DEFAULTS, e.g. "compile": True,
# "compile_mode": "reduce-overhead", "cudnn_benchmark": True (then update docs/encode.md).
SPEED_DEFAULTS = {"compile": False, "compile_mode": "default", "cudnn_benchmark": False}
CUDA_DEFAULTS: dict[str, object] = {}  # nothing measured yet: no GPU has run the sweep


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """One encode job: where the images are, how to encode them, where the store goes."""

    source: Path = option(argument=True)
    """An ImageNet-style class-folder tree, a flat val folder (with `val_labels`), or webdataset
    tars: a folder of them, a brace pattern, or a .txt file listing tar paths."""
    out: str
    """The store to create, or to resume when it exists: a folder or an fsspec URL (s3://...)."""
    storage_options: str | None = None
    """JSON object of fsspec options for a store URL (endpoint_url, key, ...); None: the
    driver's usual places (environment, AWS_ENDPOINT_URL, ~/.aws, fsspec config)."""
    vae: str = DEFAULT_VAE
    """Hub id or local folder of a diffusers autoencoder: AutoencoderKL, AutoencoderKLFlux2,
    AutoencoderDC or AutoencoderRAE (a pipeline's, in its vae/ subfolder, works too)."""
    vae_revision: str | None = None
    """Hub revision of the VAE."""
    dtype: str = "fp32"
    """VAE compute dtype: fp32, bf16 or fp16."""
    device: str | None = None
    """cpu, cuda or cuda:N; default: cuda when available."""
    compile: bool | None = None
    """torch.compile the encode graph (uint8 crops to uint8 codes: encoder, posterior and
    quantization in one graph, one static batch shape); None: the device's default (off)."""
    compile_mode: str | None = None
    """torch.compile mode of --compile: default, reduce-overhead (CUDA graphs), max-autotune
    (autotuned kernels and CUDA graphs: compiles for minutes) or max-autotune-no-cudagraphs;
    None: the device's default (default)."""
    compile_cache: Path | None = None
    """Folder for torch.compile's caches and artifacts, so that a resumed run or another rank
    (on any node that sees the folder) does not compile again; None: torch's default cache."""
    cudnn_benchmark: bool | None = None
    """Let cuDNN time its convolution algorithms (CUDA; may change float rounding between runs);
    None: the device's default (off)."""
    image_size: int = 256
    """Side of the ADM center crop in pixels."""
    flip: bool = False
    """Also encode the horizontal flip of every crop (a second variant)."""
    posterior: str = "mean"
    """mean, sample (seeded per key), or moments (mean and log std)."""
    batch_size: int = 64
    """Images per VAE forward pass."""
    workers: int | None = None
    """DataLoader worker processes that decode and crop (0: in the main process); None sizes
    them to the machine: on a GPU every core this rank has but one, on the CPU half of them."""
    prefetch: int = 2
    """Decoded batches each worker queues ahead (in shared memory)."""
    val_labels: Path | None = None
    """ImageNet val labels: LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt."""
    classes: Path | None = None
    """Class list file (one id per line) fixing the label order; default: sorted folder names."""
    devkit_synsets: Path | None = None
    """wnids in the devkit's meta.mat order, for the devkit ground truth (else meta.mat + scipy)."""
    label_key: str = LABEL_KEY
    """Webdataset tars: the json field holding each sample's class (a .cls member wins)."""
    include_unfinished: bool = False
    """Webdataset tars: also use tars that have no img2dataset `_stats.json` (unfinished)."""
    max_failures: int | float | str | None = None
    """Undecodable images tolerated: a count (100), a fraction (0.01) or a percentage (1%) of the
    source; default: max(10, 1% of the images), never more than 10%. Under torchrun each rank
    holds its own failures to this limit."""
    exif_transpose: bool = False
    """Apply EXIF orientation before cropping (off: ImageNet parity)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are skipped as decompression bombs."""
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    """Source files (or tar members) larger than this many MB are skipped without being read."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Samples per store shard (the unit of work and of resume)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Samples per Zarr chunk; divides shard_size."""
    calibration_samples: int = 512
    """Images, spread evenly over the source, that set the quantization range."""
    features: str | None = None
    """Also store a vision encoder's tokens of every crop and variant, for REPA / REG: patch
    tokens (array `features`, D x h*w) and class token (`features_cls`, D x 1), preprocessed as
    REPA does. A transformers model by hub id or folder (DINOv2, DINOv2 with registers, ViT) or
    an AutoencoderRAE (its encoder). On a complete store made without them, they are added and
    the latents are not encoded again (docs/encode.md)."""
    features_revision: str | None = None
    """Hub revision of the --features encoder."""
    features_dtype: str = "uint8"
    """How features are stored: uint8 (per-channel affine, calibrated like the latents) or fp16."""
    features_dims: int | None = None
    """Store K dims per token: the projection on the first K principal components (PCA fitted
    on the calibration images, kept in the store); None: all D."""
    features_grid: int | None = None
    """Token grid side G: the crop is resized to G x the encoder's patch (bicubic, after the
    normalization, as REPA); None: the latent side / 2, the grid of a patch-2 DiT (16: 224 px
    for DINOv2's 14-px patches at 256 px, 448 px at 512)."""
    command: str = option("", cli=False)
    """The command line, recorded in the store."""

    def __post_init__(self) -> None:
        if isinstance(self.max_failures, str):
            object.__setattr__(self, "max_failures", parse_max_failures(self.max_failures))
        if self.device is not None and self.device.split(":")[0] not in DEVICES:
            raise LatentditError(f"--device {self.device!r}: use cpu, cuda or cuda:N")
        positive = ("image_size", "batch_size", "shard_size", "chunk_size", "calibration_samples")
        for name in positive:
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise LatentditError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if not self.max_file_mb > 0:
            raise LatentditError(f"--max-file-mb must be > 0, got {self.max_file_mb}")
        if self.workers is not None and self.workers < 0:
            raise LatentditError(f"--workers must be >= 0, got {self.workers}")
        if self.prefetch < 1:
            raise LatentditError(f"--prefetch must be at least 1, got {self.prefetch}")
        if self.shard_size % self.chunk_size:
            raise LatentditError(
                f"--shard-size {self.shard_size} must be a multiple of --chunk-size {self.chunk_size}"
            )
        if self.posterior not in POSTERIOR_MODES:
            raise LatentditError(f"--posterior {self.posterior!r}: use one of {POSTERIOR_MODES}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise LatentditError(
                f"--compile-mode {self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}"
            )
        if self.compile_mode is not None and self.compile is False:
            raise LatentditError(
                f"--compile-mode {self.compile_mode} sets how --compile compiles: add --compile"
            )
        if self.dtype not in DTYPES:
            raise LatentditError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.max_failures is not None and (
            self.max_failures < 0
            or (isinstance(self.max_failures, float) and self.max_failures >= 1)
        ):
            raise LatentditError(
                f"--max-failures {self.max_failures}: a count >= 0 or a fraction in [0, 1)"
            )
        check_options_apply(self.out, self.store_options)
        if self.features is None:  # the features_* options mean nothing without it
            for f in fields(self):
                if f.name.startswith("features_") and getattr(self, f.name) != f.default:
                    flag = "--" + f.name.replace("_", "-")
                    raise LatentditError(f"{flag} sets how --features are made: add --features")
        else:
            self.features_config("cpu")  # its checks, now

    @property
    def store_options(self) -> dict | None:
        """`storage_options` as the dict the fsspec driver takes."""
        return parse_storage_options(self.storage_options)

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.flip else VARIANTS[:1]

    def for_device(self, device_type: str) -> EncodeConfig:
        """This config with its unset speed options (None) at the defaults of `device_type`
        (SPEED_DEFAULTS, and CUDA_DEFAULTS on "cuda"); options given are kept. Uncompiled, the
        mode stays None (a --compile-mode given is refused when the device does not compile)."""
        defaults = {**SPEED_DEFAULTS, **(CUDA_DEFAULTS if device_type == "cuda" else {})}
        unset = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if not unset.get("compile", self.compile):
            unset.pop("compile_mode", None)
        return replace(self, **unset)

    def vae_config(self, device: str) -> VaeConfig:
        """How this job loads and runs its VAE on `device`."""
        return VaeConfig(
            id=self.vae,
            revision=self.vae_revision,
            dtype=self.dtype,
            device=device,
        )

    def decode_workers(self, device_type: str) -> int:
        """The decode workers of one rank: `workers`, or sized to the cores this rank gets (the
        process's CPU affinity shared by torchrun's LOCAL_WORLD_SIZE ranks)."""
        if self.workers is not None:
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        per_rank = max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # on a GPU the main process only feeds the device; on the CPU it runs the encoder too
        return max(1, per_rank - 1 if device_type == "cuda" else per_rank // 2)

    def features_config(self, device: str) -> FeaturesConfig | None:
        """How this job computes its features on `device`; None without --features."""
        if self.features is None:
            return None
        return FeaturesConfig(
            encoder=self.features,
            revision=self.features_revision,
            stored=self.features_dtype,
            dims=self.features_dims,
            grid=self.features_grid,
            dtype=self.dtype,
            device=device,
        )

    def preprocess_config(self) -> PreprocessConfig:
        """How this job decodes and crops each image."""
        return PreprocessConfig(
            image_size=self.image_size,
            exif_transpose=self.exif_transpose,
            max_pixels=self.max_pixels,
        )

    def failure_limit(self, num_samples: int) -> int:
        """The most failures allowed for a source of `num_samples` images."""
        if self.max_failures is None:
            share = math.floor(FAILURE_SHARE_MAX * num_samples)
            return min(max(FAILURES_TOLERATED, math.floor(FAILURE_FRACTION * num_samples)), share)
        if isinstance(self.max_failures, float):
            return math.floor(self.max_failures * num_samples)
        return self.max_failures


def parse_max_failures(text: str) -> int | float:
    """'100' -> 100 images; '0.01' or '1%' -> a fraction of the source."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise LatentditError(
            f"--max-failures {text!r}: give a count (100), a fraction (0.01) or a percentage (1%)"
        ) from None
