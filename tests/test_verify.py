"""Readers verify what they read: a table of corruptions, each applied to a fresh copy of a store
written by the real writer. `validate` fails naming it; train (memory, gpu and stream modes), the
decode check and `inspect` refuse it with one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from conftest import TINY_DIT, write_store

from latent_store import LatentditError, LatentStore, StoreCorruptError, validate_store
from latent_store.summary import describe_store
from pipeline.decode_check import DecodeCheckConfig, decode_check
from trainer.config import resolve_config
from trainer.data import ArrayBatches, BatchLayout
from trainer.normalization import normalization_from_store
from trainer.train import train

LATENTS = "latents/c/1/0/0/0/0"  # shard 1 of the latents (16 samples: 4 chunks + the index)
LABELS = "labels/c/1"
RECORD = "shard_records/c/1"


def _flip(path: Path, offset: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _edit_attrs(store: Path, edit) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    edit(meta["attributes"]["latentdit"])
    (store / "zarr.json").write_text(json.dumps(meta))


def _replace_attrs(store: Path, value) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["latentdit"] = value
    (store / "zarr.json").write_text(json.dumps(meta))


def _edit_array(store: Path, name: str, edit) -> None:
    arr = zarr.open_group(str(store), mode="r+")[name]
    values = arr[:].astype(object) if name in ("keys", "shard_records") else arr[:]
    edit(values)
    arr[:] = values.astype(str) if values.dtype == object else values


def _edit_record(store: Path, shard: int, **changes) -> None:
    def edit(records):
        records[shard] = json.dumps({**json.loads(records[shard]), **changes}, sort_keys=True)

    _edit_array(store, "shard_records", edit)


def _set(values, index, value) -> None:
    values[index] = value


def _latents(attrs: dict) -> dict:
    """The latents' declaration: its entry in "arrays" (format v2), else the attributes (v1)."""
    return attrs["arrays"][0] if "arrays" in attrs else attrs


def _scale(store: Path, section: str, key: str, factor: float = 1.1) -> None:
    _edit_attrs(
        store, lambda a: _set(_latents(a)[section][key], 0, _latents(a)[section][key][0] * factor)
    )


def _malform(attrs: dict) -> None:
    attrs.update(**{"arrays" if "arrays" in attrs else "quant": 5})


SEALED_QUANT = "sealed at encoding: (quant|arrays)"  # v1 seals the latents' fields, v2 "arrays"


