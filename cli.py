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
from latent_store.validate import DEFAULT_MAX_CLIPPED

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
) -> None:
    """Check a store before training on it; exit 0 only when every check passes."""
    checks = validate_store(store, max_clipped=max_clipped)
    ok = all(c.ok for c in checks)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        for c in checks:
            typer.echo(f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.message}")
        typer.echo(f"{store}: {'valid' if ok else 'INVALID'}")
    raise typer.Exit(0 if ok else 1)


# --- encode and decode-check (pipeline) ---------------------------------------------------------


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


# --- sample (sampler) ---------------------------------------------------------------------------


# --- demo ---------------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
