"""FD_DINOv2 (EDM2's, through transformers): a tiny DINOv2 against a direct recomputation, stats
files of several spaces, refusals, and 2 gloo ranks against one process."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import make_tiny_dinov2
from scipy import linalg
from test_evaluation_ranks import torchrun, write_folder
from typer.testing import CliRunner

from cli import app
from evaluation.errors import EvaluationError
from evaluation.evaluate import EvaluateConfig, evaluate

runner = CliRunner()


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def cfg(samples, ref=None, **kw) -> EvaluateConfig:
    return EvaluateConfig(samples=samples, ref=ref, workers=0, **kw)


def direct_features(folder, imgs: np.ndarray) -> np.ndarray:
    """EDM2's detector written out here: torch bicubic-antialias resize to 224, /255, ImageNet
    mean/std, and a Dinov2Model built for 224 px whose position embeddings are the trained ones
    resized as facebookresearch/dinov2 resizes them (scale factor (16 + 0.1) / side, bicubic), so
    that transformers itself interpolates nothing."""
    from transformers import Dinov2Config, Dinov2Model

    trained = Dinov2Model.from_pretrained(folder)
    pos = trained.embeddings.position_embeddings.detach()
    side, dim = int((pos.shape[1] - 1) ** 0.5), pos.shape[2]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, scale_factor=((16 + 0.1) / side,) * 2, mode="bicubic", antialias=False
    )
    state = trained.state_dict()
    state["embeddings.position_embeddings"] = torch.cat(
        [pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, dim)], dim=1
    )
    config = Dinov2Config.from_pretrained(folder)
    config.image_size = 224
    model = Dinov2Model(config).eval()
    model.load_state_dict(state)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    with torch.no_grad():
        return model(pixel_values=x).pooler_output.numpy()


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.astype(np.float64).mean(0), b.astype(np.float64).mean(0)
    s1, s2 = np.cov(a.astype(np.float64), rowvar=False), np.cov(b.astype(np.float64), rowvar=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def test_fd_dinov2_equals_a_direct_recomputation(tmp_path, tiny_dinov2):
    """Samples of 24 px and references of 40 px (each resized to 224) through the tiny DINOv2
    loaded by folder: the same class-token features, statistics and FD as computed in the test."""
    s, r = images(12, 24, seed=0), images(10, 40, seed=1)
    np.savez(tmp_path / "s.npz", arr_0=s)
    np.savez(tmp_path / "r.npz", arr_0=r)
    out = evaluate(
        cfg(
            tmp_path / "s.npz",
            tmp_path / "r.npz",
            metrics="fd_dinov2",
            dinov2=str(tiny_dinov2),
            save_stats=tmp_path / "st.npz",
        )
    )
    fs, fr = direct_features(tiny_dinov2, s), direct_features(tiny_dinov2, r)
    with np.load(tmp_path / "st.npz") as st:
        np.testing.assert_allclose(st["dinov2"], fs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st["mu_dinov2"], fs.astype(np.float64).mean(0), atol=1e-5)
        assert st["sigma_dinov2"].dtype == np.float64 and "mu" not in st  # no Inception asked
    assert out["fd_dinov2"] == pytest.approx(direct_fd(fs, fr), rel=1e-4)
    assert out["fd_dinov2"] > 0.1 and out["fid"] is None
    assert out["null_reasons"]["fid"] == "not in --metrics" and out["network"] is None
    assert out["networks"]["dinov2"]["source"] == str(tiny_dinov2)
    # transformers' own position-embedding resize (to a size, not a scale factor) differs
    from transformers import Dinov2Model

    plain = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    from evaluation.dinov2 import load_dinov2

    x = load_dinov2(str(tiny_dinov2)).network_input(torch.from_numpy(s))
    with torch.no_grad():
        assert np.abs(plain(pixel_values=x).pooler_output.numpy() - fs).max() > 1e-3


def test_stats_files_carry_each_space_and_its_network(tmp_path, tiny_dinov2, tiny_inception):
    np.savez(tmp_path / "s.npz", arr_0=images(10))
    both = dict(metrics="fid,fd_dinov2", dinov2=str(tiny_dinov2), inception=tiny_inception)
    evaluate(cfg(tmp_path / "s.npz", save_stats=tmp_path / "both.npz", **both))
    with np.load(tmp_path / "both.npz") as st:
        spaces = "mu sigma mu_s sigma_s pool_3 spatial mu_dinov2 sigma_dinov2 dinov2 networks"
        assert set(spaces.split()) <= set(st)
        networks = json.loads(str(st["networks"]))
    assert set(networks) == {"inception", "dinov2"}
    assert len(networks["dinov2"]["weights_xxh3_128"]) == 32
    again = evaluate(cfg(tmp_path / "both.npz", tmp_path / "s.npz", **both))
    assert abs(again["fd_dinov2"]) < 1e-6 and abs(again["fid"]) < 1e-6
    # a stats file without the DINOv2 space, asked for fd_dinov2: one line, before any work
    evaluate(cfg(tmp_path / "s.npz", save_stats=tmp_path / "inc.npz", inception=tiny_inception))
    with pytest.raises(EvaluationError, match=r"no dinov2 statistics .* for --metrics fd_dinov2"):
        evaluate(cfg(tmp_path / "s.npz", tmp_path / "inc.npz", **both))
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "s.npz"),
            "--ref",
            str(tmp_path / "inc.npz"),
            "--metrics",
            "fd_dinov2",
            "--dinov2",
            str(tiny_dinov2),
        ],
    )
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no dinov2 statistics" in r.stderr
    # features of another DINOv2: refused, naming the option
    other = make_tiny_dinov2(tmp_path / "other", seed=1)
    with pytest.raises(EvaluationError, match=r"recompute the stats .* --dinov2"):
        evaluate(cfg(tmp_path / "s.npz", tmp_path / "both.npz", **{**both, "dinov2": str(other)}))


def test_bad_metrics_and_a_missing_dinov2_are_one_line(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=images(4))
    for args, match in [
        (["--metrics", "fid,kid"], "--metrics 'fid,kid': unknown kid; choose from fid,sfid,is,pr"),
        (["--metrics", "fd_dinov2", "--dinov2", str(tmp_path / "nowhere")], "--dinov2 .*nowhere"),
    ]:
        r = runner.invoke(app, ["evaluate", str(tmp_path / "s.npz"), *args])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
        assert re.search(match, r.stderr), r.stderr


def test_fd_dinov2_on_two_ranks_is_that_of_one_process(tmp_path, tiny_dinov2, tiny_inception):
    """13 samples in batches of 4 over 2 gloo ranks, --ref a folder: FD_DINOv2 and FID equal
    one process's, the saved DINOv2 features bit for bit."""
    np.savez(tmp_path / "s.npz", arr_0=images(13))
    ref = write_folder(tmp_path / "ref", images(11, size=32, seed=1))
    common = dict(
        ref=ref,
        metrics="fid,fd_dinov2",
        dinov2=str(tiny_dinov2),
        inception=tiny_inception,
        batch_size=4,
    )
    one = evaluate(cfg(tmp_path / "s.npz", save_stats=tmp_path / "one.npz", **common))
    done = torchrun(
        "evaluate",
        tmp_path / "s.npz",
        "--ref",
        ref,
        "--metrics",
        "fid,fd_dinov2",
        "--dinov2",
        tiny_dinov2,
        "--inception",
        tiny_inception,
        "--batch-size",
        4,
        "--workers",
        0,
        "--device",
        "cpu",
        "--json",
        "--save-stats",
        tmp_path / "two.npz",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout)
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for key in ("fd_dinov2", "fid"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        for key in ("dinov2", "mu_dinov2", "sigma_dinov2", "pool_3"):
            np.testing.assert_array_equal(a[key], b[key])
