"""Stage 1 from the web: the real img2dataset against a local HTTP server, then the tar source."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from cli import app
from pipeline.download import (
    CLASS_FILE_NAME,
    DownloadConfig,
    summarize_shards,
)
from pipeline.webdataset_source import (
    is_webdataset_path,
    open_webdataset,
)

CLASSES = ("cat", "dog", "fish")
MISSING = ("missing1.jpg", "missing2.jpg")  # the server answers 404
PER_SHARD = 4


@pytest.fixture(scope="module")
def url_list(image_server, tmp_path_factory) -> dict:
    """A csv of every served file plus two 404s, labeled by class id, and its class file."""
    base, folder = image_server
    work = tmp_path_factory.mktemp("urls")
    names = sorted(p.name for p in folder.iterdir()) + list(MISSING)
    rows = {f"{base}/{n}": (n, i % len(CLASSES)) for i, n in enumerate(names)}
    csv = work / "urls.csv"
    csv.write_text(
        "image_url,synset\n" + "".join(f"{u},{CLASSES[y]}\n" for u, (_, y) in rows.items())
    )
    classes = work / "classes.txt"
    classes.write_text("".join(f"{c} the {c}s\n" for c in CLASSES))
    return {"csv": csv, "classes": classes, "rows": rows, "folder": folder}


@pytest.fixture(scope="module")
def shards(url_list, tmp_path_factory) -> Path:
    """The real img2dataset run through `latentdit download` (one process, few threads)."""
    out = tmp_path_factory.mktemp("dl") / "shards"
    args = ["download", str(url_list["csv"]), "--out", str(out), "--url-col", "image_url"]
    args += ["--label-col", "synset", "--classes", str(url_list["classes"]), "--threads", "4"]
    args += ["--number-sample-per-shard", str(PER_SHARD), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout: the summary, nothing else
    assert summary["successes"] == len(url_list["rows"]) - 3
    return out


def downloaded_rows(shard_dir: Path) -> list[dict]:
    """img2dataset's own per-sample records (one parquet per shard): url, key, status, label."""
    return [r for p in sorted(shard_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def tar_samples(shard_dir: Path) -> dict[str, dict]:
    """key -> {"jpg": bytes, "json": dict}, read straight from the tars with tarfile."""
    samples: dict[str, dict] = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


def test_download_accounts_for_every_url(shards, url_list):
    rows = downloaded_rows(shards)
    assert sorted(r["url"] for r in rows) == sorted(url_list["rows"])  # every URL, once
    by_name = {url_list["rows"][r["url"]][0]: r for r in rows}
    failed = {n for n, r in by_name.items() if r["status"] != "success"}
    assert failed == {"not_an_image.jpg", *MISSING}
    assert "404" in by_name["missing1.jpg"]["error_message"]
    assert by_name["not_an_image.jpg"]["status"] == "failed_to_resize"

    samples = tar_samples(shards)
    ok = [r for r in rows if r["status"] == "success"]
    assert sorted(samples) == sorted(r["key"] for r in ok)  # every success is in a tar
    for r in ok:
        assert samples[r["key"]]["json"]["label"] == url_list["rows"][r["url"]][1]
    folder = url_list["folder"]
    image = {name: samples[by_name[name]["key"]]["jpg"] for name in by_name if name not in failed}
    assert image["rgb3.jpg"] == (folder / "rgb3.jpg").read_bytes()  # JFIF JPEG: kept as is
    # skip_reencode keeps only what imghdr calls "jpeg" (JFIF/Exif headers): an Adobe CMYK JPEG,
    # a PNG and an RGBA PNG are re-encoded as JPEG by img2dataset (see docs/web.md, --no-reencode)
    for name in ("cmyk.jpg", "png_named.jpg", "rgba.png"):
        assert image[name] != (folder / name).read_bytes() and image[name][:3] == b"\xff\xd8\xff"

    summary = summarize_shards(shards)
    assert summary.shards == 4 and not summary.unfinished
    assert (summary.count, summary.successes) == (len(url_list["rows"]), len(ok))
    assert (summary.failed_to_download, summary.failed_to_resize) == (2, 1)
    assert sum(summary.reasons.values()) == summary.failures
    assert summary.reasons["HTTP Error 404: File not found"] == 2
    assert (shards / CLASS_FILE_NAME).read_text().split()[::3] == list(CLASSES)


@pytest.mark.parametrize("reencode", [True, False])
def test_reencode_option_reaches_img2dataset(image_server, tmp_path, reencode):
    """img2dataset's own resizer, built with the options `download` passes: --no-reencode keeps
    every file byte for byte, the default keeps JFIF JPEGs and re-encodes the rest."""
    from img2dataset.resizer import Resizer

    from pipeline.download import img2dataset_options

    cfg = DownloadConfig(url_list=tmp_path / "u.csv", out=tmp_path / "o", reencode=reencode)
    opts = img2dataset_options(cfg, tmp_path / "u.parquet")
    keys = ("resize_mode", "skip_reencode", "disable_all_reencoding")
    resizer = Resizer(image_size=256, resize_only_if_bigger=False, **{k: opts[k] for k in keys})
    folder = image_server[1]
    for name in ("rgb0.jpg", "cmyk.jpg", "rgba.png", "not_an_image.jpg"):
        original = (folder / name).read_bytes()
        stored, *_, error = resizer(io.BytesIO(original))
        if not reencode or name == "rgb0.jpg":
            assert (stored, error) == (original, None)
        elif name == "not_an_image.jpg":
            assert (stored, error) == (None, "Image decoding error")
        else:
            assert stored != original and stored[:3] == b"\xff\xd8\xff"


def test_source_lists_every_download_with_its_label(shards, url_list):
    source = open_webdataset(shards)
    ok = {r["key"]: r for r in downloaded_rows(shards) if r["status"] == "success"}
    assert len(source) == len(ok) and not source.skipped
    assert [c.id for c in source.classes] == list(CLASSES)  # classes.txt from the download
    samples = tar_samples(shards)
    for i in range(len(source)):
        tar, key = source.key(i).split("/")
        assert tar.endswith(".tar") and key in ok
        assert source.label(i) == url_list["rows"][ok[key]["url"]][1]
        assert source.read(i) == samples[key]["jpg"]
    keys = [source.key(i) for i in range(len(source))]
    assert keys == sorted(keys, key=lambda k: k.split("/")[0])  # tars in sorted order
    d = source.describe()
    assert d["kind"] == "webdataset" and d["num_images"] == len(source)
    assert d["fingerprint"] == open_webdataset(shards).describe()["fingerprint"]
    assert is_webdataset_path(shards)
    copy = pickle.loads(pickle.dumps(source))  # what a spawned DataLoader worker gets
    assert copy.read(len(source) - 1) == source.read(len(source) - 1)


def test_shard_without_stats_is_skipped_with_a_message(shards, tmp_path, caplog):
    copy = shutil.copytree(shards, tmp_path / "shards")
    (copy / "00001_stats.json").unlink()
    full = len(open_webdataset(shards))
    with caplog.at_level(logging.WARNING, logger="pipeline.webdataset_source"):
        source = open_webdataset(copy)
    assert not any(source.key(i).startswith("00001.tar/") for i in range(len(source)))
    assert len(source) == full - 4
    assert "00001.tar" in caplog.text and "--include-unfinished" in caplog.text
    assert source.skipped[0].key == "00001.tar"
    assert len(open_webdataset(copy, include_unfinished=True)) == full
    summary = summarize_shards(copy)  # what `download` reports (exit 1) after an interruption
    assert summary.unfinished == ("00001.tar",) and summary.shards == 3
    assert summary.count == len(downloaded_rows(shards)) - PER_SHARD
    assert "run the same command again" in summary.format()


def test_truncated_tar_keeps_the_samples_before_the_cut(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "shards")
    tar = copy / "00000.tar"
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    third_image = [m for m in members if m.name.endswith(".jpg")][2]
    os.truncate(tar, third_image.offset_data + 10)  # cut inside the third sample's image
    source = open_webdataset(copy)  # never raises
    kept = [source.key(i) for i in range(len(source)) if source.key(i).startswith("00000.tar/")]
    assert [k.split("/")[1] for k in kept] == [m.name[:-4] for m in members[:4:2]]
    full = open_webdataset(shards)
    lost = sum(full.key(i).startswith("00000.tar/") for i in range(len(full))) - 2
    assert lost > 0 and len(source) == len(full) - lost
    reasons = " ".join(f"{s.key}: {s.reason}" for s in source.skipped)
    assert "unexpected end of data" in reasons and third_image.name[:-4] in reasons
    for i in range(len(source)):
        source.read(i)

    os.truncate(tar, 100)  # cut inside the first header: nothing usable in this tar
    source = open_webdataset(copy)
    assert not any(source.key(i).startswith("00000.tar/") for i in range(len(source)))
    assert source.skipped[0].key == "00000.tar"


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar written with webdataset's own TarWriter (members in sorted key order)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def jpeg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "JPEG")
    return buf.getvalue()


ENCODE_ARGS = ["--image-size", "32", "--shard-size", "4", "--chunk-size", "2", "--batch-size", "4"]
ENCODE_ARGS += ["--device", "cpu", "--max-failures", "0"]


def encode_cli(source, out: Path, vae: Path, *extra: str):
    return CliRunner().invoke(
        app, ["encode", str(source), "--out", str(out), "--vae", str(vae), *ENCODE_ARGS, *extra]
    )


@pytest.fixture(scope="module")
def store(shards, tiny_vae_dir, tmp_path_factory) -> Path:
    """`latentdit encode` on the downloaded shards, decoding in the main process."""
    out = tmp_path_factory.mktemp("enc") / "store.zarr"
    result = encode_cli(shards, out, tiny_vae_dir, "--workers", "0")
    assert result.exit_code == 0, result.output
    return out


def test_download_encode_validate(store, shards, url_list):
    """The three commands of docs/web.md: every successful download ends in the store, labeled."""
    from latent_store import LABEL_FILL, open_store

    result = CliRunner().invoke(app, ["validate", str(store)])
    assert result.exit_code == 0, result.output
    opened = open_store(store)
    keys = opened.array("keys")[:].tolist()
    labels = opened.array("labels")[:].tolist()
    ok = [r for r in downloaded_rows(shards) if r["status"] == "success"]
    stored = {k.split("/")[1]: y for k, y in zip(keys, labels, strict=True)}
    assert stored == {r["key"]: url_list["rows"][r["url"]][1] for r in ok}
    assert LABEL_FILL not in labels
    source = opened.spec.source
    assert source["kind"] == "webdataset" and source["num_images"] == len(ok)
    lost = source["download"]  # the URLs that never reached a tar are accounted for too
    assert lost["successes"] == len(ok) and lost["count"] == len(url_list["rows"])
    assert lost["reasons"] == {"HTTP Error 404: File not found": 2, "Image decoding error": 1}
    assert [c.id for c in opened.spec.classes] == list(CLASSES)


def test_ranks_share_the_indexing_and_see_one_source(shards, tmp_path):
    """Under torchrun each rank indexes every other tar and they exchange the results: both end
    with the one-process source, skipped samples (a tar cut short on rank 1's side) included."""
    cut = shutil.copytree(shards, tmp_path / "cut")
    os.truncate(cut / "00001.tar", (cut / "00001.tar").stat().st_size // 2)
    (cut / "00003_stats.json").unlink()
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*run, str(ROOT / "tests/jobs/index_tars_job.py"), str(cut), str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    source = open_webdataset(cut)
    expected = {
        **source.describe(),
        "samples": [[source.key(i), source.label(i)] for i in range(len(source))],
    }
    assert any(s.key.startswith("00001.tar") for s in source.skipped)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_resume_and_a_changed_source(store, shards, tiny_vae_dir, tmp_path):
    """Re-running encode resumes (nothing left to do); a resume against tars that changed (one
    cut short) is refused; the recorded source reopens to the same list."""
    from latent_store import open_store
    from pipeline.source import reopen_source

    out = shutil.copytree(store, tmp_path / "store.zarr")
    assert encode_cli(shards, out, tiny_vae_dir, "--workers", "0").exit_code == 0
    cut = shutil.copytree(shards, tmp_path / "cut")
    os.truncate(cut / "00002.tar", (cut / "00002.tar").stat().st_size // 2)
    result = encode_cli(cut, out, tiny_vae_dir, "--workers", "0")
    assert result.exit_code == 2 and "another configuration" in result.output, result.output

    recorded = open_store(out).spec.source
    assert reopen_source(recorded).describe() == dict(recorded)