# name: (corruption, what validate reports, what the readers' one line says, inspect sees it)
CORRUPTIONS = {
    "latents shard deleted": (lambda s: (s / LATENTS).unlink(), "shard 1: data file missing", None, False),
    "latents shard truncated": (lambda s: _cut(s / LATENTS, 2000), "shard 1: unreadable", None, False),
    "latents shard empty": (lambda s: _cut(s / LATENTS, 0), "shard 1: checksum mismatch", None, False),
    "latents bytes flipped": (lambda s: _flip(s / LATENTS, 100), "shard 1: checksum mismatch", None, False),
    "latents index flipped": (lambda s: _flip(s / LATENTS, 4164 - 30), "shard 1: unreadable", None, False),
    "labels shard deleted": (lambda s: (s / LABELS).unlink(), "shard 1: data file missing", None, True),
    "labels shard truncated": (lambda s: _cut(s / LABELS, 10), "shard 1: unreadable", None, True),
    "labels bytes flipped": (lambda s: _flip(s / LABELS, 4, 2), "shard 1: checksum mismatch", None, True),
    "record deleted": (lambda s: (s / RECORD).unlink(), r"no completion marker for shards 1", r"not complete \(shards 1\)", False),
    "record torn": (lambda s: _cut(s / RECORD, 50), r"no completion marker for shards 1", r"not complete \(shards 1\)", False),
    "record bounds edited": (lambda s: _edit_record(s, 1, stop=28), r"shard 1: its record describes .* \[16, 32\)", "shard records", True),
    "record failures edited": (lambda s: _edit_record(s, 0, failures=[]), "shard 0: 1 samples hold the fill value", "shard records", True),
    "checksum edited": (lambda s: _edit_record(s, 1, checksum="xxh3-128:" + "0" * 32), "shard 1: checksum mismatch", None, False),
    "labels swapped": (lambda s: _edit_array(s, "labels", lambda v: _set(v, slice(16, 18), v[16:18][::-1].copy())), "shard 1: checksum mismatch", None, False),
    "label set to -7": (lambda s: _edit_array(s, "labels", lambda v: _set(v, 17, -7)), "first -7 at sample 17", "shard 1: checksum mismatch", True),
    "label set to num_classes": (lambda s: _edit_array(s, "labels", lambda v: _set(v, 17, 3)), "first 3 at sample 17", "shard 1: checksum mismatch", True),
    "quantization offset edited": (lambda s: _scale(s, "quant", "offset"), SEALED_QUANT, None, True),
    "quantization scale edited": (lambda s: _scale(s, "quant", "scale"), SEALED_QUANT, None, True),
    "vae scaling_factor edited": (lambda s: _edit_attrs(s, lambda a: a["vae"].update(scaling_factor=0.18215)), "sealed at encoding: vae", None, True),
    "vae id edited": (lambda s: _edit_attrs(s, lambda a: a["vae"].update(id="other/vae")), "sealed at encoding: vae", None, True),
    "image size edited": (lambda s: _edit_attrs(s, lambda a: a.update(image_size=512)), "sealed at encoding: image_size", None, True),
    "crop edited": (lambda s: _edit_attrs(s, lambda a: a.update(crop="random")), "sealed at encoding: crop", None, True),
    "posterior edited": (lambda s: _edit_attrs(s, lambda a: a.update(posterior="sample")), "sealed at encoding: posterior", None, True),
    "class list edited": (lambda s: _edit_attrs(s, lambda a: a["classes"][0].update(id="n99999999")), "sealed at encoding: classes", None, True),
    "sample count edited": (lambda s: _edit_attrs(s, lambda a: a.update(num_samples=36)), "num_samples", None, True),
    "summary edited": (lambda s: _edit_attrs(s, lambda a: a["summary"].update(channel_std=[9.0] * 4)), "summary .* does not match the shard records", None, True),
    "seal removed": (lambda s: _edit_attrs(s, lambda a: a.pop("provenance")), "no sealed provenance", None, True),
    "keys removed": (lambda s: shutil.rmtree(s / "keys"), "array 'keys' is missing", None, True),
    "key emptied": (lambda s: _edit_array(s, "keys", lambda v: _set(v, 3, "")), "sealed at encoding: keys", None, True),
    "keys duplicated": (lambda s: _edit_array(s, "keys", lambda v: _set(v, 3, v[2])), "sealed at encoding: keys", None, True),
    "group zarr.json truncated": (lambda s: _cut(s / "zarr.json", 700), r"zarr.json \(the store's metadata\) is malformed", None, True),
    "group zarr.json empty": (lambda s: _cut(s / "zarr.json", 0), r"zarr.json \(the store's metadata\) is malformed", None, True),
    "attributes not a table": (lambda s: _replace_attrs(s, [1, 2]), "attribute 'latentdit' is malformed", None, True),
    "attributes malformed": (lambda s: _edit_attrs(s, _malform), "store metadata is malformed", None, True),
    "latents zarr.json truncated": (lambda s: _cut(s / "latents/zarr.json", 300), "latents/zarr.json is malformed", None, True),
    "labels array removed": (lambda s: shutil.rmtree(s / "labels"), "array 'labels' is missing", None, True),
}  # fmt: skip


@pytest.fixture(scope="module", params=[2, 1], ids=["v2", "v1"])
def pristine(tmp_path_factory, request) -> Path:
    """40 samples in 3 shards of 16 (sample 5 a recorded failure), 3 classes; in today's format
    and in format v1 (as stores written before arrays were declared are)."""
    folder = tmp_path_factory.mktemp("pristine")
    return write_store(folder / "s.zarr", n=40, failures=(5,), format_version=request.param)


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupted(request, pristine, tmp_path) -> tuple[Path, str, str, bool]:
    corrupt, validate_match, reader_match, inspected = CORRUPTIONS[request.param]
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    corrupt(store)
    return store, validate_match, reader_match or validate_match, inspected


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def _train(store: Path, run: Path, data: str, **kw):
    options = {"store": str(store), "run": str(run), **TINY_DIT, "steps": 2, "batch_size": 8}
    return train(resolve_config(None, {**options, "warmup_steps": 0, "data": data, **kw}))


