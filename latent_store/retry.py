"""Reads from an object store fail now and then: repeat one, bounded, then name it.

`retry` repeats a read a bounded number of times with exponential backoff and then raises
`StoreReadError` naming what could not be read (the fsspec drivers retry inside each attempt
too, e.g. s3fs on throttling).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from latent_store.errors import LatentditError, StoreReadError

log = logging.getLogger(__name__)

T = TypeVar("T")
READ_ATTEMPTS = 4  # tries of one read before it is reported
BACKOFF_S = 0.5  # wait before the 2nd try; doubles after every failed try (0.5 + 1 + 2 s in all)


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
