"""The demo's options, as frozen configs (importable without torch: the CLI reads them).

latentdit demo                      # DemoConfig
latentdit demo-tools data           # DemoDataConfig: the generated image set
latentdit demo-tools train-vae      # VaeTrainConfig: how the shipped VAE was trained
latentdit demo-tools train-classifier   # ClassifierTrainConfig: the verdict classifier
latentdit demo-tools train-encoder      # EncoderTrainConfig: the image encoder (REPA's features)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from demo import CLASSIFIER_DIR, ENCODER_DIR, VAE_DIR
from foundation.errors import ConfigError

NUM_CLASSES = 10  # the demo's classes (demo.data.CLASSES)
GRID_COLUMNS = NUM_CLASSES  # samples per row of the class grid: a square grid


@dataclass(frozen=True, kw_only=True)
class DemoDataConfig:
    """What `make_demo_data` generates."""

    out: Path
    """Folder to create: gets train/, val/ and LOC_synset_mapping.txt."""
    image_size: int = 32
    """Side of every (square) image, in pixels."""
    train_per_class: int = 300
    """Training images per class."""
    val_per_class: int = 100
    """Held-out images per class (the verdict splits them in two halves)."""
    seed: int = 0
    """Seed of every random choice; the same seed gives byte-identical files."""
    quality: int = 90
    """JPEG quality."""

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        if self.train_per_class < 1 or self.val_per_class < 2:
            raise ConfigError("train_per_class must be >= 1 and val_per_class >= 2")


@dataclass(frozen=True, kw_only=True)
class VaeTrainConfig:
    """How the demo VAE is built and trained."""

    out: Path = VAE_DIR
    """Folder to save_pretrained into (config.json, diffusion_pytorch_model.safetensors, training.json)."""
    image_size: int = 32
    """Training image side in pixels; latents are image_size / 2**(levels - 1) on a side."""
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    """Channels per resolution level; len - 1 downsamplings (3 levels = 4x: 32 px -> 8x8)."""
    latent_channels: int = 4
    """Latent channels, as in the SD VAE."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 16
    """Images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    kl_weight: float = 1e-4
    """Weight of the KL term (per latent element) against the L1 term (per pixel)."""
    train_per_class: int = 1000
    """Generated training images per class."""
    val_per_class: int = 50
    """Generated held-out images per class (for the PSNR)."""
    data_seed: int = 1
    """Seed of the generated images (the demo itself uses seed 0)."""
    seed: int = 0
    """Seed of the initialization and the batch order."""

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % factor:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of {factor}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    """How the verdict classifier is trained."""

    out: Path = CLASSIFIER_DIR
    """Folder for model.safetensors and config.json."""
    image_size: int = 32
    """Image side in pixels (the demo's)."""
    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay to zero)."""
    train_per_class: int = 600
    """Generated training images per class."""
    val_per_class: int = 100
    """Generated held-out images per class (for the reported accuracy)."""
    data_seed: int = 2
    """Seed of the generated images (the demo uses 0, the VAE 1)."""
    seed: int = 0
    """Seed of the initialization, batch order and augmentation."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")


