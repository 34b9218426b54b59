"""Where a store lives: a local folder or an fsspec URL (`s3://bucket/train.zarr`, `gs://...`).

Credentials and endpoints come from where fsspec's drivers look for them (for S3: the
`AWS_*` variables including `AWS_ENDPOINT_URL`, `~/.aws`, instance roles; fsspec's own config
and `FSSPEC_S3_*` variables), or from `storage_options`: a JSON object passed as the driver's
keyword arguments (`--storage-options '{"endpoint_url": "http://minio:9000"}'`).

Reads from an object store fail now and then; `retry` repeats one a bounded number of times
with exponential backoff and then raises `StoreReadError` naming what could not be read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from latent_store.errors import LatentditError, StoreReadError

log = logging.getLogger(__name__)

T = TypeVar("T")
URL_MARK = "://"  # an fsspec URL, as opposed to a local path (zarr's own test)
READ_ATTEMPTS = 4  # tries of one read before it is reported
BACKOFF_S = 0.5  # wait before the 2nd try; doubles after every failed try (0.5 + 1 + 2 s in all)
LOCAL_SCHEMES = ("file://", "local://")


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL of a remote (or in-memory) file system, False for a local path."""
    text = str(path)
    return URL_MARK in text and not text.startswith(LOCAL_SCHEMES)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """The dict of a `--storage-options` JSON object; None for None or ''."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise LatentditError(
            f"--storage-options {text!r} is not JSON ({e.msg}); give an object such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        ) from None
    if not isinstance(options, dict):
        raise LatentditError(
            f"--storage-options {text!r} is not a JSON object; give one such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        )
    return options


def check_options_apply(path: str | os.PathLike, storage_options: dict | None) -> None:
    """Refuse storage options for a local path: they would be silently ignored."""
    if storage_options and not is_url(path):
        raise LatentditError(
            f"--storage-options are for store URLs (s3://...), but {path} is a local path; "
            "drop --storage-options"
        )


def retry(read: Callable[[], T], what: str, *, attempts: int | None = None) -> T:
    """`read()`, repeated after a failure with exponential backoff; then StoreReadError.

    Errors of the LatentditError family (no store, bad metadata) are answers, not failures,
    and pass through at once. `what` names the object for the log and the error message.
    """
    attempts = attempts or READ_ATTEMPTS
    wait = BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except LatentditError:
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
            if attempt == attempts:
                raise StoreReadError(
                    f"{what}: read failed {attempts} times, last with {reason}; check the "
                    "endpoint, credentials and network (AWS_ENDPOINT_URL, --storage-options), "
                    "then re-run"
                ) from e
            log.warning("%s: read failed (%s); retry %d of %d in %.1f s", what, reason,
                        attempt, attempts - 1, wait)  # fmt: skip
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")
