"""Image sources: the ImageNet train tree, class files, val labels (Kaggle csv and devkit)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    WNIDS,
)
from test_pipeline import (
    JOB_ARGS,
    job,
)

from latent_store import LatentStore, validate_store
from pipeline.encode import encode
from pipeline.imagenet import SourceError
from pipeline.source import open_source

# many shards and chunks for 22 images; batch composition is part of what makes runs identical
JOB_ARGS += ["--calibration-samples", "16", "--max-failures", "6", "--max-pixels", "500000"]


# One intra-op thread: on a busy 2-core machine two OpenMP threads make tiny convolutions ~50x
# slower, and the subprocesses below get the same setting so that every run computes alike.


# --- preprocessing ------------------------------------------------------------------------------


# --- sources ------------------------------------------------------------------------------------


def test_train_tree_lists_images_only(image_tree):
    source = open_source(image_tree)
    assert [c.id for c in source.classes] == list(WNIDS)
    keys = [source.key(i) for i in range(len(source))]
    assert keys == sorted(keys) and len(keys) == 22
    assert not any(Path(k).name in (".DS_Store", "README.txt") for k in keys)
    assert all(source.label(i) == WNIDS.index(k.split("/")[0]) for i, k in enumerate(keys))


def test_classes_file_fixes_the_label_order(image_tree, tmp_path):
    order = tmp_path / "classes.txt"
    order.write_text("\n".join(f"{w} name of {w}" for w in reversed(WNIDS)) + "\n")
    source = open_source(image_tree, classes=order)
    assert source.classes[0].id == WNIDS[-1] and source.classes[0].name == f"name of {WNIDS[-1]}"
    assert source.label(0) == len(WNIDS) - 1  # the first key is in WNIDS[0]
    order.write_text(WNIDS[0] + "\n")
    with pytest.raises(SourceError, match="not in"):
        open_source(image_tree, classes=order)


@pytest.fixture
def val_folder(image_tree, tmp_path) -> tuple[Path, list[str]]:
    """A flat val folder of 6 images, and the wnid of each (by ILSVRC2012 number)."""
    folder = tmp_path / "val"
    folder.mkdir()
    wnids = [WNIDS[i % 3] for i in (2, 0, 1, 1, 2, 0)]
    src = sorted(image_tree.glob("*/n*_0.JPEG"))
    for i, _ in enumerate(wnids, start=1):
        shutil.copy(src[i % len(src)], folder / f"ILSVRC2012_val_{i:08d}.JPEG")
    (folder / ".DS_Store").write_bytes(b"\x00")
    return folder, wnids


def test_val_labels_from_kaggle_csv(val_folder, tiny_vae_dir, tmp_path):
    folder, wnids = val_folder
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8" for i, w in enumerate(wnids, 1)]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))
    source = open_source(folder, val_labels=csv)
    assert len(source) == 6
    assert [source.classes[source.label(i)].id for i in range(6)] == wnids
    assert source.classes[1].name == f"class {WNIDS[1]}"
    out = tmp_path / "val.zarr"  # and through the encode job
    encode(job(folder, out, tiny_vae_dir, val_labels=csv))
    assert all(c.ok for c in validate_store(out))
    assert LatentStore(out).array("labels")[:].tolist() == list(source.labels)


def test_val_labels_from_devkit_ids_follow_meta_order(val_folder, tmp_path):
    folder, wnids = val_folder
    meta_order = [WNIDS[1], WNIDS[2], WNIDS[0]]  # the devkit's order is not the sorted one
    synsets = tmp_path / "devkit_synsets.txt"
    synsets.write_text("\n".join(meta_order) + "\n")
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{meta_order.index(w) + 1}\n" for w in wnids))
    source = open_source(folder, val_labels=truth, devkit_synsets=synsets)
    assert [c.id for c in source.classes] == sorted(WNIDS)
    assert [source.classes[source.label(i)].id for i in range(6)] == wnids
    with pytest.raises(SourceError, match="devkit-synsets"):
        open_source(folder, val_labels=truth)
    bad = tmp_path / "bad_truth.txt"
    bad.write_text("1\n<html>\n")
    with pytest.raises(SourceError, match="line 2 holds '<html>'"):
        open_source(folder, val_labels=bad, devkit_synsets=synsets)
    # or meta.mat beside the labels (scipy): leaves in ILSVRC2012_ID order; parents are skipped
    sio = pytest.importorskip("scipy.io")
    rows = [(i + 1, w, 0) for i, w in enumerate(meta_order)] + [(4, "n00001740", 2)]
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    sio.savemat(tmp_path / "meta.mat", {"synsets": np.array(rows[::-1], dtype=fields)})
    from_meta = open_source(folder, val_labels=truth)
    assert from_meta.labels == source.labels