def test_validate_names_each_corruption(corrupted):
    store, match, _, _ = corrupted
    try:
        checks = validate_store(store)
    except LatentditError as e:  # metadata that cannot be opened: one line, not a report
        assert "\n" not in str(e)
        assert re.search(match, str(e)), str(e)
        return
    failed = "; ".join(c.message for c in checks if not c.ok)
    assert failed and re.search(match, failed), failed


@pytest.mark.parametrize("data", ["memory", "stream"])
def test_train_refuses_each_corruption(corrupted, tmp_path, data):
    store, _, match, _ = corrupted
    with pytest.raises(LatentditError, match=match) as e:
        _train(store, tmp_path / "run", data)
    assert "latentdit validate" in _one_line(e) or "encode" in str(e.value)


def test_gpu_mode_loader_refuses_each_corruption(corrupted):
    """--data gpu loads through the same verified reader before moving the codes to the GPU."""
    store, _, match, _ = corrupted
    with pytest.raises(LatentditError, match=match):
        opened = LatentStore(store)
        norm = normalization_from_store(opened, "vae_scaling")
        layout = BatchLayout(batch_size=8, grad_accum=1, rank=0, world_size=1)
        ArrayBatches(opened, norm, layout, seed=0, device=torch.device("cpu"), on_device=True)


def test_decode_check_refuses_each_corruption(corrupted):
    """Refused before any VAE or source image is touched (this store has neither)."""
    store, _, match, _ = corrupted
    with pytest.raises(LatentditError, match=match) as e:
        decode_check(store, DecodeCheckConfig(samples=4))
    _one_line(e)


def test_inspect_refuses_what_it_reads(corrupted):
    """inspect reads metadata, records and labels (not the latents: validate checks those)."""
    store, _, _, inspected = corrupted
    if not inspected:
        describe_store(store)  # latents-only damage: described, and left to validate and readers
        return
    with pytest.raises(LatentditError) as e:
        describe_store(store)
    _one_line(e)


def test_a_pristine_store_passes_everywhere(pristine, tmp_path):
    assert all(c.ok for c in validate_store(pristine))
    assert describe_store(pristine)["samples_written"] == 39
    for data in ("memory", "stream"):
        assert _train(pristine, tmp_path / data, data).steps == 2


def test_no_verify_trains_on_what_it_is_given(pristine, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    CORRUPTIONS["checksum edited"][0](store)
    with pytest.raises(StoreCorruptError, match="checksum mismatch"):
        _train(store, tmp_path / "checked", "memory")
    assert _train(store, tmp_path / "unchecked", "memory", verify=False).steps == 2


def test_stream_mode_verifies_each_shard_as_it_arrives(pristine, tmp_path):
    """A shard damaged after training started is refused when the stream reaches it."""
    from latent_store.reader import iter_shards

    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    shards = iter_shards(store, seed=0)
    first = next(shards)  # the seal and the first shard pass
    assert len(first) > 0
    for shard in range(3):  # damage every shard: whichever comes next is refused
        _flip(store / f"latents/c/{shard}/0/0/0/0", 100)
    with pytest.raises(StoreCorruptError, match=r"shard \d: checksum mismatch"):
        list(shards)


def test_seal_covers_what_the_codes_mean(pristine):
    attrs = LatentStore(pristine).attrs
    fields = attrs["provenance"]["fields"]
    declaration = {"arrays"} if "arrays" in attrs else {"quant", "latent_shape"}  # v2, v1
    assert {"vae", "image_size", "crop", "posterior", "variants", "classes"} <= set(fields)
    assert {"num_samples", "keys", *declaration} <= set(fields)
    assert attrs["provenance"]["digest"].startswith("blake2b-128:")
