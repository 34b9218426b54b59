"""Hostile files for the tests and benchmarks of bounded decoding.

data = png16_bomb(8960, 8960)    # ~156 KB on disk, 161 MB of 16-bit samples once decoded
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png16_bomb(width: int, height: int) -> bytes:
    """A 16-bit grayscale PNG of zeros, compressed row by row (never held whole in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    z, row = zlib.compressobj(9), b"\x00" * (1 + 2 * width)  # filter byte + samples
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, grayscale
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
