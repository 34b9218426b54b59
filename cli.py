"""The latentdit command line: a table of commands, each a config dataclass and the call it makes.

    latentdit --help
    latentdit encode data/imagenet/train --out stores/in256.zarr
    latentdit train --store stores/in256.zarr --run runs/b2
    latentdit sample runs/b2 --out samples/b2 --class 207 --cfg 4

Each command's options are generated from its config's fields (`cli_options.config_command`):
default and help come from the field, `--config FILE` fills what the command line leaves out.
Nothing here imports torch or diffusers until a command runs, so `--help` answers at once. A
`LatentditError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from cli_options import config_command
from demo.config import (
    ClassifierTrainConfig,
    DemoConfig,
    DemoDataConfig,
    EncoderTrainConfig,
    VaeTrainConfig,
)
from evaluation.config import EvaluateConfig
from foundation.errors import LatentditError
from latent_store.config import InspectConfig, ValidateConfig
from pipeline.download import DownloadConfig
from pipeline.encode_config import EncodeConfig
from sampler.config import SampleConfig
from sampler.import_config import ImportConfig
from trainer.config import TrainConfig

STYLE = {"context_settings": {"max_content_width": 100, "help_option_names": ["-h", "--help"]}}
app = typer.Typer(
    help="Encode images once into uint8 VAE latents, then train and sample class-conditional DiTs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    **STYLE,
)
demo_tools = typer.Typer(
    help="The demo's own tools: its image generator, and how its shipped VAE, classifier and "
    "image encoder were trained.",
    no_args_is_help=True,
    rich_markup_mode=None,
    **STYLE,
)
app.add_typer(demo_tools, name="demo-tools")

F = TypeVar("F", bound=Callable)


def user_errors(fn: F, name: str = "COMMAND") -> F:
    """Turn LatentditError, and a full disk, no memory or an object store that is down
    (`foundation.faults`), into a one-line message and exit code 2 (no traceback)."""
    from foundation.faults import describe_fault

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LatentditError as e:
            _close_progress_bars()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:
            if (fault := describe_fault(e)) is None:
                raise
            logging.getLogger(__name__).debug("latentdit %s", name, exc_info=True)
            _close_progress_bars()
            typer.echo(
                f"error: {fault.what} in latentdit {name}; what it finished before is kept; "
                f"{fault.remedy}, then re-run the same command",
                err=True,
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _close_progress_bars() -> None:
    """End the progress bars a failed command left open, so that its error starts a line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def flag(name: str, *flags: str, help: str) -> inspect.Parameter:
    """A presentation flag of a command (not a config field), e.g. --json."""
    info = typer.Option(False, *flags, help=help, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=bool)


JSON = flag("as_json", "--json", help="Print machine-readable JSON.")


def command(target: typer.Typer, name: str, cls: type, **kw: Any) -> Callable[[F], F]:
    """Register `run(cfg, ...)` as command `name` with options generated from `cls`."""

    def register(run: F) -> F:
        target.command(name)(
            user_errors(config_command(cls, run, name=name, help=run.__doc__, **kw), name)
        )
        return run

    return register


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    from foundation.faults import StoreNoiseFilter

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    noise = logging.getLogger("asyncio")  # a store that went down: one line, not aiohttp's traces
    if not verbose and not any(isinstance(f, StoreNoiseFilter) for f in noise.filters):
        noise.addFilter(StoreNoiseFilter())


# --- the store -----------------------------------------------------------------------------------


@command(app, "inspect", InspectConfig, config_file=False, extra=(JSON,))
def inspect_store(cfg: InspectConfig, as_json: bool) -> None:
    """Describe a store (samples, classes, VAE, quantization, statistics) or a run (its cost, FIDs)."""
    from trainer.report import format_report, is_run_dir, run_report

    if is_run_dir(cfg.store):
        r = run_report(cfg.store)
        typer.echo(json.dumps(r, indent=2) if as_json else format_report(r))
        return
    from latent_store import describe_store
    from latent_store.summary import format_description

    d = describe_store(_open(cfg.store, cfg.storage_options))
    typer.echo(json.dumps(d, indent=2) if as_json else format_description(d))


