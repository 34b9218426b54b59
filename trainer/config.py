"""`TrainConfig`: every training option, one frozen dataclass; config files; the resolved JSON.

Precedence: dataclass defaults < `--config file.toml|yaml` < options given on the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from foundation.compile import COMPILE_MODES
from foundation.config import option
from foundation.config import resolve_config as resolve_options
from foundation.errors import ConfigError
from foundation.precision import AUTO, Precision
from foundation.urls import is_url, parse_storage_options
from trainer.presets import (
    DIT_PRESETS,
    POS_EMBEDS,
    REG_COEFF,
    REPA_COEFF,
    REPA_DEPTH,
    REPA_PROJECTOR_DIM,
    preset_names,
)

DATA_MODES = ("memory", "gpu", "stream")
COMPILE_SCOPES = ("model", "blocks")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")  # torch SDPBackend names
PRECISIONS = (AUTO, Precision.bf16.value, Precision.fp32.value)  # no fp16: it needs a loss scaler


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `latentdit train` does is decided here; saved as RUN/config.json."""

    store: str = option(
        help="Latent store to train on (Zarr v3 written by `latentdit encode`): a folder or URL."
    )
    storage_options: str | None = option(
        None,
        'JSON object of fsspec options for a store URL, e.g. \'{"endpoint_url": "http://minio:9000"}\' '
        "(saved in config.json: give secrets through the environment instead).",
    )
    run: str = option(
        help="Run folder, local or on a file system every node shares (not a URL): config, "
        "log.jsonl and checkpoints; `--run RUN` alone resumes it.",
        flags=("--run", "--run-dir"),
    )
    model: str = option(
        "DiT-B/2",
        f"DiT preset: {preset_names()} (DiT-DH: with RAE's DDT head; patch 1 for wide latents).",
    )
    hidden_size: int | None = option(
        None, "Override the preset's hidden size (e.g. tiny test models)."
    )
    depth: int | None = option(None, "Override the preset's number of blocks.")
    num_heads: int | None = option(None, "Override the preset's number of attention heads.")
    head_depth: int | None = option(
        None,
        "Blocks of the DDT head after the trunk (RAE's DiT^DH, for wide latents; give "
        "--head-width too); None: the preset's (DiT-DH-*: 2, DiT-*: no head).",
    )
    head_width: int | None = option(
        None, "Width of the DDT head (RAE: 2048); None: the preset's (DiT-*: no head)."
    )
    head_heads: int | None = option(
        None, "Attention heads of the DDT head; None: the preset's (RAE's 16)."
    )
    steps: int = option(400_000, "Optimizer steps in total (resuming continues up to this step).")
    batch_size: int = option(256, "Global batch: samples per optimizer step over all ranks.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step on each rank.")
    lr: float = option(1e-4, "Peak learning rate of AdamW (DiT: 1e-4 at batch 256).")
    weight_decay: float = option(0.0, "AdamW weight decay (DiT: 0).")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.")
    warmup_steps: int = option(1000, "Steps of linear warmup from 0 to --lr.")
    cosine_decay: bool = option(False, "After warmup, decay the LR along a cosine to --min-lr.")
    min_lr: float = option(0.0, "Final LR of the cosine decay.")
    grad_clip: float | None = option(
        1.0,
        "Clip the global gradient norm to this (None or --no-grad-clip: no clip).",
        none_flag=("--no-grad-clip", "Do not clip gradients."),
    )
    ema_decay: float = option(0.9999, "Decay of the exponential moving average of the weights.")
    objective: str = option("flow_matching", "Objective: flow_matching or ddpm.")
    timesteps: str = option("logit_normal", "Flow-matching times: logit_normal or uniform.")
    ddpm_schedule: str = option("linear", "DDPM beta schedule: linear or cosine.")
    learn_sigma: bool = option(
        False,
        "DiT's recipe: learn the variance too (2C outputs, hybrid loss L_simple + L_vlb); DDPM only.",
    )
    init: str | None = option(
        None,
        "Start from the EMA weights of this run dir or checkpoint (e.g. `latentdit import`); fresh optimizer.",
    )
    p_uncond: float = option(0.1, "Probability of dropping a label to the null class (for CFG).")
    repa_coeff: float | None = option(
        None,
        "REPA (docs/train.md): weight of the alignment loss between the output of block "
        f"--repa-depth, through a projector MLP, and the store's encoder features (REPA: {REPA_COEFF}); "
        "needs a store with features; None: no REPA.",
    )
    repa_depth: int | None = option(
        None,
        f"REPA: the trunk block (1-based) whose output is aligned; None: REPA's {REPA_DEPTH} (REG uses 4 "
        "for B models). Needs --repa-coeff.",
    )
    repa_projector_dim: int | None = option(
        None,
        f"REPA: hidden width of the 3-layer SiLU projector; None: REPA's {REPA_PROJECTOR_DIM}.",
    )
    reg: bool = option(
        False,
        "REG: the store's encoder class token (features_cls) entangled as an extra input token, "
        "denoised with the latents and sampled with them; needs --repa-coeff.",
    )
    reg_coeff: float | None = option(
        None, f"REG: weight of the class token's loss; None: REG's {REG_COEFF}. Needs --reg."
    )
    normalization: str = option(
        "channel_stats",
        "Latent normalization: channel_stats (per channel), vae_scaling (the VAE's factors) or "
        "position_stats (per channel and position, as RAE; stores encoded since format v2).",
    )
    qk_norm: bool = option(False, "LayerNorm on queries and keys in attention.")
    pos_embed: str = option("sincos", "Positions: sincos (2-D sin-cos) or rope (2-D RoPE).")
    grad_checkpointing: bool = option(
        False, "Recompute block activations in backward (saves memory): every block."
    )
    checkpoint_blocks: int | None = option(
        None,
        "Recompute the activations of only the first N blocks in backward (0: none; the depth: "
        "all, as --grad-checkpointing); None: as --grad-checkpointing says.",
    )
    data: str = option(
        "memory", "Data mode: memory (host RAM), gpu (on the device), stream (shards)."
    )
    shuffle_shards: int = option(4, "Stream mode: shards held in the shuffle buffer.")
    verify: bool = option(
        True,
        "Verify the store's seal and every shard against its checksum and record as it loads "
        "(--no-verify: skip, for a store you have just validated).",
    )
    seed: int = option(0, "Seed of data order, noise, label dropout and initialization.")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32.")
    compile: bool = option(False, "torch.compile the model.")
    compile_scope: str = option(
        "model",
        "What --compile compiles: model (the DDP-wrapped model, one graph split at DDP's bucket "
        "boundaries) or blocks (each DiT block in place, fullgraph; DDP hooks as in eager).",
    )
    compile_mode: str = option(
        "default",
        f"torch.compile mode for either scope: {', '.join(COMPILE_MODES)} (reduce-overhead and "
        "max-autotune: CUDA graphs, on a GPU only).",
    )
    compile_cache: str | None = option(
        None, "Folder for torch.compile's caches, reused by resumed runs and other ranks."
    )
    attention: str = option(
        "auto",
        f"SDPA backend of the attention: {', '.join(ATTENTION_BACKENDS)} (auto: torch's pick).",
    )
    prefetch: bool = option(
        False, "memory/gpu data: gather and dequantize the next step's batch while this one runs."
    )
    bf16_weights: bool = option(
        False,
        "bf16 precision: the forward runs a bf16 copy of the linear layers' weights (no per-op "
        "casts); fp32 master weights take the gradients (all-reduced in fp32), AdamW and the EMA.",
    )
    ddp_bucket_mb: float = option(25.0, "DDP gradient bucket size in MB (all-reduce granularity).")
    grad_as_bucket_view: bool = option(
        False, "DDP: gradients are views into the all-reduce buckets (no copy, less memory)."
    )
    device: str | None = option(
        None, "Device (default: cuda:LOCAL_RANK when CUDA is there, else cpu)."
    )
    log_every: int = option(100, "Steps between log.jsonl records.")
    ckpt_every: int = option(5000, "Steps between checkpoints (one is always written at the end).")
    keep_last: int | None = option(
        3,
        "Checkpoints kept (None or --keep-all: keep all).",
        none_flag=("--keep-all", "Keep every checkpoint."),
    )
    sample_every: int | None = option(
        10_000, "Steps between EMA sample grids (needs --vae; None: at the end only)."
    )
    vae: str | None = option(None, "VAE id or folder; enables sample grids through the sampler.")
    eval_every: int | None = option(
        None,
        "Steps between FID evaluations of EMA samples (needs --vae and --eval-ref; None: off).",
    )
    eval_samples: int = option(5000, "Class-balanced EMA samples per FID evaluation.")
    eval_ref: str | None = option(
        None, "Reference for --eval-every: a `latentdit evaluate --save-stats` file (or any input)."
    )
    eval_inception: str | None = option(
        None, "Inception port for --eval-every (default: the cached ADM-matching one)."
    )
    eval_milestones: str | None = option(
        None,
        "Comma-separated FID thresholds, e.g. 10,5,2: the log, the final summary and `latentdit "
        "inspect RUN` give the first step and epoch at which FID fell below each.",
    )
    wandb: bool = option(
        False,
        "Also log to Weights & Biases (rank 0): config, losses, throughput, FIDs, EMA sample "
        "grids; a resumed run continues the same W&B run (pip install 'latentdit[wandb]').",
    )
    wandb_project: str = option("latentdit", "W&B project of --wandb.")
    wandb_name: str | None = option(None, "W&B run name of --wandb (default: the run folder's).")
    peak_tflops: float | None = option(
        None, "Peak TFLOP/s per device for MFU (default: known GPUs)."
    )

    def __post_init__(self) -> None:
        from trainer.normalization import LatentNormalization
        from trainer.objective import DDPM, OBJECTIVES, FlowMatching

        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        preset = DIT_PRESETS.get(self.model, {})
        trunk = self.depth or preset.get("depth", 0)
        blocks = trunk + (self.head_depth or preset.get("head_depth", 0))
        repa_depth = self.repa_depth or REPA_DEPTH
        checks = [
            (bool(self.store), "--store is required: the latent store to train on"),
            (bool(self.run), "--run is required: the run folder"),
            (not is_url(self.run), f"--run {self.run}: run folders must be local or on a shared file system, not a URL (see docs/multinode.md)"),
            (self.model in DIT_PRESETS, f"unknown model preset {self.model!r}; choose one of {', '.join(DIT_PRESETS)}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (0 <= self.p_uncond < 1, f"--p-uncond must be in [0, 1), got {self.p_uncond}"),
            (self.objective in OBJECTIVES, f"--objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}"),
            (self.timesteps in FlowMatching.TIMESTEPS, f"--timesteps {self.timesteps!r} is not one of {', '.join(FlowMatching.TIMESTEPS)}"),
            (not self.learn_sigma or self.objective == DDPM.KIND, "--learn-sigma needs --objective ddpm (the variance is a DDPM's)"),
            (self.ddpm_schedule in DDPM.SCHEDULES, f"--ddpm-schedule {self.ddpm_schedule!r} is not one of {', '.join(DDPM.SCHEDULES)}"),
            (self.normalization in LatentNormalization.KINDS, f"--normalization {self.normalization!r} is not one of {', '.join(LatentNormalization.KINDS)}"),
            (self.pos_embed in POS_EMBEDS, f"--pos-embed {self.pos_embed!r} is not one of {', '.join(POS_EMBEDS)}"),
            (self.data in DATA_MODES, f"--data {self.data!r} is not one of {', '.join(DATA_MODES)}"),
            (self.precision in PRECISIONS, f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"),
            (self.compile_scope in COMPILE_SCOPES, f"--compile-scope {self.compile_scope!r} is not one of {', '.join(COMPILE_SCOPES)}"),
            (self.compile_mode in COMPILE_MODES, f"--compile-mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}"),
            (not (self.bf16_weights and self.precision == Precision.fp32.value), "--bf16-weights needs bf16 compute: give --precision bf16 (or auto on a GPU), or drop --bf16-weights"),
            (all(v is None or v >= 1 for v in (self.head_depth, self.head_width, self.head_heads)), "--head-depth, --head-width and --head-heads must be >= 1 (None: the preset's)"),
            (bool(self.head_depth or preset.get("head_depth")) == bool(self.head_width or preset.get("head_width")), f"--head-depth and --head-width make the DDT head together: give both (RAE: 2 and 2048) or a DiT-DH-* preset, not one on --model {self.model}"),
            (self.head_heads is None or bool(self.head_depth or preset.get("head_depth")), f"--head-heads sets the DDT head's heads, and --model {self.model} has no head: give --head-depth and --head-width too, or a DiT-DH-* preset"),
            (self.checkpoint_blocks is None or 0 <= self.checkpoint_blocks <= blocks, f"--checkpoint-blocks must be in [0, {blocks}] (the model's blocks, trunk and head), got {self.checkpoint_blocks}"),
            (self.checkpoint_blocks is None or not self.grad_checkpointing, "--checkpoint-blocks and --grad-checkpointing both choose the recomputed blocks: give one"),
            (self.repa_coeff is None or self.repa_coeff > 0, f"--repa-coeff must be > 0 (or None: no REPA), got {self.repa_coeff}"),
            (self.repa_coeff is not None or (self.repa_depth, self.repa_projector_dim) == (None, None), f"--repa-depth and --repa-projector-dim set REPA's projector: give --repa-coeff too (REPA: {REPA_COEFF})"),
            (self.repa_coeff is None or 1 <= repa_depth <= trunk, f"--repa-depth {repa_depth} is beyond --model {self.model}'s {trunk} trunk blocks: give --repa-depth in [1, {trunk}]"),
            (self.repa_projector_dim is None or self.repa_projector_dim >= 1, f"--repa-projector-dim must be >= 1 (None: REPA's {REPA_PROJECTOR_DIM})"),
            (not self.reg or self.repa_coeff is not None, f"--reg trains with REPA's alignment, as REG does: give --repa-coeff too (REG: {REPA_COEFF})"),
            (self.reg_coeff is None or (self.reg and self.reg_coeff > 0), f"--reg-coeff weighs REG's class-token loss: give --reg, and a weight > 0 (got {self.reg_coeff})"),
            (not self.reg or not (self.head_depth or preset.get("head_depth") or self.learn_sigma), f"--reg needs a DiT without the DDT head and without --learn-sigma (--model {self.model})"),
            (self.attention in ATTENTION_BACKENDS, f"--attention {self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}"),
            (self.ddp_bucket_mb > 0, f"--ddp-bucket-mb must be > 0, got {self.ddp_bucket_mb}"),
            (self.shuffle_shards >= 1, f"--shuffle-shards must be >= 1, got {self.shuffle_shards}"),
            (self.log_every >= 1 and self.ckpt_every >= 1, "--log-every and --ckpt-every must be >= 1"),
            (self.keep_last is None or self.keep_last >= 1, "--keep-last must be >= 1 (or None)"),
            (self.sample_every is None or self.sample_every >= 1, "--sample-every must be >= 1 (or None)"),
            (self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be > 0 (or None)"),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1 (or None)"),
            (self.eval_samples >= 2, f"--eval-samples must be >= 2, got {self.eval_samples}"),
            (self.eval_every is None or (self.vae and self.eval_ref), "--eval-every needs --vae (to decode samples) and --eval-ref (e.g. a `latentdit evaluate --save-stats` file)"),
            (self.eval_milestones is None or self.eval_every is not None, "--eval-milestones needs --eval-every (the FIDs it compares with the thresholds)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        object.__setattr__(self, "eval_milestones", _milestones(self.eval_milestones))
        if self.wandb:
            from trainer.wandb_log import require_wandb

            require_wandb()
        parse_storage_options(self.storage_options)  # a one-line error now, not at the first read

    @property
    def milestones(self) -> tuple[float, ...]:
        """--eval-milestones as numbers (empty: none)."""
        return tuple(float(t) for t in (self.eval_milestones or "").split(",") if t)

    @property
    def recomputed_blocks(self) -> int | None:
        """How many leading blocks recompute their activations (None: all of them)."""
        if self.checkpoint_blocks is not None:
            return self.checkpoint_blocks
        return None if self.grad_checkpointing else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _milestones(text: str | float | None) -> str | None:
    """--eval-milestones checked and written canonically ("10,5,2"); None when empty."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = [float(t) for t in items if str(t).strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ConfigError(
            f"--eval-milestones {text!r}: give FID thresholds > 0 separated by commas, e.g. 10,5,2"
        )
    return ",".join(f"{v:g}" for v in values)


# Options that may change between a run and its resumption without changing what is learned.
RESUMABLE_CHANGES = frozenset(
    {"steps", "data", "shuffle_shards", "compile", "device", "log_every", "ckpt_every", "verify"}
    | {"keep_last", "sample_every", "vae", "peak_tflops", "grad_checkpointing", "store", "run"}
    | {"compile_scope", "compile_cache", "attention", "prefetch", "ddp_bucket_mb"}
    | {"grad_as_bucket_view", "compile_mode", "checkpoint_blocks", "bf16_weights"}
    | {"eval_every", "eval_samples", "eval_ref", "eval_inception", "eval_milestones"}
    | {"wandb", "wandb_project", "wandb_name"}
    | {"storage_options"}
)


def resolve_config(
    config_file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the file's options, then `overrides` (None values mean 'not given')."""
    return resolve_options(TrainConfig, config_file, overrides, command="train")
