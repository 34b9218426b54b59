"""Train the demo's small AutoencoderKL on generated demo images and save it with save_pretrained.

    python -m demo.train_vae --out demo/assets/vae

The VAE has the SD-VAE interface (4 latent channels, inputs in [-1, 1]; 4x downsampling of
32-px images to 8x8 latents, where SD has 8x of 256 px to 32x32) and
the standard diffusers folder format, so the encoder and sampler load it through exactly the
`AutoencoderKL.from_pretrained(path)` call they use for `stabilityai/sd-vae-ft-ema`.
Loss: L1 reconstruction + a small KL term (the SD autoencoders' recipe without LPIPS and GAN).
Its `scaling_factor` is 1 / (std of the latents of the training images), measured after training
and written into config.json, as Rombach et al. 2022 (Sec. 3.1 / App. G) derived SD's factor.
Training images come from a data seed other than the demo's, and the held-out PSNR is measured
on the held-out split. Metrics and the recipe go to `training.json` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from demo import VAE_DIR
from demo.data import DemoDataConfig, as_tensor, generate_arrays

log = logging.getLogger(__name__)

LOG_EVERY = 100  # steps between progress lines
WARMUP_STEPS = 100  # linear learning-rate warmup, then cosine decay to zero


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
            raise ValueError(f"image_size {self.image_size} must be a multiple of {factor}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


def build_vae(config: VaeTrainConfig) -> AutoencoderKL:
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=8,
        sample_size=config.image_size,
    )


def _lr_factor(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)))


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 reconstruction per pixel + kl_weight * KL(posterior || N(0, I)) per latent element."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return (recon - x).abs().mean() + kl_weight * kl


@torch.no_grad()
def latent_std(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> float:
    """Std of the posterior means over all latent elements (the basis of scaling_factor)."""
    z = torch.cat([vae.encode(b).latent_dist.mean for b in x.split(batch_size)])
    return z.std().item()


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> float:
    """Mean per-image PSNR (dB, 8-bit) of encode (posterior mean) -> decode on images x in [-1, 1]."""
    psnrs = []
    for b in x.split(batch_size):
        recon = vae.decode(vae.encode(b).latent_dist.mean).sample
        a = ((b + 1) * 127.5).round().clamp(0, 255)
        r = ((recon + 1) * 127.5).round().clamp(0, 255)
        mse = (a - r).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(255.0**2 / mse))
    return torch.cat(psnrs).mean().item()


def train_vae(config: VaeTrainConfig) -> dict:
    """Train, set scaling_factor from the measured latent std, save; returns the metrics."""
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_arrays(
            DemoDataConfig(
                out=Path(tmp),
                image_size=config.image_size,
                train_per_class=config.train_per_class,
                val_per_class=config.val_per_class,
                seed=config.data_seed,
            )
        )
    train, val = as_tensor(data["train"][0]), as_tensor(data["val"][0])
    vae = build_vae(config)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.steps))
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    vae.train()
    for step in range(config.steps):
        idx = torch.randint(len(train), (config.batch_size,), generator=gen)
        x = train[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = vae_loss(vae, x, config.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % LOG_EVERY == 0 or step == config.steps - 1:
            rate = (step + 1) * config.batch_size / (time.perf_counter() - t0)
            log.info("step %d/%d loss %.4f (%.0f images/s)", step, config.steps, loss.item(), rate)
    vae.eval()
    std = latent_std(vae, train[::5])  # every 5th image: all classes, a fifth of the time
    vae.register_to_config(scaling_factor=1.0 / std)
    metrics = {
        "val_psnr_db": reconstruction_psnr(vae, val),
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_seconds": time.perf_counter() - t0,
        "val_images": len(val),
    }
    vae.save_pretrained(config.out)
    recipe = {k: v for k, v in asdict(config).items() if k != "out"}
    (config.out / "training.json").write_text(
        json.dumps({"config": recipe, "metrics": metrics}, indent=2) + "\n"
    )
    log.info("saved %s: %s", config.out, metrics)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=VaeTrainConfig.out)
    p.add_argument("--steps", type=int, default=VaeTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=VaeTrainConfig.batch_size)
    p.add_argument("--train-per-class", type=int, default=VaeTrainConfig.train_per_class)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train_vae(
        VaeTrainConfig(
            out=a.out, steps=a.steps, batch_size=a.batch_size, train_per_class=a.train_per_class
        )
    )


if __name__ == "__main__":
    main()
