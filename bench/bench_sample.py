"""Sampling throughput: images/s for a solver, step count and batch, split into model and decode time.

    python bench/bench_sample.py [--model DiT-S/8] [--latent-size 16] [--images 8] [--cfg 4]

Runs the sampler's own code (`make_latents` with guidance, then `LatentDecoder` loaded through
the decoder-only path) on a randomly initialised DiT and a small AutoencoderKL saved with
`save_pretrained`; random weights time the same as trained ones. Prints one JSON object with a row
per (solver, steps, batch), compared side by side. On a GPU, pass --device cuda --model DiT-XL/2
--latent-size 32 --sd-vae to time the DiT-XL/2 + SD-VAE setting (not measured in this project).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sampler.config import SolveConfig
from sampler.decoder import LatentDecoder
from sampler.latents import make_latents
from sampler.plan import ImageNoise
from sampler.solvers import SOLVERS
from testkit import make_vae
from trainer.model import build_model
from trainer.objective import FlowMatching

CLASSES = 1000
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
SMALL_VAE = {"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "norm_num_groups": 16}


def meta_for(latent_size: int) -> dict:
    """The checkpoint meta the decoder checks: 4 channels, the VAE's default scaling factor."""
    return {
        "latent_shape": [4, latent_size, latent_size],
        "normalization": {"kind": "vae_scaling", "mean": [0.0] * 4, "std": [1 / 0.18215] * 4},
        "vae": {"scaling_factor": 0.18215, "downsampling": 8},
    }


def time_row(model, decoder, args, sampler: str, steps: int, batch: int) -> dict:
    device = torch.device(args.device)
    settings = SolveConfig(sampler=sampler, steps=steps, cfg=args.cfg)
    model_s = decode_s = 0.0
    for start in range(0, args.images, batch):
        indices = range(start, min(start + batch, args.images))
        labels = torch.tensor([i % CLASSES for i in indices])
        t0 = time.perf_counter()
        z = make_latents(
            model, FlowMatching(), labels, ImageNoise(0, indices), settings,
            latent_shape=(4, args.latent_size, args.latent_size), device=device,
            precision=args.precision,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        decoder(z)
        t2 = time.perf_counter()
        model_s, decode_s = model_s + t1 - t0, decode_s + t2 - t1
    calls = steps * SOLVERS[sampler].calls_per_step
    return {
        "sampler": sampler,
        "steps": steps,
        "model_calls": calls,
        "batch": batch,
        "images": args.images,
        "images_per_s": round(args.images / (model_s + decode_s), 3),
        "model_s": round(model_s, 3),
        "decode_s": round(decode_s, 3),
        "decode_share": round(decode_s / (model_s + decode_s), 3),
        "ms_per_image_per_model_call": round(1000 * model_s / args.images / calls, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/8")
    p.add_argument("--latent-size", type=int, default=16)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--rows", default="euler:5:8,heun:5:8,heun:5:2", help="solver:steps:batch,...")
    p.add_argument("--sd-vae", action="store_true", help="SD-VAE-sized decoder (slow on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.latent_size, in_channels=4, num_classes=CLASSES)
    model = model.to(args.device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = make_vae(Path(tmp) / "vae", **(SD_VAE if args.sd_vae else SMALL_VAE))
        decoder = LatentDecoder.load(str(vae_dir), meta_for(args.latent_size), device=args.device)
        rows = []
        for spec in args.rows.split(","):
            name, steps, batch = spec.split(":")
            rows.append(time_row(model, decoder, args, name, int(steps), int(batch)))
    decoder_params = sum(p.numel() for p in decoder.vae.parameters())
    print(
        json.dumps(
            {
                "bench": "sample",
                "device": args.device
                if args.device == "cpu"
                else torch.cuda.get_device_name(torch.device(args.device)),
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "model": args.model,
                "model_params": sum(p.numel() for p in model.parameters()),
                "decoder_params": decoder_params,
                "image_size": args.latent_size * 8,
                "cfg": args.cfg,
                "precision": args.precision,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
