"""Sources that are not regular files, symlink loops, duplicates, oversized files and a 16-bit
decompression bomb: listed or decoded within bounds by encode and evaluate, skipped and counted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, WNIDS, make_image_tree, smooth_image
from PIL import Image

from evaluation.evaluate import EvaluateConfig, evaluate
from foundation.files import FileRefusedError, list_regular_files, read_regular_file
from foundation.images import ImageDecodeError, decode_image, pixel_cost
from latent_store import LatentStore
from pipeline import preprocess as preprocess_module
from pipeline.preprocess import to_rgb
from pipeline.source import open_source
from testkit.hostile import png16_bomb

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENCODE = ["--image-size", "32", "--shard-size", "8", "--chunk-size", "4", "--batch-size", "4"]
ENCODE += ["--calibration-samples", "8", "--max-failures", "20", "--device", "cpu"]
BOMB_SIDE = 8960  # 80.3M pixels: under Pillow's 89.5M limit, 161 MB of 16-bit samples
# Peak RSS bound of a process that meets the bomb. Measured on the 2-core CPU VM: encode's main
# process 464 MB and its decode worker 352 MB; before bounded decoding 2208 and 2106 MB (the
# calibration decodes in the main process, the encode in the worker).
RSS_BOUND_MB = 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png16_bomb(BOMB_SIDE, BOMB_SIDE)


def jpeg(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    smooth_image(size, size + 4, seed).save(path, format="JPEG")


def hostile_tree(root: Path) -> dict[str, str]:
    """Three classes of 3 JPEGs each, and everything a lister must not follow or read twice.

    Returns the keys of the real images (each once) -> their class folder.
    """
    real = {}
    for c, wnid in enumerate(WNIDS):
        for j in range(3):
            jpeg(root / wnid / f"{wnid}_{j}.JPEG", seed=10 * c + j)
            real[f"{wnid}/{wnid}_{j}.JPEG"] = wnid
    a, b, c = (root / w for w in WNIDS)
    os.mkfifo(a / "pipe.JPEG")  # opening it blocks until a writer comes
    (a / "zero.JPEG").symlink_to("/dev/zero")  # reads forever
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(b / "sock.JPEG"))
    (a / "loop").symlink_to(".")  # a loop through one link
    (a / "up").symlink_to("..")  # ... and to the tree above
    (a / "to_b").symlink_to(f"../{WNIDS[1]}")  # a loop through two links
    (b / "to_a").symlink_to(f"../{WNIDS[0]}")
    (b / "dup.JPEG").symlink_to(f"{WNIDS[1]}_0.JPEG")  # the same file twice
    (c / "self.JPEG").symlink_to("self.JPEG")  # a link to itself
    (c / "gone.JPEG").symlink_to("nowhere.JPEG")
    outside = root.parent / "outside"  # a folder outside the tree, linked in, with a loop
    jpeg(outside / "extra.JPEG", seed=99)
    (outside / "back").symlink_to(outside)
    (c / "linked").symlink_to(outside)
    real[f"{WNIDS[2]}/linked/extra.JPEG"] = WNIDS[2]
    (root / "loop_top").symlink_to(".")  # a "class folder" that is the tree itself
    return dict(sorted(real.items()))


def test_the_lister_takes_each_regular_file_once_and_never_loops(tmp_path):
    real = hostile_tree(tmp_path / "train")
    started = time.monotonic()
    source = open_source(tmp_path / "train")
    assert time.monotonic() - started < 10
    keys = [source.key(i) for i in range(len(source))]
    assert keys == list(real)
    assert [source.classes[source.label(i)].id for i in range(len(source))] == list(real.values())
    d = source.describe()
    assert d["skipped_kinds"] == {
        "not a regular file": 3,  # the FIFO, the socket, the link to /dev/zero
        "symlink loop": 7,  # loop_top, loop, up, to_b, to_a, self.JPEG, outside/back
        "duplicate file": 1,
        "dangling symlink": 1,
    }, d
    assert d["skipped"] == 12
    reasons = "\n".join(d["skipped_first"])
    expected = [
        "pipe.JPEG: not a regular file (a FIFO)",
        "sock.JPEG: not a regular file (a socket)",
        "zero.JPEG: not a regular file (symlink to a character device)",
        f"{WNIDS[0]}/loop: symlink loop (-> ., a folder above it)",
        f"{WNIDS[0]}/to_b: symlink loop (-> ../{WNIDS[1]}, through links)",
        f"{WNIDS[2]}/linked/back: symlink loop",
        f"{WNIDS[1]}/dup.JPEG: duplicate file (same file as {WNIDS[1]}/{WNIDS[1]}_0.JPEG)",
    ]
    for line in expected:
        assert line in reasons, reasons


def test_a_link_to_a_folder_of_the_tree_is_no_loop_and_no_second_listing(tmp_path):
    root = tmp_path / "train"
    for j in range(2):
        jpeg(root / "a" / "sub" / f"{j}.png", seed=j)
    (root / "a" / "again").symlink_to("sub")
    (root / "b").mkdir()
    (root / "b" / "from_a").symlink_to("../a/sub")
    listing = list_regular_files(root, [root / "a", root / "b"], keep=lambda n: True)
    assert [p.name for p in listing.files[root / "a"]] == ["0.png", "1.png"]
    assert listing.files[root / "b"] == []
    assert listing.counts() == {"folder listed elsewhere": 2}


def test_reads_refuse_what_is_not_a_regular_file_or_too_large(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    started = time.monotonic()
    with pytest.raises(FileRefusedError, match=r"not a regular file \(a FIFO\)"):
        read_regular_file(tmp_path / "pipe", max_bytes=100)  # never blocks
    with pytest.raises(FileRefusedError, match="character device"):
        read_regular_file("/dev/zero", max_bytes=100)
    assert time.monotonic() - started < 5
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(FileRefusedError, match="file too large"):
        read_regular_file(tmp_path / "big", max_bytes=100)
    assert read_regular_file(tmp_path / "big", max_bytes=101) == b"x" * 101


def test_pixel_budget_weighs_bit_depth_and_bands():
    assert pixel_cost((100, 10), "RGB") == pixel_cost((100, 10), "L") == 1000
    assert pixel_cost((100, 10), "I;16") == 2000 and pixel_cost((100, 10), "F") == 4000
    assert pixel_cost((100, 10), "RGBA") == 1333
    # the bomb is refused from its header: no pixel is decoded
    small = png16_bomb(200, 100)
    with pytest.raises(ImageDecodeError, match=r"decompression bomb: 200x100 = 20000 pixels "
                       r"\(weighted for I;16: 40000\), over the limit of 30000"):  # fmt: skip
        decode_image(small, max_pixels=30000)
    assert decode_image(small, max_pixels=40000).mode == "I;16"


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_samples_convert_in_bands_exactly_as_at_once(mode, monkeypatch):
    """The banded 8-bit conversion equals the whole-image formulas it replaced."""
    rng = np.random.default_rng(1)
    if mode == "F":
        values = rng.normal(3, 50, (37, 29)).astype(np.float32)
        img = Image.fromarray(values, mode="F")
        lo, hi = float(values.astype(np.float64).min()), float(values.astype(np.float64).max())
        whole = np.round((values.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255)
    else:
        top = 65535 if mode == "I;16" else 90000
        values = rng.integers(-5000 if mode == "I" else 0, top, (37, 29))
        img = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
        assert img.mode == mode
        wide = values.astype(np.int64).clip(0, 65535)
        whole = (wide * 255 + 65535 // 2) // 65535
    monkeypatch.setattr(preprocess_module, "ROWS_PER_BAND", 29 * 5)  # 8 bands, the last short
    got = np.asarray(to_rgb(img))
    assert np.array_equal(got, np.repeat(whole.astype(np.uint8)[..., None], 3, axis=2))


def peak_rss(done: subprocess.CompletedProcess) -> tuple[int, int]:
    line = [s for s in done.stderr.splitlines() if s.startswith("PEAK_RSS_MB")][-1]
    return int(line.split()[1]), int(line.split()[2])


def test_encode_skips_the_bomb_specials_and_big_files_within_memory(tmp_path, tiny_vae_dir, bomb):
    tree = tmp_path / "train"
    real = hostile_tree(tree)
    (tree / WNIDS[0] / "bomb16.png").write_bytes(bomb)
    big = tree / WNIDS[1] / "noise.png"  # a real image over the size cap below
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > 0.5 * 2**20 > len(bomb)
    out = tmp_path / "s.zarr"
    command = [sys.executable, ROOT / "tests/jobs/peak_rss.py", "encode", tree, "--out", out]
    command += ["--vae", tiny_vae_dir, *ENCODE, "--workers", "1", "--max-file-mb", "0.5"]
    done = subprocess.run([str(a) for a in command], env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert max(peak_rss(done)) < RSS_BOUND_MB, peak_rss(done)
    store = LatentStore(out)
    failures = {f.key: f.reason for r in store.records() if r for f in r.failures}
    assert failures[f"{WNIDS[0]}/bomb16.png"].startswith("decompression bomb: 8960x8960")
    assert failures[f"{WNIDS[1]}/noise.png"].startswith("file too large")
    group_attrs = json.loads((out / "zarr.json").read_text())["attributes"]["latentdit"]
    source = group_attrs["source"]
    assert source["num_images"] == len(real) + 2 and source["skipped"] >= 12
    assert "source paths skipped" in done.stdout


def test_evaluate_skips_and_counts_what_it_cannot_decode(tmp_path, tiny_inception, bomb):
    folder = tmp_path / "folder"
    for i in range(5):
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "bomb.png").write_bytes(bomb)
    (folder / "broken.png").write_bytes(b"not a png")
    os.mkfifo(folder / "pipe.png")
    cfg = EvaluateConfig(samples=str(folder), inception=tiny_inception, workers=0)
    r = evaluate(cfg)
    assert r["samples"]["count"] == 5 and r["samples"]["skipped"] == 3


def test_evaluate_meets_the_bomb_within_memory(tmp_path, tiny_inception, bomb):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "bomb.png").write_bytes(bomb)
    command = [sys.executable, ROOT / "tests/jobs/peak_rss.py", "evaluate", folder, "--json"]
    command += ["--inception", tiny_inception, "--workers", "1", "--device", "cpu"]
    done = subprocess.run([str(a) for a in command], env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert max(peak_rss(done)) < RSS_BOUND_MB, peak_rss(done)
    assert "skipping" in done.stderr and "decompression bomb" in done.stderr
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["samples"]["count"] == 4 and result["samples"]["skipped"] == 1


def test_a_tree_of_the_usual_files_still_lists_as_before(tmp_path):
    make_image_tree(tmp_path / "train")
    source = open_source(tmp_path / "train")
    assert len(source) == 22 and "skipped" not in source.describe()


def test_webdataset_skips_a_fifo_tar_and_refuses_a_member_over_the_cap(tmp_path):
    import webdataset as wds

    from pipeline.webdataset_source import open_webdataset

    shards = tmp_path / "shards"
    shards.mkdir()
    small, big = b"x" * 100, b"y" * 5000
    with wds.TarWriter(str(shards / "00000.tar")) as w:
        w.write({"__key__": "a", "jpg": small, "cls": b"0"})
        w.write({"__key__": "b", "jpg": big, "cls": b"1"})
    os.mkfifo(shards / "00001.tar")  # indexing it would block forever
    started = time.monotonic()
    source = open_webdataset(shards, include_unfinished=True, max_file_bytes=1000)
    assert time.monotonic() - started < 10
    assert [source.key(i) for i in range(len(source))] == ["00000.tar/a", "00000.tar/b"]
    assert [s.key for s in source.skipped] == ["00001.tar"]
    assert "not a regular file" in source.skipped[0].reason
    assert source.read(0) == small
    with pytest.raises(FileRefusedError, match="member too large"):
        source.read(1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["encode", "src", "--out", "s.zarr", "--max-file-mb", "0"], "--max-file-mb must be > 0"),
        (["evaluate", "x.npz", "--max-file-mb", "-1"], "--max-file-mb must be > 0"),
        (["evaluate", "x.npz", "--max-pixels", "0"], "max-pixels"),
    ],
)
def test_bad_limits_are_one_line_errors(args, match):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and match in result.output, result.output
    assert "Traceback" not in result.output
