"""evaluate's damaged and hostile inputs: each refused in one line (exit 2, no traceback), both
inputs checked before any image is featurized."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from evaluation.errors import EvaluationError
from evaluation.evaluate import EvaluateConfig, evaluate

runner = CliRunner()


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def npy_bytes(shape: tuple[int, ...], data: bytes, dtype: str = "|u1") -> bytes:
    """A .npy member whose header says `shape` and whose data are `data` (maybe too short)."""
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def short_member(path: Path) -> Path:
    """arr_0's header promises 5 images of 8x8; the member holds 3."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", npy_bytes((5, 8, 8, 3), images(3, 8).tobytes()))
    return path


def flipped_byte(path: Path, compressed: bool = False) -> Path:
    """A byte of arr_0's data flipped in place (the zip directory and sizes untouched)."""
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images(12))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    at = info.header_offset + 200 + (info.compress_size // 2)
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def saved(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def truncated(path: Path) -> Path:
    """The first 3000 bytes of an .npz (its central directory lost)."""
    path.write_bytes(saved(path, arr_0=images(6)).read_bytes()[:3000])
    return path


def bad_header(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", b"\x93NUMPY garbage")
    return path


OBJECTS = np.array([{"a": 1}, None], dtype=object)
CASES = {
    "short member": (
        short_member,
        r"promises \(5, 8, 8, 3\) uint8 \(960 bytes\) but the member holds 576 bytes",
    ),
    "zero-size images": (lambda p: saved(p, arr_0=np.zeros((4, 0, 0, 3), np.uint8)), "empty"),
    "zero-width images": (lambda p: saved(p, arr_0=np.zeros((4, 8, 0, 3), np.uint8)), "empty"),
    "flipped byte": (flipped_byte, "fails its CRC-32 check"),
    "flipped byte, compressed": (lambda p: flipped_byte(p, True), "damaged|CRC"),
    "object images": (lambda p: saved(p, arr_0=OBJECTS), "object array"),
    "object stats": (lambda p: saved(p, mu=OBJECTS, sigma=OBJECTS), "object array"),
    "object reference stats": (
        lambda p: saved(
            p, arr_0=images(4), mu=OBJECTS, sigma=np.eye(2), mu_s=OBJECTS, sigma_s=np.eye(2)
        ),
        "object array",
    ),
    "text stats": (lambda p: saved(p, mu=np.array(["a", "b"]), sigma=np.eye(2)), "not numbers"),
    "mismatched stats": (lambda p: saved(p, mu=np.zeros(3), sigma=np.eye(2)), "not a mean"),
    "mismatched features": (
        lambda p: saved(p, mu=np.zeros(3), sigma=np.eye(3), pool_3=np.zeros((4, 2))),
        r"pool_3 is float64 \(4, 2\), not \(N, 3\) features",
    ),
    "truncated file": (truncated, "not a readable .npz"),
    "bad npy header": (bad_header, "no valid .npy header"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_damaged_inputs_are_one_line_as_samples_or_ref(tmp_path, tiny_inception, case):
    make, match = CASES[case]
    bad = make(tmp_path / "bad.npz")
    good = saved(tmp_path / "good.npz", arr_0=images(6))
    for samples, ref in [(bad, None), (good, bad)]:
        with pytest.raises(EvaluationError, match=match):
            evaluate(EvaluateConfig(samples=samples, ref=ref, inception=tiny_inception, workers=0))
        args = [str(samples), "--inception", str(tiny_inception)]
        r = runner.invoke(app, ["evaluate", *args, *(["--ref", str(ref)] if ref else [])])
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("case", ["short member", "object reference stats", "truncated file"])
def test_a_malformed_ref_is_refused_before_any_featurizing(
    tmp_path, tiny_inception, case, monkeypatch
):
    import evaluation.features

    def never(*a, **k):
        raise AssertionError("featurized before the inputs were checked")

    monkeypatch.setattr(evaluation.features, "extract_features", never)
    bad = CASES[case][0](tmp_path / "bad.npz")
    good = saved(tmp_path / "good.npz", arr_0=images(6))
    with pytest.raises(EvaluationError, match=CASES[case][1]):
        evaluate(EvaluateConfig(samples=good, ref=bad, inception=tiny_inception, workers=0))


def test_a_partial_read_says_its_crc_was_not_checked(tmp_path, tiny_inception):
    """With --limit only part of arr_0 is read: no CRC verdict, and the result says so."""
    bad = flipped_byte(tmp_path / "bad.npz")
    r = evaluate(EvaluateConfig(samples=bad, inception=tiny_inception, workers=0, limit=4))
    assert any("CRC-32 not checked (--limit reads 4 of 12 images)" in w for w in r["warnings"])
    intact = saved(tmp_path / "good.npz", arr_0=images(12))
    r = evaluate(EvaluateConfig(samples=intact, inception=tiny_inception, workers=0))
    assert not any("CRC" in w for w in r["warnings"])
