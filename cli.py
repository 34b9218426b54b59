"""The latentdit command line: thin Typer commands over the stage libraries.

    latentdit --help
    latentdit inspect STORE
    latentdit validate STORE

Each command parses its options into the stage's config and calls the library; a
`LatentditError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from latent_store import LatentditError, describe_store, validate_store
from latent_store.summary import format_description
from latent_store.validate import DEFAULT_MAX_CLIPPED, DEFAULT_MIN_PSNR

app = typer.Typer(
    help="Encode images once into uint8 VAE latents, then train and sample class-conditional DiTs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable)

StorePath = Annotated[Path, typer.Argument(help="A latent store folder (Zarr v3 group).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def user_errors(fn: F) -> F:
    """Turn LatentditError into a one-line message and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LatentditError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@app.command()
@user_errors
def inspect(store: StorePath, as_json: JsonFlag = False) -> None:
    """Describe a store: samples, classes, size, VAE, quantization, statistics, completion."""
    d = describe_store(store)
    typer.echo(json.dumps(d, indent=2) if as_json else format_description(d))


@app.command()
@user_errors
def validate(
    store: StorePath,
    as_json: JsonFlag = False,
    max_clipped: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Largest clipped fraction of quantized values.")
    ] = DEFAULT_MAX_CLIPPED,
    decode_check: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Also decode N stored latents and report PSNR against the re-cropped source "
            "images (from stored and from float latents: the gap is the quantization's cost).",
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(help="VAE for --decode-check [default: the one recorded in the store]."),
    ] = None,
    min_psnr: Annotated[
        float,
        typer.Option(
            help="--decode-check fails when the mean PSNR from stored latents is below this (dB; "
            "sd-vae-ft-ema averages 23.8 dB on COCO at 256 px, a broken store ~10 dB)."
        ),
    ] = DEFAULT_MIN_PSNR,
) -> None:
    """Check a store before training on it; exit 0 only when every check passes."""
    checks = validate_store(store, max_clipped=max_clipped)
    ok = all(c.ok for c in checks)
    decoded = _decode_check(store, decode_check, vae, min_psnr) if decode_check and ok else None
    ok = ok and (decoded is None or decoded["ok"])
    if as_json:
        report = {"ok": ok, "checks": [c.to_dict() for c in checks]}
        typer.echo(json.dumps({**report, "decode_check": decoded} if decoded else report, indent=2))
    else:
        for c in checks:
            typer.echo(f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.message}")
        if decoded:
            typer.echo(
                f"decode-check: {decoded['samples']} samples, PSNR {decoded['psnr_stored_db']:.2f} dB "
                f"from stored latents, {decoded['psnr_float_db']:.2f} dB from float latents "
                f"(quantization costs {decoded['quantization_cost_db']:.3f} dB)"
            )
            if not decoded["ok"]:
                typer.echo(
                    f"FAIL decode-check: PSNR {decoded['psnr_stored_db']:.2f} dB is below "
                    f"--min-psnr {min_psnr:g} dB: wrong VAE, or latents that do not decode"
                )
        typer.echo(f"{store}: {'valid' if ok else 'INVALID'}")
    raise typer.Exit(0 if ok else 1)


# --- encode and decode-check (pipeline) ---------------------------------------------------------
import sys  # noqa: E402  (imports of this section live here to keep merges local)
from enum import Enum  # noqa: E402

from latent_store.schema import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE  # noqa: E402
from pipeline.preprocess import DEFAULT_MAX_PIXELS  # noqa: E402


def _decode_check(store: Path, samples: int, vae: str | None, min_psnr: float) -> dict:
    """Run `validate --decode-check` on the GPU when there is one (validate verified the store)."""
    import torch

    from pipeline.decode_check import DecodeCheckConfig, decode_check

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = DecodeCheckConfig(
        samples=samples, vae=vae, device=device, min_psnr=min_psnr, verify=False
    )
    return decode_check(store, cfg)


