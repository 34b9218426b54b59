"""What `latentdit sample` does, as frozen configs (importable without torch: the CLI reads them).

SampleConfig(checkpoint=Path("runs/x"), out=Path("samples/x"), solve=SolveConfig(steps=50))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.config import option
from foundation.precision import NAMES as PRECISION_NAMES
from foundation.urls import is_url
from sampler.errors import SamplerError

SPACINGS = ("trailing", "official")
VARIANCES = ("fixed-small", "fixed-large", "learned")


@dataclass(frozen=True, kw_only=True)
class SolveConfig:
    """How latents are made from noise."""

    sampler: str | None = None
    """Solver: euler, heun, euler-maruyama, and REPA's repa-euler, repa-heun, repa-euler-maruyama
    (flow matching); ddpm, ddim, dpm++2m (DDPM). Default: heun for flow matching, dpm++2m for DDPM."""
    steps: int = 50
    """Solver steps (Heun makes two model calls per step)."""
    cfg: float = 1.0
    """Guidance scale: uncond + cfg (cond - uncond) on all channels; 1 means no guidance."""
    cfg_channels: int | None = option(None, min=1)
    """Guide only the first N latent channels (3 reproduces the published DiT/SiT numbers); None: all."""
    cfg_interval: tuple[float, float] | None = None
    """Guide only for t in [lo, hi] (t in [0, 1], 1 = noise; DDPM: step / T); None: always."""
    shift: float = 1.0
    """SD3 timestep shift for flow solvers (1 = none)."""
    eta: float = 0.0
    """DDIM's eta (0 = deterministic)."""
    variance: str | None = None
    """DDPM sampler variance: fixed-small, fixed-large or learned; None: learned for learn_sigma
    models, else fixed-small."""
    spacing: str = "trailing"
    """DDPM/DDIM timesteps: trailing (ours) or official (DiT's space_timesteps: "N", "ddimN")."""
    diffusion: float = 1.0
    """Euler-Maruyama diffusion w(t) = diffusion * t (SiT's sigma form with norm n: 2 n)."""
    last_step: float | None = None
    """Euler-Maruyama: a last, noise-free step of this size to t = 0 (SiT: 0.04); None: uniform."""

    def __post_init__(self) -> None:
        from sampler.solvers import SOLVERS

        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.shift > 0, f"--shift must be > 0, got {self.shift}"),
            (self.cfg >= 0, f"--cfg must be >= 0, got {self.cfg}"),
            (
                self.sampler is None or self.sampler in SOLVERS,
                f"--sampler {self.sampler!r} is not one of {', '.join(SOLVERS)}",
            ),
            (
                self.variance is None or self.variance in VARIANCES,
                f"--variance {self.variance!r} is not one of {', '.join(VARIANCES)}",
            ),
            (self.spacing in SPACINGS, f"--spacing {self.spacing!r} is not one of {', '.join(SPACINGS)}"),
            (self.cfg_channels is None or self.cfg_channels >= 1, f"--cfg-channels must be >= 1, got {self.cfg_channels}"),
            (self.diffusion >= 0, f"--diffusion must be >= 0, got {self.diffusion}"),
            (self.last_step is None or 0 < self.last_step < 1, f"--last-step must be in (0, 1), got {self.last_step}"),
        ]  # fmt: skip
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            checks.append(
                (0 <= lo <= hi <= 1, f"--cfg-interval needs 0 <= lo <= hi <= 1, got {lo} {hi}")
            )
        for ok, message in checks:
            if not ok:
                raise SamplerError(message)


@dataclass(frozen=True)
class Protocol:
    """A published sampling protocol: the SolveConfig values it sets, and where they come from."""

    solve: dict[str, Any]
    source: str


PROTOCOLS: dict[str, Protocol] = {
    "dit-fid": Protocol(
        {"sampler": "ddpm", "steps": 250, "cfg": 1.5, "cfg_channels": 3, "variance": "learned",
         "spacing": "official"},
        "DiT-XL/2 256px, FID-50K 2.27 (Peebles & Xie 2023, Table 4): facebookresearch/DiT "
        "sample_ddp.py defaults (250 DDPM steps of create_diffusion('250'), learned sigma, "
        "--cfg-scale 1.5, sd-vae-ft-ema) and models.py forward_with_cfg (guidance on 3 channels)",
    ),
    "sit-fid": Protocol(
        {"sampler": "euler-maruyama", "steps": 250, "cfg": 1.5, "cfg_channels": 3,
         "diffusion": 2.0, "last_step": 0.04},
        "SiT-XL/2 256px, FID-50K 2.06 (Ma et al. 2024; willisma/SiT README): sample_ddp.py SDE "
        "defaults (Euler, --diffusion-form sigma, --diffusion-norm 1 = our diffusion 2, "
        "--last-step Mean of size 0.04, 250 steps), --cfg-scale 1.5, guidance on 3 channels",
    ),
    "repa-fid": Protocol(
        {"sampler": "repa-euler-maruyama", "steps": 250, "cfg": 1.8, "cfg_interval": (0.0, 0.7)},
        "SiT-XL/2 + REPA 256px, FID-50K 1.42 (Yu et al. 2025; sihyun-yu/REPA README): generate.py "
        "--mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7 (--guidance-low 0), "
        "samplers.py euler_maruyama_sampler (diffusion 2t, grid to 0.04 then a mean step, float64 "
        "state), guidance on all channels; labels uniform at random (torch.randint: give --n "
        "50000 without --class), --vae ema (sd-vae-ft-ema), latents / 0.18215",
    ),
}  # fmt: skip


