"""evaluation across torchrun ranks: shares of every input kind, `evaluate` and `train --eval-every`
on 2 gloo ranks against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, write_store
from PIL import Image

from evaluation.evaluate import EvaluateConfig, evaluate
from evaluation.inputs import open_input, rebatch
from evaluation.training import fid_hook
from trainer.checkpoint import load_for_inference

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_folder(root, imgs):
    for i, im in enumerate(imgs):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


def torchrun(*args, timeout=240) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, str(ROOT / "cli.py"), "--", *map(str, args)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_vae_dir):
    """13 images of each kind (the store: 20 samples in shards of 8, limited to 13)."""
    root = tmp_path_factory.mktemp("inputs")
    imgs = images(13)
    np.savez(root / "stored.npz", arr_0=imgs)
    np.savez_compressed(root / "compressed.npz", arr_0=imgs)
    write_folder(root / "folder", imgs)
    write_store(root / "s.zarr", n=20, size=4, shard=8)
    return root


@pytest.mark.parametrize("name", ["stored.npz", "compressed.npz", "folder", "s.zarr"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_shares_of_every_input_kind_are_the_batches_of_one_process(inputs, tiny_vae_dir, name,
                                                                   world):  # fmt: skip
    """Batches of 3 over 13 images: 5 batches dealt out as contiguous runs in rank order (with
    5 ranks, one batch each); the ranks' batches are those of one process, value for value."""
    opened = open_input(inputs / name, limit=13, vae=str(tiny_vae_dir))
    whole = list(opened.batches(3))
    assert [len(b) for b in whole] == [3, 3, 3, 3, 1]
    parts = [opened.share(3, rank, world) for rank in range(world)]
    assert [p.first for p in parts] == [rank * 5 // world * 3 for rank in range(world)]
    assert sum(p.count for p in parts) == 13
    dealt = [b for p in parts for b in p.batches(3)]
    assert len(dealt) == len(whole)
    for a, b in zip(dealt, whole, strict=True):
        np.testing.assert_array_equal(a, b)
    if name == "stored.npz":
        np.testing.assert_array_equal(np.concatenate(whole), images(13))


def test_rebatch_runs_across_chunks():
    chunks = [np.arange(5), np.arange(5, 6), np.arange(6, 12)]
    assert [b.tolist() for b in rebatch(iter(chunks), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                              [8, 9, 10, 11]]  # fmt: skip


def test_gathers_of_two_ranks(tmp_path):
    """Rows of uneven counts arrive in rank order on rank 0; a rank without rows is skipped;
    an error of one rank is raised on both; rank 0's result reaches both."""
    out = tmp_path / "seen.json"
    job = [*TORCHRUN, str(ROOT / "tests/jobs/gather_job.py"), str(out)]
    done = subprocess.run(job, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["uneven"] == [[0, 1, 2], [100, 101, 102], [103, 104, 105]]
    assert seen["only_rank_1"] == [[100, 101, 102], [103, 104, 105]]
    assert seen["none"] is None
    assert seen["on_all"] == "rank 1 failed"  # on rank 0, which did not fail itself
    assert seen["on_main"] == ["from 0", "from 0"]


def test_evaluate_on_two_ranks_gives_the_result_of_one_process(
    inputs, tmp_path, tiny_vae_dir, tiny_inception_logits
):
    """SAMPLES a store decoded through the VAE, --ref a folder: each rank featurizes its share
    of both; the metrics and the --save-stats features equal those of one process."""
    ref = write_folder(tmp_path / "ref", images(11, size=32, seed=1))
    common = dict(ref=ref, inception=tiny_inception_logits, vae=str(tiny_vae_dir), batch_size=4,
                  workers=0, limit=13)  # fmt: skip
    one = evaluate(
        EvaluateConfig(samples=inputs / "s.zarr", save_stats=tmp_path / "one.npz", **common)
    )
    args = [inputs / "s.zarr", "--ref", ref, "--inception", tiny_inception_logits, "--vae",
            tiny_vae_dir, "--batch-size", 4, "--workers", 0, "--limit", 13, "--device", "cpu",
            "--json", "--save-stats", tmp_path / "two.npz"]  # fmt: skip
    done = torchrun("evaluate", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout)  # printed once, by rank 0
    # 13 samples in batches of 4: rank 0 has batches 0-1, rank 1 2-3; of 11 refs, 0 and 1-2
    for line in ("rank 0 of 2: images [0, 8) of 13", "rank 1 of 2: images [8, 13) of 13",
                 "rank 1 of 2: images [4, 11) of 11"):  # fmt: skip
        assert line in done.stderr, done.stderr[-3000:]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-9), key
    for role in ("samples", "ref"):
        assert {**two[role], "images_per_s": None} == {**one[role], "images_per_s": None}
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        for key in ("pool_3", "spatial", "mu", "sigma"):
            np.testing.assert_array_equal(a[key], b[key])  # the same batches: bit for bit


def test_evaluate_on_two_ranks_with_the_real_network(inputs, tmp_path):
    """The cached ADM-matching port: rank 1's share (images 4..13) featurized there and gathered
    gives the pool_3 and spatial features of one process, bit for bit."""
    evaluate(EvaluateConfig(samples=inputs / "stored.npz", save_stats=tmp_path / "one.npz",
                            batch_size=4, workers=0))  # fmt: skip
    done = torchrun("evaluate", inputs / "stored.npz", "--batch-size", 4, "--device", "cpu",
                    "--save-stats", tmp_path / "two.npz", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["samples"]["count"] == 13
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["pool_3"].shape == (13, 2048)
        for key in ("pool_3", "spatial", "mu_s"):
            np.testing.assert_array_equal(a[key], b[key])


def test_an_error_on_one_rank_stops_both(tmp_path, tiny_inception):
    """An image of another size in rank 1's share: both ranks stop with its one-line error (an
    undecodable one would be skipped and counted, as encode does)."""
    folder = write_folder(tmp_path / "f", images(6))
    Image.fromarray(images(1, size=20)[0]).save(folder / "c1" / "zz.png")
    done = torchrun("evaluate", folder, "--inception", tiny_inception, "--batch-size", 4,
                    "--workers", 0, "--device", "cpu")  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count("zz.png is 20x20 but") == 2, done.stderr[-3000:]


def test_train_eval_every_on_two_ranks_scores_like_one_process(
    tmp_path, tiny_vae_dir, tiny_inception
):
    """`train --eval-every` under torchrun: the ranks sample and featurize 120 EMA images in
    batches of 50 (rank 0 the first batch, rank 1 the other two); the logged figures equal
    those of the hook run in one process on the checkpoint's EMA weights of the same step.

    Equal to rounding only if rank 1's EMA is rank 0's: the ranks are seeded apart, so the EMA
    must start from the weights DDP broadcasts, not from the rank's own init (it once did).
    """
    store = write_store(tmp_path / "s.zarr", n=16, size=4)
    evaluate(EvaluateConfig(samples=store, vae=str(tiny_vae_dir), inception=tiny_inception,
                            workers=0, save_stats=tmp_path / "r.npz"))  # fmt: skip
    run = tmp_path / "run"
    done = torchrun(
        "train", "--store", store, "--run", run, "--model", "DiT-S/2", "--hidden-size", 32,
        "--depth", 2, "--num-heads", 2, "--steps", 2, "--batch-size", 8, "--warmup-steps", 0,
        "--device", "cpu", "--vae", tiny_vae_dir, "--sample-every", 2, "--eval-every", 2,
        "--eval-samples", 120, "--eval-ref", tmp_path / "r.npz", "--eval-inception",
        tiny_inception, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("rank 0 of 2: images [0, 50) of 120", "rank 1 of 2: images [50, 120) of 120"):
        assert line in done.stderr, done.stderr[-3000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (two,) = [rec for rec in log if rec.get("eval")]
    assert (two["step"], two["eval_samples"], two["eval_ranks"]) == (2, 120, 2)
    ema, meta = load_for_inference(run)
    hook = fid_hook(str(tiny_vae_dir), tmp_path / "r.npz", samples=120, inception=tiny_inception)
    one = hook(ema, {**meta, "step": 2}, 2, run)
    assert one["eval_ranks"] == 1
    for key in ("fid", "sfid", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key  # 3e-6 before
