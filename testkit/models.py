"""Tiny real models: a diffusers AutoencoderKL saved with `save_pretrained`, a DiT, a checkpoint."""

from __future__ import annotations

from pathlib import Path

TINY_DIT = {"model": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2}


def make_vae(
    path: Path,
    block_out_channels: tuple[int, ...],
    *,
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int | None = None,
    scaling_factor: float | None = None,
    seed: int = 0,
) -> Path:
    """An AutoencoderKL (downsampling 2**(len(channels) - 1)) with random weights, saved to `path`.

    `make_vae(p, (128, 256, 512, 512), layers_per_block=2)` is the SD-VAE's layout.
    """
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    extra = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups or min(32, min(block_out_channels)),
        **extra,
    ).save_pretrained(path)
    return path


def make_tiny_vae(path: Path, *, latent_channels: int = 4, blocks: int = 4, seed: int = 0) -> Path:
    """A tiny AutoencoderKL (width 8, downsampling 2**(blocks-1), scaling_factor 0.5), saved."""
    return make_vae(
        path,
        (8,) * blocks,
        latent_channels=latent_channels,
        norm_num_groups=4,
        scaling_factor=0.5,
        seed=seed,
    )


def tiny_dit(input_size: int = 4, *, in_channels: int = 4, num_classes: int = 3, seed: int = 0):
    """A DiT of TINY_DIT's size with random (not adaLN-Zero) weights: outputs depend on x, t, y."""
    import torch

    from trainer.model import build_model

    torch.manual_seed(seed)
    sizes = {k: v for k, v in TINY_DIT.items() if k != "model"}
    model = build_model(
        TINY_DIT["model"],
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        **sizes,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def make_checkpoint(
    run: Path, vae_dir: Path, *, objective: str = "flow_matching", size: int = 4, seed: int = 0
) -> Path:
    """A tiny DiT checkpoint written by the trainer's `save_checkpoint`, for a tiny store's latents.

    The meta records `vae_dir` as the VAE, so `latentdit sample RUN` finds its decoder.
    """
    from latent_store import LatentStore
    from testkit.stores import write_random_store
    from trainer.checkpoint import checkpoint_meta, save_checkpoint
    from trainer.normalization import normalization_from_store
    from trainer.objective import DDPM, FlowMatching

    store = LatentStore(write_random_store(run.parent / f"{run.name}-store.zarr", n=16, size=size))
    model = tiny_dit(size, seed=seed)
    meta = checkpoint_meta(
        preset=TINY_DIT["model"],
        model=model,
        objective=DDPM() if objective == "ddpm" else FlowMatching(),
        normalization=normalization_from_store(store, "channel_stats"),
        store=store,
    )
    meta["vae"]["id"] = str(vae_dir)
    return save_checkpoint(run, step=2, model=model, ema=model, train_state={}, meta=meta)
