"""Fetch a labeled URL list into webdataset tars with img2dataset, images at full resolution.

    latentdit download urls.csv --out shards/ --classes classes.txt

A thin wrapper over `img2dataset.download`: it checks the list and maps class names to indices
first, then lets img2dataset do the fetching, sharding and bookkeeping. Images are not resized
(`resize_mode="no"`), so that the exact ADM crop happens once, in `latentdit encode`; JPEGs with
a JFIF or Exif header are stored byte for byte (`skip_reencode=True`), other images re-encoded
as JPEG by img2dataset unless `reencode=False` (docs/web.md). Each sample's json carries its
class index under `LABEL_FIELD`. The summary is read from img2dataset's `<shard>_stats.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from foundation.config import option
from latent_store import ClassInfo, LatentditError
from pipeline.imagenet import read_class_file

log = logging.getLogger(__name__)

LABEL_FIELD = "label"  # json field of each downloaded sample that holds its class index
CLASS_FILE_NAME = "classes.txt"  # written next to the tars when --classes is given
STATS_SUFFIX = "_stats.json"  # img2dataset writes <shard>_stats.json once a shard is finished
INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
MAX_LABEL = 32767  # labels are stored as int16
SHOWN = 5  # bad values quoted in an error message


class DownloadError(LatentditError):
    """The URL list or the download options are unusable."""


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """What `download` fetches, where to, and how hard it works."""

    url_list: Path = option(argument=True, exists=True, dir_okay=False)
    """csv, tsv or parquet file with a URL column and a label column."""
    out: Path
    """Folder for the tars; re-running into it finishes only the shards not yet finished."""
    url_col: str = "url"
    """Column of the URL list that holds the image URLs."""
    label_col: str = "label"
    """Column holding each image's class: an integer index, or a class id from `classes`."""
    classes: Path | None = None
    """Class list, `ID [name]` per line (LOC_synset_mapping.txt works); needed for class ids."""
    processes: int = 1
    """img2dataset worker processes, one shard at a time each."""
    threads: int = 32
    """Download threads per process."""
    samples_per_shard: int = option(
        10_000, flags=("--number-sample-per-shard", "--samples-per-shard")
    )
    """URLs per tar (successes plus failures)."""
    timeout: int = 10
    """Seconds before one HTTP request is abandoned."""
    retries: int = 0
    """Extra attempts for a URL whose download failed."""
    reencode: bool = True
    """Let img2dataset check every image decodes and re-encode non-JPEGs as JPEG; --no-reencode
    stores the bytes exactly as served (and only `encode` finds undecodable files)."""

    def __post_init__(self) -> None:
        for name in ("processes", "threads", "samples_per_shard", "timeout"):
            if getattr(self, name) < 1:
                raise DownloadError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.retries < 0:
            raise DownloadError(f"retries must be >= 0, got {self.retries}")
        if self.url_col == self.label_col:
            raise DownloadError(f"--url-col and --label-col are both {self.url_col!r}")
        if input_format(self.url_list) is None:
            raise DownloadError(
                f"URL list {self.url_list} must end in {', '.join(INPUT_FORMATS)} (csv, tsv or parquet)"
            )


@dataclass(frozen=True, kw_only=True)
class DownloadSummary:
    """Totals over img2dataset's per-shard statistics files."""

    shards: int
    """Shards img2dataset finished (a `_stats.json` exists)."""
    unfinished: tuple[str, ...]
    """Tars without a stats file: interrupted or failed shards."""
    count: int
    """URLs attempted in the finished shards."""
    successes: int
    failed_to_download: int
    failed_to_resize: int
    """img2dataset's name for "downloaded but could not be decoded or re-encoded"."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Failure reason -> count, as img2dataset recorded them."""

    @property
    def failures(self) -> int:
        return self.failed_to_download + self.failed_to_resize

    def to_dict(self) -> dict:
        return {
            "shards": self.shards,
            "unfinished": list(self.unfinished),
            "count": self.count,
            "successes": self.successes,
            "failures": self.failures,
            "failed_to_download": self.failed_to_download,
            "failed_to_resize": self.failed_to_resize,
            "reasons": self.reasons,
        }

    def format(self) -> str:
        lines = [
            f"shards     {self.shards} finished"
            + (
                f", {len(self.unfinished)} unfinished: {', '.join(self.unfinished)}"
                if self.unfinished
                else ""
            ),
            f"images     {self.successes} downloaded of {self.count} "
            f"({self.failed_to_download} failed to download, {self.failed_to_resize} failed to decode)",
        ]
        lines += [f"  {n:>7}  {reason}" for reason, n in self.reasons.items()]
        if self.unfinished:
            lines.append("run the same command again to finish the unfinished shards")
        return "\n".join(lines)


def write_class_file(path: Path, classes: Sequence[ClassInfo]) -> None:
    """Write `classes` as read_class_file reads them: `ID name` per line, in index order."""
    path.write_text("".join(f"{c.id} {c.name}".rstrip() + "\n" for c in classes), encoding="utf-8")


def input_format(path: Path) -> str | None:
    """img2dataset's input_format for a URL-list file, from its suffix."""
    return INPUT_FORMATS.get(Path(path).suffix.lower())