@command(app, "validate", ValidateConfig, config_file=False, extra=(JSON,))
def validate(cfg: ValidateConfig, as_json: bool) -> None:
    """Check a store before training on it; exit 0 only when every check passes."""
    from latent_store import seal_store, validate_store

    store = _open(cfg.store, cfg.storage_options)
    checks = (seal_store if cfg.seal else validate_store)(store, max_clipped=cfg.max_clipped)
    ok = all(c.ok for c in checks)
    decoded = _decode_check(cfg, store) if cfg.decode_check and ok else None  # sound stores only
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
                    f"--min-psnr {cfg.min_psnr:g} dB: wrong VAE, or latents that do not decode"
                )
        typer.echo(f"{cfg.store}: {'valid' if ok else 'INVALID'}")
    raise typer.Exit(0 if ok else 1)


def _open(store: str, storage_options: str | None):
    """The store at a path or URL (`latent_store.open_store`), with --storage-options."""
    from foundation.urls import parse_storage_options
    from latent_store import open_store

    return open_store(store, storage_options=parse_storage_options(storage_options))


def _decode_check(cfg: ValidateConfig, store) -> dict:
    """Run `validate --decode-check` on the GPU when there is one (validate verified the store)."""
    import torch

    from pipeline.decode_check import DecodeCheckConfig, decode_check

    device = "cuda" if torch.cuda.is_available() else "cpu"
    check = DecodeCheckConfig(
        samples=cfg.decode_check, vae=cfg.vae, device=device, min_psnr=cfg.min_psnr, verify=False
    )
    return decode_check(store, check)


# --- stage 1: encode, download -------------------------------------------------------------------


@command(app, "encode", EncodeConfig)
def encode(cfg: EncodeConfig) -> None:
    """Encode image folders or webdataset tars into a latent store (resumable; torchrun scales)."""
    from foundation.urls import redact_storage_options
    from pipeline.encode import encode as run_encode

    argv = redact_storage_options(sys.argv[1:])  # --storage-options may hold credentials
    cfg = dataclasses.replace(cfg, command=" ".join(["latentdit", *argv]))
    summary = run_encode(cfg)
    if summary is not None:
        skipped = summary.get("source_skipped")
        typer.echo(
            f"{cfg.out}: {summary['samples_written']} samples written, "
            f"{summary['samples_failed']} failed"
            + (f", {skipped} source paths skipped (not regular files, loops...)" if skipped else "")
            + f"; check it with `latentdit validate {cfg.out}`"
        )


@command(app, "download", DownloadConfig, extra=(JSON,))
def download(cfg: DownloadConfig, as_json: bool) -> None:
    """Download a labeled URL list into webdataset tars with img2dataset (full resolution)."""
    from pipeline.download import download as run_download

    summary = run_download(cfg)
    typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())
    if not summary.unfinished:
        typer.echo(f"next: latentdit encode {cfg.out} --out STORE", err=True)
    raise typer.Exit(1 if summary.unfinished else 0)


# --- stage 2: train ------------------------------------------------------------------------------


def _saved_run_config(values: dict[str, Any]) -> dict[str, Any] | None:
    """A resumed run's own config.json: `train --run RUN` alone continues it as it was."""
    from trainer.run_dir import saved_config

    return saved_config(values["run"]) if values.get("run") else None


@command(app, "train", TrainConfig, base=_saved_run_config)
def train(cfg: TrainConfig) -> None:
    """Train a class-conditional DiT on a latent store; `--run RUN` alone resumes it."""
    from trainer.train import train as train_run

    hook = None
    if cfg.vae is not None:
        from sampler.training import sample_grid_hook

        hook = sample_grid_hook(cfg.vae)
    eval_fn = None
    if cfg.eval_every is not None:
        from evaluation.training import fid_hook

        eval_fn = fid_hook(
            cfg.vae, cfg.eval_ref, samples=cfg.eval_samples, inception=cfg.eval_inception
        )
    summary = train_run(cfg, sample_fn=hook, eval_fn=eval_fn)
    if summary.rank == 0:
        from trainer.report import format_report, run_report

        typer.echo(f"{summary.format()}\n{format_report(run_report(cfg.run))}")


# --- stage 3: sample -----------------------------------------------------------------------------


