"""Reading `.npz` files that evaluate is given, each damage refused in one line before any work.

    info, shape, dtype, header = image_member(zf, path)   # arr_0's header, checked against its size
    with member_data(zf, path, info, header) as f: ...     # the images' bytes, at any offset
    member_crc_check(path, info)()                         # the member's bytes against its CRC-32
    arrays = load_arrays(path, ["mu", "sigma"])            # small members: statistics

What is checked (each a one-line EvaluationError naming the file):
- the zip itself (a truncated file has lost its central directory), and the .npy header (magic,
  version, a parsable dict, C order);
- that the member holds exactly the bytes its header promises: a header of more images than the
  member holds would otherwise fail halfway through featurizing;
- object arrays (pickled Python objects): never loaded (`allow_pickle=False`), refused by name;
- the member's CRC-32: zipfile checks it when a member is read whole (statistics); arr_0 is
  streamed from the file at a rank's offset, which bypasses zipfile, so its CRC is computed by
  `member_crc_check` on its own (run beside the featurizing: see `evaluation.evaluate`).
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from evaluation.errors import EvaluationError

IMAGES = "arr_0"
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
CRC_BLOCK = 16 << 20  # bytes per read of the CRC pass
READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise EvaluationError(f"{path}: not a readable .npz ({_reason(e)})") from None


def read_header(f: BinaryIO, path: Path, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an open .npy stream, left at the first byte of its data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except READ_ERRORS as e:
        raise EvaluationError(f"{path}: {member} has no valid .npy header ({_reason(e)})") from None
    if fortran:
        raise EvaluationError(f"{path}: {member} is Fortran-ordered; save it C-ordered")
    return shape, dtype


def image_member(
    zf: zipfile.ZipFile, path: Path
) -> tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype, int]:
    """(info, shape, dtype, header bytes) of arr_0, its size checked against its header."""
    info = zf.getinfo(f"{IMAGES}.npy")
    try:
        with zf.open(info) as f:
            shape, dtype = read_header(f, path, IMAGES)
            header = f.tell()
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
        raise EvaluationError(f"{path}: {IMAGES} cannot be read ({_reason(e)})") from None
    if dtype.hasobject:
        raise EvaluationError(
            f"{path}: {IMAGES} is an object array (pickled Python objects), "
            "which evaluate never loads; save uint8 (N, H, W, 3) images"
        )
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size != expected:
        held = max(info.file_size - header, 0)
        raise EvaluationError(
            f"{path}: {IMAGES}'s header promises {shape} {dtype} ({expected - header} bytes) "
            f"but the member holds {held} bytes: the file is truncated or damaged; write it again"
        )
    if info.compress_type == zipfile.ZIP_STORED:
        end = _data_offset(path, info) + info.compress_size
        if end > os.path.getsize(path):
            raise EvaluationError(f"{path}: {IMAGES} runs past the end of the file (truncated)")
    return info, shape, dtype, header


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """The file offset of a member's first byte (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        signature, name_len, extra_len = ZIP_LOCAL_HEADER.unpack(f.read(ZIP_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise EvaluationError(f"{path}: {info.filename} has no zip local header (damaged file)")
    return info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len


def member_data(zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, header: int) -> BinaryIO:
    """A member's array data as a file positioned at its first byte. A stored (np.savez) member is
    read from the file itself, so seeking to a rank's share is free; a compressed one
    (np.savez_compressed) through the zip, where a seek decompresses everything before it."""
    if info.compress_type == zipfile.ZIP_STORED:
        f = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        f.seek(_data_offset(path, info) + header)
        return f
    f = zf.open(info)
    f.seek(header)
    return f


def read_rows(f: BinaryIO, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The next uint8 array of `shape` from a member's data; a short or undecodable read (a file
    damaged or cut while it is read) is one line."""
    size = int(np.prod(shape))
    try:
        data = bytearray(f.read(size))
    except READ_ERRORS as e:
        raise EvaluationError(
            f"{path}: {IMAGES} cannot be read ({_reason(e)}): the file is "
            "damaged; copy or write it again"
        ) from None
    if len(data) != size:
        raise EvaluationError(f"{path}: {IMAGES} ends {size - len(data)} bytes early (truncated)")
    return np.frombuffer(data, np.uint8).reshape(shape)


def member_crc_check(path: Path, info: zipfile.ZipInfo) -> Callable[[], None]:
    """A function that reads the whole member and raises one line unless its CRC-32 matches."""

    def check() -> None:  # returns no warning
        if info.compress_type == zipfile.ZIP_STORED:
            crc = 0
            with open(path, "rb") as f:
                f.seek(_data_offset(path, info))
                left = info.compress_size
                while left > 0:
                    block = f.read(min(CRC_BLOCK, left))
                    if not block:
                        break
                    crc, left = zlib.crc32(block, crc), left - len(block)
            if crc != info.CRC or left:
                raise EvaluationError(
                    f"{path}: {info.filename} fails its CRC-32 check (stored {info.CRC:08x}, "
                    f"read {crc:08x}): the file is damaged; copy or write it again"
                )
            return
        try:  # zipfile checks the CRC itself when a member is read to its end
            with zipfile.ZipFile(path) as zf, zf.open(info.filename) as f:
                while f.read(CRC_BLOCK):
                    pass
        except READ_ERRORS as e:
            raise EvaluationError(
                f"{path}: {info.filename} is damaged ({_reason(e)}); copy or write it again"
            ) from None

    return check


def load_arrays(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The members `keys` that the .npz holds, read whole (CRC-checked), never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys if k in data.files}
    except READ_ERRORS as e:
        if "allow_pickle" in str(e):
            raise EvaluationError(
                f"{path}: holds an object array (pickled Python objects), which evaluate never "
                "loads; save plain numeric arrays"
            ) from None
        raise EvaluationError(f"{path}: cannot read its arrays ({_reason(e)})") from None