class Posterior(str, Enum):
    mean = "mean"
    sample = "sample"
    moments = "moments"


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@app.command()
@user_errors
def encode(
    source: Annotated[
        Path,
        typer.Argument(
            help="ImageNet-style tree (train/<wnid>/*.JPEG), any class-folder dataset, a flat "
            "val folder with --val-labels, or webdataset tars: a folder of them, a brace pattern "
            "('shards/{00000..00099}.tar') or a .txt file listing tar paths.",
        ),
    ],
    out: Annotated[
        str,
        typer.Option(help="Store to create, or to resume if it exists: folder or fsspec URL."),
    ],
    vae: Annotated[str, typer.Option(help="diffusers AutoencoderKL: hub id or local folder.")] = (
        "stabilityai/sd-vae-ft-ema"
    ),
    vae_revision: Annotated[str | None, typer.Option(help="Hub revision of the VAE.")] = None,
    dtype: Annotated[Dtype, typer.Option(help="VAE compute dtype.")] = Dtype.fp32,
    device: Annotated[
        Device | None, typer.Option(help="Where the VAE runs [default: cuda if available].")
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder.")] = False,
    image_size: Annotated[int, typer.Option(min=8, help="Side of the ADM center crop.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per VAE forward pass.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="Decode+crop worker processes.")] = 4,
    flip: Annotated[
        bool, typer.Option(help="Also encode each crop's horizontal flip (2 variants).")
    ] = False,
    posterior: Annotated[
        Posterior, typer.Option(help="Posterior mean, a sample seeded per key, or mean + log std.")
    ] = Posterior.mean,
    val_labels: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Labels of a flat val folder: LOC_val_solution.csv or "
            "ILSVRC2012_validation_ground_truth.txt.",
        ),
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Class list, one id per line (LOC_synset_mapping.txt works); fixes label order.",
        ),
    ] = None,
    devkit_synsets: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="wnids in the devkit meta.mat order, one per line (for the devkit ground truth).",
        ),
    ] = None,
    label_key: Annotated[
        str, typer.Option(help="Tars: json field with the class index (a .cls member wins).")
    ] = "label",
    include_unfinished: Annotated[
        bool,
        typer.Option(
            "--include-unfinished",
            help="Tars: also use tars without img2dataset's _stats.json (unfinished shards).",
        ),
    ] = False,
    max_failures: Annotated[
        str | None,
        typer.Option(
            help="Undecodable images tolerated: a count (100) or fraction (1%). Default: "
            "max(10, 1% of the images), never more than 10%."
        ),
    ] = None,
    exif_transpose: Annotated[
        bool, typer.Option(help="Apply EXIF orientation (off: ImageNet parity).")
    ] = False,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Larger images are skipped as decompression bombs.")
    ] = DEFAULT_MAX_PIXELS,
    shard_size: Annotated[int, typer.Option(min=1, help="Samples per shard (unit of resume).")] = (
        DEFAULT_SHARD_SIZE
    ),
    chunk_size: Annotated[int, typer.Option(min=1, help="Samples per Zarr chunk.")] = (
        DEFAULT_CHUNK_SIZE
    ),
    calibration_samples: Annotated[
        int, typer.Option(min=1, help="Images that set the quantization range.")
    ] = 512,
) -> None:
    """Encode image folders or webdataset tars into a latent store (resumable; torchrun scales)."""
    from pipeline.encode import EncodeConfig, parse_max_failures
    from pipeline.encode import encode as run_encode

    cfg = EncodeConfig(
        source=source,
        out=out,
        vae=vae,
        vae_revision=vae_revision,
        dtype=dtype.value,
        device=device.value if device else None,
        compile=compile,
        image_size=image_size,
        batch_size=batch_size,
        workers=workers,
        flip=flip,
        posterior=posterior.value,
        val_labels=val_labels,
        classes=classes,
        devkit_synsets=devkit_synsets,
        label_key=label_key,
        include_unfinished=include_unfinished,
        max_failures=None if max_failures is None else parse_max_failures(max_failures),
        exif_transpose=exif_transpose,
        max_pixels=max_pixels,
        shard_size=shard_size,
        chunk_size=chunk_size,
        calibration_samples=calibration_samples,
        command=" ".join(["latentdit", *sys.argv[1:]]),
    )
    summary = run_encode(cfg)
    if summary is not None:
        typer.echo(
            f"{out}: {summary['samples_written']} samples written, "
            f"{summary['samples_failed']} failed; check it with `latentdit validate {out}`"
        )


