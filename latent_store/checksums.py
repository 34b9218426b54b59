"""Shard checksums: what records carry and every reader recomputes.

    shard_checksum({"latents": rows, "labels": labels})   # "xxh3-128:<hex>"

Writers record CHECKSUM; readers verify every kind in CHECKSUMS, so stores written before it keep
loading.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import xxhash

# Shard checksums by the name their records carry. Writers record CHECKSUM (xxh3: ~30 GB/s on
# a core here against blake2b's 0.9, which cost as much as the load itself); readers verify both,
# so stores written before it keep loading (bench/bench_checksum.py compares the candidates).
CHECKSUMS = {
    "xxh3-128": xxhash.xxh3_128,
    "blake2b-128": lambda: hashlib.blake2b(digest_size=16),
}
CHECKSUM = "xxh3-128"


def shard_checksum(data: Mapping[str, np.ndarray], algorithm: str = CHECKSUM) -> str:
    """Checksum of arrays' bytes, in the mapping's order: "ALGORITHM:HEX".

    Both kinds release the GIL, so shards hash in parallel in the threads that read them.
    """
    h = CHECKSUMS[algorithm]()
    for values in data.values():
        h.update(np.ascontiguousarray(values).data)
    return f"{algorithm}:{h.hexdigest()}"


def parts_checksum(checksums: Sequence[str]) -> str:
    """A v2 record's checksum: the digest of its parts' checksums, in their kind."""
    algorithm = checksum_algorithm(checksums[0]) or CHECKSUM
    h = CHECKSUMS[algorithm]()
    h.update("\n".join(checksums).encode())
    return f"{algorithm}:{h.hexdigest()}"


def checksum_algorithm(checksum: str) -> str | None:
    """The algorithm a recorded checksum names ("xxh3-128:..." -> "xxh3-128"), None if unknown."""
    algorithm = checksum.partition(":")[0]
    return algorithm if algorithm in CHECKSUMS else None
