"""evaluate's results say how they were made: the settings of `latentdit sample`'s samples and the
reference's identity (its SHA-256; a published reference batch by name)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from evaluation import provenance
from sampler.config import SampleConfig, SolveConfig
from sampler.sample import sample
from testkit import make_checkpoint

runner = CliRunner()


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_vae_dir):
    """6 class-balanced samples (3 classes) of a tiny checkpoint at step 2: Heun, 3 steps,
    guidance 2.0 on 3 channels inside t in [0.1, 0.9], seed 7, as an .npz and PNGs."""
    root = tmp_path_factory.mktemp("provenance")
    make_checkpoint(root / "run", tiny_vae_dir)
    solve = SolveConfig(steps=3, cfg=2.0, cfg_interval=(0.1, 0.9), cfg_channels=3)
    sample(
        SampleConfig(
            checkpoint=str(root / "run"),
            out=str(root / "s"),
            fid_samples=6,
            npz=True,
            batch_size=3,
            seed=7,
            solve=solve,
        )
    )
    return root


def evaluate_json(*args) -> dict:
    r = runner.invoke(app, ["evaluate", *map(str, args), "--json", "--workers", "0"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_the_json_carries_the_sample_settings(sampled, tiny_inception):
    np.savez(sampled / "ref.npz", arr_0=images(6))
    npz = next((sampled / "s").glob("samples_*.npz"))
    for given in (sampled / "s", npz, sampled / "s" / "images"):
        out = evaluate_json(given, "--ref", sampled / "ref.npz", "--inception", tiny_inception)
        s = out["samples"]["settings"]
        assert s["run"] == str((sampled / "run").resolve()) and s["step"] == 2
        assert (s["ema"], s["solver"], s["steps"], s["model_calls"]) == (True, "heun", 3, 6)
        assert s["guidance"] == {"scale": 2.0, "interval": [0.1, 0.9], "channels": 3}
        assert (s["label_sampling"], s["precision"], s["seed"], s["count"]) == (
            "balanced",
            "fp32",
            7,
            6,
        )
        assert s["recorded"]["labels_blake2b"] and s["sample_json"].endswith("sample.json")
    r = runner.invoke(app, ["evaluate", str(npz), "--inception", str(tiny_inception)])
    assert "heun 3 steps / 6 calls, cfg 2.0 on 3 channels" in r.stdout
    assert (
        evaluate_json(sampled / "ref.npz", "--inception", tiny_inception)["samples"]["settings"]
        is None
    )  # not made by `latentdit sample`


def test_an_older_sample_json_gives_what_it_recorded(sampled, tiny_inception, tmp_path):
    """A manifest written before model_calls and label_sampling: calls from the solver's
    registry entry, label sampling unknown (null)."""
    old = tmp_path / "old"
    (old / "images").mkdir(parents=True)
    manifest = json.loads((sampled / "s" / "sample.json").read_text())
    for key in ("model_calls", "label_sampling"):
        manifest.pop(key)
    (old / "sample.json").write_text(json.dumps(manifest))
    for i, im in enumerate(images(4)):
        Image.fromarray(im).save(old / "images" / f"{i:06d}.png")
    s = evaluate_json(old, "--inception", tiny_inception)["samples"]["settings"]
    assert s["model_calls"] == 6 and s["label_sampling"] is None


def test_the_reference_is_identified_by_its_checksum(tmp_path, tiny_inception, monkeypatch):
    np.savez(tmp_path / "s.npz", arr_0=images(5))
    np.savez(tmp_path / "ref.npz", arr_0=images(5, seed=1))
    data = (tmp_path / "ref.npz").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    out = evaluate_json(
        tmp_path / "s.npz", "--ref", tmp_path / "ref.npz", "--inception", tiny_inception
    )
    assert out["ref"]["identity"] == {
        "file": "ref.npz",
        "bytes": len(data),
        "sha256": digest,
        "known_as": None,
    }
    known = {digest: {"bytes": len(data), "name": "a published reference batch", "source": "-"}}
    monkeypatch.setattr(provenance, "KNOWN_REFERENCES", known)
    out = evaluate_json(
        tmp_path / "s.npz", "--ref", tmp_path / "ref.npz", "--inception", tiny_inception
    )
    assert out["ref"]["identity"]["known_as"] == "a published reference batch"
    known[digest]["bytes"] += 1  # the same digest with another size is not that file
    assert provenance.reference_identity(tmp_path / "ref.npz")["known_as"] is None


def test_adms_reference_batch_is_known_by_its_published_checksum():
    adm = provenance.KNOWN_REFERENCES[
        "b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758"
    ]
    assert adm["bytes"] == 2_037_122_530 and "VIRTUAL_imagenet256_labeled.npz" in adm["name"]
