"""Train the demo's small AutoencoderKL on generated demo images and save it with save_pretrained.

    latentdit demo-tools train-vae --out demo/assets/vae

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

import json
import logging
import time
from dataclasses import asdict

import torch
from diffusers import AutoencoderKL

from demo.config import VaeTrainConfig
from demo.data import as_tensor, generate_training_arrays
from demo.training import optimizer_step, warmup_cosine

log = logging.getLogger(__name__)


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
    data = generate_training_arrays(
        config.image_size, config.train_per_class, config.val_per_class, config.data_seed
    )
    train, val = as_tensor(data["train"][0]), as_tensor(data["val"][0])
    vae = build_vae(config)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, config.steps))
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    vae.train()
    for step in range(config.steps):
        idx = torch.randint(len(train), (config.batch_size,), generator=gen)
        x = train[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = vae_loss(vae, x, config.kl_weight)
        optimizer_step(
            opt, sched, loss, step, config.steps, batch_size=config.batch_size, started=t0
        )
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
