"""Local paths and fsspec URLs (`s3://bucket/train.zarr`, `gs://...`), and their storage options.

Credentials and endpoints come from where fsspec's drivers look for them (for S3: the
`AWS_*` variables including `AWS_ENDPOINT_URL`, `~/.aws`, instance roles; fsspec's own config
and `FSSPEC_S3_*` variables), or from `storage_options`: a JSON object passed as the driver's
keyword arguments (`--storage-options '{"endpoint_url": "http://minio:9000"}'`).

Secrets never reach a file or a message: what latentdit saves (a run's config.json, a store's
command line) has credential-like values (`SECRET_WORDS` in the name, at any depth) replaced by
`REDACTED`, which `parse_storage_options` drops again, so that a resume takes them from the
environment or a new --storage-options; errors name the option, never its value.
"""

from __future__ import annotations

import json
import os
from typing import Any

from foundation.errors import ConfigError

SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth")
SECRET_WORDS += ("session", "signature", "private", "connection_string", "cookie")
REDACTED = "<redacted>"

URL_MARK = "://"  # an fsspec URL, as opposed to a local path (zarr's own test)
LOCAL_SCHEMES = ("file://", "local://")


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL of a remote (or in-memory) file system, False for a local path."""
    text = str(path)
    return URL_MARK in text and not text.startswith(LOCAL_SCHEMES)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """The dict of a `--storage-options` JSON object; None for None or ''. Values saved as
    REDACTED are left out (the driver then finds them in the environment); errors never
    quote the text, which may hold secrets."""
    if not text:
        return None
    example = '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--storage-options is not JSON ({e.msg} at character {e.pos}; the value is not shown: "
            f"it may hold secrets); give an object such as {example}"
        ) from None
    except RecursionError:
        raise ConfigError(
            "--storage-options is nested too deeply; give a flat JSON object"
        ) from None
    if not isinstance(options, dict):
        raise ConfigError(
            f"--storage-options is not a JSON object (a {type(options).__name__}); give one such "
            f"as {example}"
        )
    return _drop_redacted(options)


def is_secret(name: str) -> bool:
    """Whether an option name looks like it holds a credential (key, secret, token, ...)."""
    return any(word in str(name).lower() for word in SECRET_WORDS)


def redact_options(value: Any) -> Any:
    """`value` (storage options) with every credential-like entry's value replaced by REDACTED."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret(k) else redact_options(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_options(v) for v in value]
    return value


def redact_options_json(text: str | None) -> str | None:
    """A `--storage-options` JSON text to save: credential-like values replaced by REDACTED."""
    if not text:
        return text
    options = json.loads(text)
    redacted = redact_options(options)
    return text if redacted == options else json.dumps(redacted)


def redacted_names(text: str | None) -> list[str]:
    """The names of the options in a saved `--storage-options` text that were redacted."""
    if not text:
        return []
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            found.extend(k for k, v in value.items() if v == REDACTED)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    try:
        walk(json.loads(text))
    except (ValueError, RecursionError):
        return []
    return found


def _drop_redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_redacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, list):
        return [_drop_redacted(v) for v in value if v != REDACTED]
    return value


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