# --- download (img2dataset) ---------------------------------------------------------------------


@app.command()
@user_errors
def download(
    url_list: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help="csv, tsv or parquet file with a URL column and a label column.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the webdataset tars (re-run to resume).")],
    url_col: Annotated[str, typer.Option(help="Column holding the image URLs.")] = "url",
    label_col: Annotated[
        str, typer.Option(help="Column holding class indices, or class ids with --classes.")
    ] = "label",
    classes: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Class list, one id per line; maps class ids in --label-col to indices.",
        ),
    ] = None,
    processes: Annotated[int, typer.Option(min=1, help="img2dataset worker processes.")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="Download threads per process.")] = 32,
    number_sample_per_shard: Annotated[
        int, typer.Option(min=1, help="URLs per tar (successes and failures).")
    ] = 10_000,
    timeout: Annotated[int, typer.Option(min=1, help="Seconds before a request is dropped.")] = 10,
    retries: Annotated[int, typer.Option(min=0, help="Extra attempts per failed URL.")] = 0,
    reencode: Annotated[
        bool,
        typer.Option(
            help="Let img2dataset check every image decodes and re-encode non-JPEGs as JPEG; "
            "--no-reencode stores the bytes exactly as served (encode checks them)."
        ),
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Download a labeled URL list into webdataset tars with img2dataset (full resolution)."""
    from pipeline.download import DownloadConfig
    from pipeline.download import download as run_download

    summary = run_download(
        DownloadConfig(
            url_list=url_list,
            out=out,
            url_col=url_col,
            label_col=label_col,
            classes=classes,
            processes=processes,
            threads=threads,
            samples_per_shard=number_sample_per_shard,
            timeout=timeout,
            retries=retries,
            reencode=reencode,
        )
    )
    typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())
    if not summary.unfinished:
        typer.echo(f"next: latentdit encode {out} --out STORE", err=True)
    raise typer.Exit(1 if summary.unfinished else 0)


# --- train (trainer) ----------------------------------------------------------------------------


def _train_option(name: str, *flags: str, **kw) -> typer.models.OptionInfo:
    """A `train` option whose help and default come from TrainConfig (None here: not given)."""
    from trainer.config import FIELD_DEFAULTS, FIELD_HELP

    default = FIELD_DEFAULTS[name]
    shown = "required" if default == "" else f"default: {default}"
    return typer.Option(*flags, help=f"{FIELD_HELP[name]} ({shown})", **kw)


@app.command(context_settings={"max_content_width": 100})
@user_errors
def train(
    store: Annotated[Path | None, _train_option("store")] = None,
    run: Annotated[Path | None, _train_option("run", "--run", "--run-dir")] = None,
    model: Annotated[str | None, _train_option("model")] = None,
    steps: Annotated[int | None, _train_option("steps")] = None,
    batch_size: Annotated[int | None, _train_option("batch_size")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A .toml or .yaml file of options; CLI options win.")
    ] = None,
    vae: Annotated[str | None, _train_option("vae")] = None,
    hidden_size: Annotated[int | None, _train_option("hidden_size")] = None,
    depth: Annotated[int | None, _train_option("depth")] = None,
    num_heads: Annotated[int | None, _train_option("num_heads")] = None,
    grad_accum: Annotated[int | None, _train_option("grad_accum")] = None,
    lr: Annotated[float | None, _train_option("lr")] = None,
    weight_decay: Annotated[float | None, _train_option("weight_decay")] = None,
    adam_betas: Annotated[tuple[float, float] | None, _train_option("adam_betas")] = None,
    warmup_steps: Annotated[int | None, _train_option("warmup_steps")] = None,
    cosine_decay: Annotated[bool | None, _train_option("cosine_decay")] = None,
    min_lr: Annotated[float | None, _train_option("min_lr")] = None,
    grad_clip: Annotated[float | None, _train_option("grad_clip")] = None,
    no_grad_clip: Annotated[
        bool, typer.Option("--no-grad-clip", help="Do not clip gradients.")
    ] = False,
    ema_decay: Annotated[float | None, _train_option("ema_decay")] = None,
    objective: Annotated[str | None, _train_option("objective")] = None,
    timesteps: Annotated[str | None, _train_option("timesteps")] = None,
    ddpm_schedule: Annotated[str | None, _train_option("ddpm_schedule")] = None,
    p_uncond: Annotated[float | None, _train_option("p_uncond")] = None,
    normalization: Annotated[str | None, _train_option("normalization")] = None,
    qk_norm: Annotated[bool | None, _train_option("qk_norm")] = None,
    pos_embed: Annotated[str | None, _train_option("pos_embed")] = None,
    grad_checkpointing: Annotated[bool | None, _train_option("grad_checkpointing")] = None,
    data: Annotated[str | None, _train_option("data")] = None,
    shuffle_shards: Annotated[int | None, _train_option("shuffle_shards")] = None,
    verify: Annotated[bool | None, _train_option("verify", "--verify/--no-verify")] = None,
    seed: Annotated[int | None, _train_option("seed")] = None,
    precision: Annotated[str | None, _train_option("precision")] = None,
    compile: Annotated[bool | None, _train_option("compile")] = None,
    device: Annotated[str | None, _train_option("device")] = None,
    log_every: Annotated[int | None, _train_option("log_every")] = None,
    ckpt_every: Annotated[int | None, _train_option("ckpt_every")] = None,
    keep_last: Annotated[int | None, _train_option("keep_last")] = None,
    keep_all: Annotated[bool, typer.Option("--keep-all", help="Keep every checkpoint.")] = False,
    sample_every: Annotated[int | None, _train_option("sample_every")] = None,
    peak_tflops: Annotated[float | None, _train_option("peak_tflops")] = None,
) -> None:
    """Train a class-conditional DiT on a latent store; re-running on a run folder resumes it."""
    options = {k: v for k, v in locals().items() if k not in ("config", "no_grad_clip", "keep_all")}
    import dataclasses

    from trainer.run_dir import resolve_run_config
    from trainer.train import train as train_run

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    cfg = resolve_run_config(config, options)
    if no_grad_clip or keep_all:
        cfg = dataclasses.replace(
            cfg,
            grad_clip=None if no_grad_clip else cfg.grad_clip,
            keep_last=None if keep_all else cfg.keep_last,
        )
    summary = train_run(cfg, sample_fn=_sample_hook(cfg))
    if summary.rank == 0:
        typer.echo(summary.format())


def _sample_hook(cfg):
    """The sampler's training hook for --vae: `sampler.training.sample_grid_hook(cfg.vae)`.

    It must return a callable (ema_model, meta, step, run_dir) -> None (see trainer.train.SampleFn).
    """
    if cfg.vae is None:
        return None
    try:
        from sampler.training import sample_grid_hook
    except ImportError:
        raise LatentditError(
            "--vae asks for sample grids, but this build has no sampler hook "
            "(sampler.training.sample_grid_hook); train without --vae"
        ) from None
    return sample_grid_hook(cfg.vae)


# --- sample (sampler) ---------------------------------------------------------------------------


def _sample_default(name: str):
    """The SampleConfig / SolveConfig default of a `sample` option: one source for each default."""
    from dataclasses import fields

    from sampler.latents import SolveConfig
    from sampler.sample import SampleConfig

    return {f.name: f.default for c in (SampleConfig, SolveConfig) for f in fields(c)}[name]


def _solver_names() -> str:
    from sampler.solvers import SOLVERS

    return ", ".join(f"{k} ({v.kind})" for k, v in SOLVERS.items())


@app.command(context_settings={"max_content_width": 100})
@user_errors
def sample(
    checkpoint: Annotated[
        Path, typer.Argument(help="A run dir (its latest checkpoint) or a checkpoint folder.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder (PNGs, grid.png, .npz, resume state).")],
    vae: Annotated[
        str | None, typer.Option(help="VAE folder or hub id; default: the checkpoint's VAE.")
    ] = None,
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--class", help="Class index, wnid or name; repeat for more. Default: random."
        ),
    ] = None,
    n: Annotated[
        int, typer.Option(min=1, help="Images per --class (without --class: images in total).")
    ] = _sample_default("n"),
    sampler: Annotated[
        str | None,
        typer.Option(help=f"Solver: {_solver_names()}. Default: heun (flow), dpm++2m (DDPM)."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Solver steps.")] = _sample_default("steps"),
    cfg: Annotated[
        float, typer.Option(min=0.0, help="Guidance scale on all channels; 1 = no guidance.")
    ] = _sample_default("cfg"),
    cfg_interval: Annotated[
        tuple[float, float] | None,
        typer.Option(help="Guide only while LO <= t <= HI (t in [0, 1], 1 = noise)."),
    ] = None,
    shift: Annotated[
        float, typer.Option(help="SD3 timestep shift for flow solvers (1 = none).")
    ] = _sample_default("shift"),
    eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic).")] = _sample_default(
        "eta"
    ),
    seed: Annotated[
        int, typer.Option(min=0, help="Run seed; image i draws its noise from (seed, i).")
    ] = _sample_default("seed"),
    first_index: Annotated[
        int, typer.Option(min=0, help="Index of the first image (regenerate image i: --n 1).")
    ] = _sample_default("first_index"),
    fid_samples: Annotated[
        int | None,
        typer.Option(help="Class-balanced FID set: exactly N / num_classes images per class."),
    ] = None,
    npz: Annotated[
        bool, typer.Option("--npz", help="Also write the ADM evaluator's .npz (resumable).")
    ] = _sample_default("npz"),
    png: Annotated[bool, typer.Option(help="Write one PNG per image.")] = _sample_default("png"),
    grid: Annotated[bool, typer.Option(help="Write grid.png of the first images.")] = (
        _sample_default("grid")
    ),
    weights: Annotated[str, typer.Option(help="ema or model weights.")] = _sample_default(
        "weights"
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = _sample_default(
        "batch_size"
    ),
    device: Annotated[str | None, typer.Option(help="Torch device; default cuda if any.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 autocast; default bf16 on cuda.")
    ] = None,
) -> None:
    """Sample images from a checkpoint with only the VAE decoder; re-run to resume."""
    from sampler.latents import SolveConfig
    from sampler.sample import SampleConfig
    from sampler.sample import sample as run_sample

    result = run_sample(
        SampleConfig(
            checkpoint=checkpoint,
            out=out,
            vae=vae,
            classes=tuple(classes or ()),
            n=n,
            solve=SolveConfig(
                sampler=sampler,
                steps=steps,
                cfg=cfg,
                cfg_interval=cfg_interval,
                shift=shift,
                eta=eta,
            ),
            seed=seed,
            first_index=first_index,
            fid_samples=fid_samples,
            npz=npz,
            png=png,
            grid=grid,
            weights=weights,
            batch_size=batch_size,
            device=device,
            precision=precision,
        )
    )
    typer.echo(
        f"{result.out}: {result.total} images ({result.made} made now)"
        + (f", {result.npz}" if result.npz else "")
    )


# --- demo ---------------------------------------------------------------------------------------


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artifact of the demo.")] = Path(
        "demo_out"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="A shortened demo (tiny data and model; for CI).")
    ] = False,
    train_steps: Annotated[
        int | None, typer.Option(min=1, help="DiT training steps [default: the demo's].")
    ] = None,
) -> None:
    """Run every stage on generated images, offline, in minutes on a CPU; see OUT/report.json."""
    from dataclasses import replace

    from demo.run import DemoConfig, run_demo

    cfg = DemoConfig.quick(out) if quick else DemoConfig(out=out)
    if train_steps is not None:
        cfg = replace(cfg, train_steps=train_steps)
    run_demo(cfg, echo=typer.echo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