def option_param(name: str, *flags: str, help: str) -> inspect.Parameter:
    """A text option of a command that is not a config field (e.g. a preset's name)."""
    info = typer.Option(None, *flags, help=help, show_default=False, metavar="NAME")
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=str | None
    )


PROTOCOL = option_param(
    "protocol", "--protocol",
    help="A published sampling protocol: dit-fid, sit-fid or repa-fid (docs/reproduce.md); options "
    "given beside it win.",
)  # fmt: skip


def _sample_protocol(values: dict[str, Any]) -> dict[str, Any] | None:
    """The solver options of `--protocol NAME` (below --config and the command line)."""
    from sampler.config import protocol_options

    return {"solve": protocol_options(values["protocol"])} if values.get("protocol") else None


@command(app, "sample", SampleConfig, extra=(PROTOCOL,), base=_sample_protocol)
def sample(cfg: SampleConfig, protocol: str | None) -> None:
    """Sample images from a checkpoint with only the VAE decoder; re-run to resume."""
    from sampler.sample import sample as run_sample

    result = run_sample(cfg)
    typer.echo(
        f"{result.out}: {result.total} images ({result.made} made now)"
        + (f", {result.npz}" if result.npz else "")
    )


@command(app, "import", ImportConfig)
def import_checkpoint(cfg: ImportConfig) -> None:
    """Import an official DiT or SiT checkpoint into a run dir that `sample` and `train` read."""
    from sampler.importer import import_checkpoint as run_import

    folder = run_import(cfg)
    typer.echo(f"{folder}: imported; next: latentdit sample {cfg.run} --out SAMPLES")


# --- evaluate ------------------------------------------------------------------------------------


@command(app, "evaluate", EvaluateConfig, extra=(JSON,))
def evaluate(cfg: EvaluateConfig, as_json: bool) -> None:
    """FID, sFID, Inception Score, precision/recall of SAMPLES against --ref, as ADM's evaluator."""
    from evaluation.evaluate import evaluate as run_evaluate
    from evaluation.evaluate import format_result
    from foundation.distributed import launch_rank

    result = run_evaluate(cfg)  # under torchrun: the same result on every rank; rank 0 prints it
    if launch_rank() == 0:
        typer.echo(json.dumps(result, indent=2) if as_json else format_result(result))


# --- the demo ------------------------------------------------------------------------------------

QUICK = flag("quick", "--quick", help="A shortened demo (tiny data and model; for CI).")


def _demo_preset(values: dict[str, Any]) -> dict[str, Any] | None:
    from demo.config import QUICK as QUICK_SIZES

    return QUICK_SIZES if values.get("quick") else None


@command(app, "demo", DemoConfig, extra=(QUICK,), base=_demo_preset)
def demo(cfg: DemoConfig, quick: bool) -> None:
    """Run every stage on generated images, offline, in minutes on a CPU; see OUT/report.json."""
    from demo.run import run_demo

    run_demo(cfg, echo=typer.echo)


@command(demo_tools, "data", DemoDataConfig)
def demo_data(cfg: DemoDataConfig) -> None:
    """Generate the demo's labeled image set in the ImageNet layout."""
    from demo.data import make_demo_data

    typer.echo(make_demo_data(cfg))


@command(demo_tools, "train-vae", VaeTrainConfig)
def demo_train_vae(cfg: VaeTrainConfig) -> None:
    """Train the demo's small VAE (it ships in demo/assets/vae)."""
    from demo.train_vae import train_vae

    typer.echo(json.dumps(train_vae(cfg), indent=2))


@command(demo_tools, "train-classifier", ClassifierTrainConfig)
def demo_train_classifier(cfg: ClassifierTrainConfig) -> None:
    """Train the demo's verdict classifier (it ships in demo/assets/classifier)."""
    from demo.train_classifier import train_classifier

    typer.echo(json.dumps(train_classifier(cfg), indent=2))


@command(demo_tools, "train-encoder", EncoderTrainConfig)
def demo_train_encoder(cfg: EncoderTrainConfig) -> None:
    """Train the demo's image encoder, REPA's features (it ships in demo/assets/encoder)."""
    from demo.train_encoder import train_encoder

    typer.echo(json.dumps(train_encoder(cfg), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