def read_url_list(config: DownloadConfig, classes: Sequence[ClassInfo] | None):
    """The URL list as a pyarrow table of (url, LABEL_FIELD: int16 class index)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path, fmt = config.url_list, input_format(config.url_list)
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        else:
            delimiter = "\t" if fmt == "tsv" else ","
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    except (OSError, pa.ArrowException) as e:
        raise DownloadError(f"cannot read URL list {path}: {e}") from None
    for flag, col in (("--url-col", config.url_col), ("--label-col", config.label_col)):
        if col not in table.column_names:
            raise DownloadError(
                f"URL list {path} has no column {col!r} (columns: {', '.join(table.column_names)}); "
                f"name the right one with {flag}"
            )
    urls = table.column(config.url_col).to_pylist()
    labels = _class_indices(table.column(config.label_col).to_pylist(), classes, config)
    return pa.table({"url": pa.array(urls, pa.string()), LABEL_FIELD: pa.array(labels, pa.int16())})


def _class_indices(values: list, classes: Sequence[ClassInfo] | None, config: DownloadConfig):
    """Map a label column to class indices: integers as they are, class ids through `classes`."""
    where = f"column {config.label_col!r} of {config.url_list}"
    missing = [row for row, v in enumerate(values) if v is None]
    if missing:
        raise DownloadError(f"{where} is empty in rows {missing[:SHOWN]}: every URL needs a label")
    if all(isinstance(v, int) for v in values):
        limit = len(classes) - 1 if classes else MAX_LABEL
        bad = sorted({v for v in values if not 0 <= v <= limit})
        if bad:
            raise DownloadError(f"{where} has labels {bad[:SHOWN]} outside 0..{limit}")
        return values
    if classes is None:
        raise DownloadError(
            f"{where} holds class names (e.g. {next(v for v in values if not isinstance(v, int))!r}); "
            "pass --classes FILE listing them, one per line, to map them to indices"
        )
    index = {c.id: c.index for c in classes}
    unknown = sorted({str(v) for v in values if str(v) not in index})
    if unknown:
        raise DownloadError(
            f"{where} has labels {unknown[:SHOWN]} that are not in the class file {config.classes}"
        )
    return [index[str(v)] for v in values]


def download(config: DownloadConfig) -> DownloadSummary:
    """Download every URL of the list into `config.out` as webdataset tars; return the summary."""
    classes = read_class_file(config.classes) if config.classes else None
    table = read_url_list(config, classes)
    config.out.mkdir(parents=True, exist_ok=True)
    if classes:
        write_class_file(config.out / CLASS_FILE_NAME, classes)
    log.info("downloading %d URLs from %s into %s", table.num_rows, config.url_list, config.out)
    img2dataset = _import_img2dataset()
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="latentdit-urls-") as tmp:
        url_file = Path(tmp) / "urls.parquet"
        pq.write_table(table, url_file)
        with _stdout_to_stderr():
            img2dataset.download(**img2dataset_options(config, url_file))
    summary = summarize_shards(config.out)
    log.info(
        "%s: %d of %d images downloaded, %d shards finished, %d unfinished",
        config.out,
        summary.successes,
        summary.count,
        summary.shards,
        len(summary.unfinished),
    )
    return summary


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send img2dataset's progress prints (its own and its worker processes', which inherit
    file descriptor 1) to stderr, so that stdout carries only the summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def img2dataset_options(config: DownloadConfig, url_file: Path) -> dict:
    """Keyword arguments of `img2dataset.download` for `config`, given the normalized URL list."""
    return {
        "url_list": str(url_file),
        "input_format": "parquet",
        "url_col": "url",
        "save_additional_columns": [LABEL_FIELD],
        "output_folder": str(config.out),
        "output_format": "webdataset",
        "resize_mode": "no",  # full resolution: the ADM crop happens once, in `encode`
        "skip_reencode": True,  # keeps what imghdr calls a JPEG byte for byte
        "disable_all_reencoding": not config.reencode,  # keeps every file byte for byte
        "processes_count": config.processes,
        "thread_count": config.threads,
        "number_sample_per_shard": config.samples_per_shard,
        "timeout": config.timeout,
        "retries": config.retries,
        "incremental_mode": "incremental",  # a re-run skips the shards that have stats
        "enable_wandb": False,
    }


def _import_img2dataset():
    """Import img2dataset without albumentations' update check, which calls pypi.org on import
    (in this process and in every worker img2dataset spawns, which inherit the environment)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    return img2dataset


def shard_stats_path(tar: Path) -> Path:
    """img2dataset's statistics file for a tar: `00003.tar` -> `00003_stats.json`."""
    return tar.with_name(tar.stem + STATS_SUFFIX)


def summarize_shards(shard_dir: Path) -> DownloadSummary:
    """Add up img2dataset's `*_stats.json` files in `shard_dir`; list tars without one."""
    return summarize_tars(sorted(Path(shard_dir).glob("*.tar")))


def summarize_tars(tars: Sequence[Path]) -> DownloadSummary:
    """Add up the img2dataset statistics of `tars`; list those that have none (unfinished)."""
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    finished = [t for t in tars if shard_stats_path(t).exists()]
    for tar in finished:
        path = shard_stats_path(tar)
        try:
            stats = json.loads(path.read_text())
            for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
                totals[k] += int(stats[k])
            reasons.update({k: int(v) for k, v in stats["status_dict"].items() if k != "success"})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DownloadError(f"cannot read img2dataset statistics {path}: {e!r}") from None
    return DownloadSummary(
        shards=len(finished),
        unfinished=tuple(t.name for t in tars if t not in finished),
        count=totals["count"],
        successes=totals["successes"],
        failed_to_download=totals["failed_to_download"],
        failed_to_resize=totals["failed_to_resize"],
        reasons=dict(reasons.most_common()),
    )
