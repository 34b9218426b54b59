"""Local paths and fsspec URLs (`s3://bucket/train.zarr`, `gs://...`), and their storage options.

Credentials and endpoints come from where fsspec's drivers look for them (for S3: the
`AWS_*` variables including `AWS_ENDPOINT_URL`, `~/.aws`, instance roles; fsspec's own config
and `FSSPEC_S3_*` variables), or from `storage_options`: a JSON object passed as the driver's
keyword arguments (`--storage-options '{"endpoint_url": "http://minio:9000"}'`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from foundation.errors import ConfigError

URL_MARK = "://"  # an fsspec URL, as opposed to a local path (zarr's own test)
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
        raise ConfigError(
            f"--storage-options {text!r} is not JSON ({e.msg}); give an object such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        ) from None
    if not isinstance(options, dict):
        raise ConfigError(
            f"--storage-options {text!r} is not a JSON object; give one such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        )
    return options


def check_options_apply(path: str | os.PathLike, storage_options: dict | None) -> None:
    """Refuse storage options for a local path: they would be silently ignored."""
    if storage_options and not is_url(path):
        raise ConfigError(
            f"--storage-options are for store URLs (s3://...), but {path} is a local path; "
            "drop --storage-options"
        )


def redact_storage_options(argv: list[str]) -> list[str]:
    """A command line to record (in a store, a log): the value of --storage-options blanked."""
    flag = "--storage-options"
    return [
        "'...'" if i and argv[i - 1] == flag else (f"{flag}=..." if a.startswith(flag + "=") else a)
        for i, a in enumerate(argv)
    ]