def protocol_solve(name: str, given: dict[str, Any] | None = None) -> SolveConfig:
    """The SolveConfig of a protocol; `given` (options set explicitly) win over it."""
    return SolveConfig(**{**protocol_options(name), **(given or {})})


def protocol_options(name: str) -> dict[str, Any]:
    """The SolveConfig options a protocol sets (what `sample --protocol NAME` starts from)."""
    if name not in PROTOCOLS:
        raise SamplerError(f"--protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    return dict(PROTOCOLS[name].solve)


WEIGHTS = ("ema", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""torch.compile modes for --compile: "reduce-overhead" and "max-autotune" replay CUDA graphs (on
CUDA; see foundation.compile.uses_cuda_graphs)."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """What to sample, how, and where to write it."""

    checkpoint: str = option(argument=True)
    """A run dir (its latest checkpoint) or a checkpoint folder RUN/checkpoints/0005000."""
    out: str = option(help="")
    """Local output folder: images/, grid.png, the .npz and sample.json (resume state)."""
    vae: str | None = None
    """VAE folder or hub id to decode with; None: the one recorded in the checkpoint."""
    weights: str = "ema"
    """Which weights to sample: "ema" or "model"."""
    classes: tuple[str, ...] = option((), flags=("--class",))
    """Classes by index, id (wnid) or name; empty: random classes (or all, with fid_samples)."""
    n: int = 8
    """Images per requested class; with no class, images of random classes in total."""
    fid_samples: int | None = None
    """Class-balanced FID set: exactly fid_samples / num_classes images of every class."""
    first_index: int = 0
    """Global index of the first image: regenerate image i alone with first_index=i, n=1."""
    solve: SolveConfig = field(default_factory=SolveConfig)
    """Solver, steps, guidance: how latents are made from noise."""
    seed: int = 0
    """Run seed; image i's noise comes from its own generator seeded by (seed, i)."""
    batch_size: int = 16
    """Images per batch (guided batches run 2x rows through the model)."""
    auto_batch: int | None = option(None, min=1)
    """On CUDA: the largest batch up to this cap that fits (found by trial at start, from
    --batch-size up); on the CPU --batch-size is kept. None: --batch-size."""
    png: bool = True
    """Write one PNG per image."""
    grid: bool = True
    """Write grid.png with the first images."""
    npz: bool = option(False, flags=("--npz",))
    """Write the ADM evaluator's .npz (uint8 NHWC under arr_0), resumable."""
    device: str | None = None
    """Torch device; None: cuda when available, else cpu."""
    precision: str | None = None
    """Autocast dtype for the model and decoder: fp32, bf16 or fp16; None: bf16 on cuda, fp32 on cpu."""
    noise: Path | None = option(None, exists=True, dir_okay=False)
    """A .npy of starting noise (N, C, H, W), row j for image first_index + j (side-by-side runs)."""
    save_latents: bool = option(False, flags=("--save-latents",))
    """Also write OUT/latents.npy: the final latents as the VAE decoder takes them (denormalized)."""
    compile: str | None = None
    """torch.compile the DiT with this mode: default, reduce-overhead (CUDA graphs) or
    max-autotune (CUDA graphs too); None: eager. Matches eager to float rounding, not bit for bit."""
    cast_weights: bool = False
    """Cast the DiT's weights once to the bf16/fp16 --precision (half the memory; not bit-identical)."""

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, f"--n must be >= 1, got {self.n}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (
                self.auto_batch is None or self.auto_batch >= 1,
                f"--auto-batch must be >= 1, got {self.auto_batch}",
            ),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.first_index >= 0, f"--first-index must be >= 0, got {self.first_index}"),
            (self.weights in WEIGHTS, f"--weights must be one of {WEIGHTS}, got {self.weights!r}"),
            (
                self.precision is None or self.precision in PRECISION_NAMES,
                f"--precision {self.precision!r} is not one of {', '.join(PRECISION_NAMES)}",
            ),
            (
                self.compile is None or self.compile in COMPILE_MODES,
                f"--compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}",
            ),
            (
                not (self.cast_weights and self.precision == "fp32"),
                "--cast-weights casts to the --precision dtype: give --precision bf16 or fp16",
            ),
            (
                self.fid_samples is None or (self.fid_samples >= 1 and not self.classes),
                "--fid-samples makes every class; give it without --class, and >= 1",
            ),
            (
                self.fid_samples is None or self.first_index == 0,
                "--first-index does not apply with --fid-samples",
            ),
            *[
                (
                    not is_url(path),
                    f"{path}: {what} must be a local folder (or on a shared file system), not a "
                    "URL; see docs/multinode.md",
                )
                for what, path in (("the checkpoint", self.checkpoint), ("--out", self.out))
            ],
        ]
        for ok, message in checks:
            if not ok:
                raise SamplerError(message)
