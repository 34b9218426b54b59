"""Webdataset and URL-list inputs: labels in tars, shard lists, URL list formats and bad lists."""

from __future__ import annotations

import os
import re
import tarfile

import pyarrow.parquet as pq
import pytest
from test_web import (
    jpeg,
    write_tar,
)
from typer.testing import CliRunner

from cli import app
from pipeline.download import (
    CLASS_FILE_NAME,
    DownloadConfig,
    DownloadError,
    read_url_list,
)
from pipeline.webdataset_source import (
    WebDatasetError,
    WebDatasetSource,
    open_webdataset,
    resolve_shards,
)


def test_cls_labels_and_an_image_cut_short_fail_at_read(tmp_path):
    tar = write_tar(
        tmp_path / "a.tar",
        [
            {"__key__": f"s{i}", "cls": str(i % 2).encode(), "jpg": jpeg((i, 0, 0))}
            for i in range(3)
        ],
    )
    with tarfile.open(tar) as tf:
        last = tf.getmember("s2.jpg")
    os.truncate(tar, last.offset_data + 5)  # .cls precedes .jpg: the label survives the cut
    source = WebDatasetSource(resolve_shards(tar), include_unfinished=True)
    assert len(source) == 3 and [source.label(i) for i in range(3)] == [0, 1, 0]
    assert source.read(1) == jpeg((1, 0, 0))
    with pytest.raises(OSError, match=r"cut inside s2\.jpg"):
        source.read(2)  # the encoder records this as the sample's failure


def test_shard_lists_brace_patterns_and_list_files(tmp_path):
    for n in range(3):
        write_tar(
            tmp_path / f"{n:05d}.tar", [{"__key__": "k", "cls": b"0", "jpg": jpeg((n, 0, 0))}]
        )
    assert resolve_shards(tmp_path) == [tmp_path / f"{n:05d}.tar" for n in range(3)]
    assert resolve_shards(f"{tmp_path}/{{00001..00002}}.tar") == [
        tmp_path / "00001.tar",
        tmp_path / "00002.tar",
    ]
    assert resolve_shards(f"{tmp_path}/00002.tar::{tmp_path}/{{00000..00001}}.tar") == [
        tmp_path / "00002.tar",
        tmp_path / "00000.tar",
        tmp_path / "00001.tar",
    ]
    listing = tmp_path / "tars.txt"
    listing.write_text("# my shards\n00002.tar\n\n00000.tar\n")
    assert resolve_shards(listing) == [tmp_path / "00002.tar", tmp_path / "00000.tar"]
    source = open_webdataset(listing, include_unfinished=True)
    assert [source.key(i) for i in range(2)] == ["00002.tar/k", "00000.tar/k"]


@pytest.mark.parametrize(
    ("listing", "match"),
    [
        ("http://example.com/00000.tar\n", "only local paths"),
        ("nope.tar\n", "do not exist"),
        ("00000.tar\n00000.tar\n", "twice"),
        ("# nothing\n", "names no tars"),
    ],
)
def test_bad_shard_lists(tmp_path, listing, match):
    write_tar(tmp_path / "00000.tar", [{"__key__": "k", "cls": b"0", "jpg": jpeg((0, 0, 0))}])
    (tmp_path / "tars.txt").write_text(listing)
    with pytest.raises(WebDatasetError, match=match):
        resolve_shards(tmp_path / "tars.txt")


def test_no_usable_sample_and_labels_outside_the_classes(tmp_path):
    write_tar(tmp_path / "00000.tar", [{"__key__": "k", "json": b"{}", "jpg": jpeg((0, 0, 0))}])
    with pytest.raises(WebDatasetError, match="no usable samples"):
        open_webdataset(tmp_path, include_unfinished=True)
    with pytest.raises(WebDatasetError, match="no usable samples"):
        open_webdataset(tmp_path)  # unfinished: skipped
    write_tar(tmp_path / "00000.tar", [{"__key__": "k", "cls": b"7", "jpg": jpeg((0, 0, 0))}])
    (tmp_path / CLASS_FILE_NAME).write_text("a\nb\n")
    with pytest.raises(WebDatasetError, match="label 7, outside the 2 classes"):
        open_webdataset(tmp_path, include_unfinished=True)


def test_url_lists_in_every_format(tmp_path):
    import pyarrow as pa

    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "a.tsv").write_text("url\tlabel\nhttp://x/1.jpg\tdog\nhttp://x/2.jpg\tcat\n")
    pq.write_table(pa.table({"u": ["http://x/1.jpg"], "y": [1]}), tmp_path / "b.parquet")
    cfg = DownloadConfig(url_list=tmp_path / "a.tsv", out=tmp_path / "o")
    from pipeline.imagenet import read_class_file

    table = read_url_list(cfg, read_class_file(tmp_path / "classes.txt"))
    assert table.to_pydict() == {"url": ["http://x/1.jpg", "http://x/2.jpg"], "label": [1, 0]}
    cfg = DownloadConfig(url_list=tmp_path / "b.parquet", out=tmp_path / "o", url_col="u")
    table = read_url_list(DownloadConfig(**{**cfg.__dict__, "label_col": "y"}), None)
    assert table.to_pydict() == {"url": ["http://x/1.jpg"], "label": [1]}
    with pytest.raises(DownloadError, match=r"must end in \.csv"):
        DownloadConfig(url_list=tmp_path / "a.txt", out=tmp_path / "o")


@pytest.mark.parametrize(
    ("csv", "extra", "match"),
    [
        ("link,label\nhttp://x/1.jpg,0\n", [], "no column 'url'.*--url-col"),
        ("url,label\nhttp://x/1.jpg,cat\n", [], "pass --classes FILE"),
        (
            "url,label\nhttp://x/1.jpg,cow\n",
            ["--classes", "CLASSES"],
            r"labels \['cow'\] that are not in",
        ),
        ("url,label\nhttp://x/1.jpg,5\n", ["--classes", "CLASSES"], "outside 0..1"),
        ("url,label\nhttp://x/1.jpg,\n", [], "empty in rows"),
        ("url,label\nhttp://x/1.jpg,0\n", ["--label-col", "url"], "both 'url'"),
    ],
)
def test_download_rejects_bad_url_lists(tmp_path, csv, extra, match):
    (tmp_path / "urls.csv").write_text(csv)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    extra = [str(tmp_path / "classes.txt") if a == "CLASSES" else a for a in extra]
    args = ["download", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "out"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    assert re.search(match, result.output), result.output
    assert not (tmp_path / "out").exists()