@dataclass(frozen=True, kw_only=True)
class EncoderTrainConfig:
    """How the demo's image encoder (a small DINOv2, REPA's alignment target) is trained."""

    out: Path = ENCODER_DIR
    """Folder to save_pretrained into (config.json, model.safetensors, training.json)."""
    image_size: int = 32
    """Image side in pixels (the demo's)."""
    patch_size: int = 8
    """Pixels per token side: 32-px images make a 4x4 grid, the grid DiT-S/2 sees on the
    demo VAE's 8x8 latents."""
    hidden_size: int = 64
    """Token width."""
    depth: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay to zero after a linear warmup)."""
    patch_weight: float = 1.0
    """Weight of the patch tokens' class loss (each token names the image's class) beside the
    class token's."""
    pixel_weight: float = 1.0
    """Weight of the patch tokens' pixel loss (each token's linear read-out of its own pixels,
    normalized, squared error)."""
    train_per_class: int = 600
    """Generated training images per class."""
    val_per_class: int = 100
    """Generated held-out images per class (for the reported accuracies)."""
    data_seed: int = 3
    """Seed of the generated images (the demo uses 0, the VAE 1, the verdict classifier 2)."""
    seed: int = 0
    """Seed of the initialization and the batch order."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")
        if self.image_size % self.patch_size or self.hidden_size % self.num_heads:
            raise ConfigError(
                "image_size must be a multiple of patch_size, hidden_size of num_heads"
            )


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes of the demo; the defaults are the full demo (5.5 minutes on the 2-core dev VM)."""

    out: Path = Path("demo_out")
    """Folder for everything: data/, store.zarr, run/, samples/, report.json."""
    train_per_class: int = 500
    """Generated training images per class."""
    val_per_class: int = 100
    """Generated held-out images per class (the verdict's real sets)."""
    image_size: int = 32
    """Image side in pixels (the shipped VAE and classifier were trained at 32)."""
    model: str = "DiT-S/2"
    """DiT preset; its width and depth are overridden by hidden_size / depth / num_heads."""
    hidden_size: int = 128
    """DiT width."""
    depth: int = 4
    """DiT blocks."""
    num_heads: int = 4
    """Attention heads."""
    train_steps: int = 4000
    """DiT optimizer steps."""
    batch_size: int = 64
    """DiT batch."""
    lr: float = 2e-3
    """Peak learning rate (a DiT this small trains well far above DiT-XL's 1e-4)."""
    warmup_steps: int = 50
    """Linear learning-rate warmup steps."""
    ema_decay: float = 0.99
    """EMA decay: the sampler uses the EMA weights, so it must follow a short run closely."""
    samples_per_class: int = 50
    """Samples per class for the verdict (the grid shows the first GRID_COLUMNS of them)."""
    sample_steps: int = 20
    """Solver steps (Heun, the sampler's default for flow matching: 2 model calls a step)."""
    decode_check: int = 64
    """Stored latents that `validate --decode-check` decodes (PSNR against the source images)."""
    cfg_scale: float = 1.5
    """Classifier-free guidance scale: the best Inception FID that keeps >= 90% named right
    (sweep in docs/demo.md: 1.5 gives FID 138.1 at 97.8%, 2.0 gives 142.1 at 99.2%)."""
    seed: int = 0
    """Seed of the data, training and sampling."""
    vae: Path = VAE_DIR
    """The VAE (diffusers folder); by default the shipped demo VAE."""
    classifier: Path = CLASSIFIER_DIR
    """The verdict classifier; by default the shipped one."""
    fid_per_class: int | None = 20
    """Images per class in each set of the Inception FIDs (200 a set: ~2.5 CPU-minutes in all)."""

    def __post_init__(self) -> None:
        positive = ("train_per_class", "hidden_size", "depth", "num_heads", "train_steps")
        positive += ("batch_size", "sample_steps", "decode_check", "image_size")
        for name in positive:
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1 or self.warmup_steps < 0:
            raise ConfigError("--lr must be > 0, --ema-decay in [0, 1), --warmup-steps >= 0")
        if self.samples_per_class < GRID_COLUMNS:
            raise ConfigError(
                f"samples_per_class must be >= {GRID_COLUMNS}: the grid shows that many per class"
            )

    @classmethod
    def quick(cls, out: Path) -> DemoConfig:
        """A shortened demo through the same steps (for CI): few images, few steps."""
        return cls(out=out, **QUICK)


# The shortened demo (`--quick`, for CI): few images, a tiny DiT, few steps; the same path.
QUICK = {
    "train_per_class": 8,
    "val_per_class": 8,
    "hidden_size": 32,
    "depth": 1,
    "num_heads": 2,
    "train_steps": 4,
    "batch_size": 16,
    "samples_per_class": GRID_COLUMNS,
    "sample_steps": 2,
    "decode_check": 8,
    "fid_per_class": None,  # 2048-d sqrtms cost minutes on a busy CPU: tested on their own
}
