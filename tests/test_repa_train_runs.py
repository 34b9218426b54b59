"""REPA (and REG) training runs on tiny stores with synthetic features: logged terms, exact
resumes with the projector, stream mode, recomputed blocks, --compile, torchrun, the DDT head,
sampling without the projector, fine-tuning an imported REPA model, REG end to end."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from conftest import ROOT, write_store
from safetensors.torch import load_file
from test_import import FIXTURES
from test_repa import MODEL, TINY, import_repa
from test_repa_train import REPA, train_args
from test_trainer_runs import read_log, tiny_options
from typer.testing import CliRunner

from cli import app
from sampler.config import SolveConfig
from sampler.importer import read_official
from sampler.latents import make_latents
from sampler.plan import ImageNoise
from testkit.features import add_features
from trainer.checkpoint import load_checkpoint, load_for_inference
from trainer.config import resolve_config
from trainer.model import model_from_config
from trainer.objective import objective_from_meta
from trainer.train import train

runner = CliRunner()
HEAD = {"model": "DiT-DH-S/2", "head_width": 32, "head_heads": 2}


def _train(tmp_path, store, name: str, **kw) -> list[dict]:
    train(resolve_config(None, tiny_options(store, tmp_path / name, **{**REPA, **kw})))
    return read_log(tmp_path / name)


def _terms(log: list[dict]) -> list[tuple]:
    return [(r["loss"], r["loss_mse"], r["loss_proj"]) for r in log]


def _weights(run, step: int = 4) -> dict[str, bytes]:
    folder = run / "checkpoints" / f"{step:07d}"
    return {n: (folder / n).read_bytes() for n in ("model.safetensors", "ema.safetensors")}


def _sample(out, run, vae, *extra):
    """`latentdit sample RUN --out OUT` of 2 images, 2 steps; the CliRunner's result."""
    args = ["sample", str(run), "--out", str(out), "--vae", str(vae), "--n", "2", "--steps", "2"]
    return runner.invoke(app, [*args, *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """24 samples with flips, 8x8 latents; features on an 8x8 grid (the DiT/2's is 4x4: area)."""
    path = write_store(tmp_path_factory.mktemp("repa") / "s.zarr", n=24, variants=2)
    return add_features(path, tokens=64, cls=True)


def test_both_terms_are_logged_and_a_resume_is_exact_with_the_projector(tmp_path, store):
    straight = _train(tmp_path, store, "straight", steps=4, ckpt_every=2)
    assert all(r["loss"] == pytest.approx(r["loss_mse"] + 0.5 * r["loss_proj"]) for r in straight)
    assert all(-1 <= r["loss_proj"] <= 1 for r in straight)
    _train(tmp_path, store, "resumed", steps=2, ckpt_every=2)
    resumed = _train(tmp_path, store, "resumed", steps=4, ckpt_every=2)
    assert _terms(resumed) == _terms(straight)  # bitwise
    assert _weights(tmp_path / "resumed") == _weights(tmp_path / "straight")
    ckpt = load_checkpoint(tmp_path / "resumed")
    assert {"projector.0.weight", "projector.4.bias"} <= set(ckpt.model_state)
    assert len(ckpt.train_state["optimizer"]["state"]) == len(ckpt.model_state)  # projector too
    assert ckpt.meta["repa"]["coeff"] == 0.5 and set(ckpt.meta["repa"]["features"]) == {"features"}


def test_the_projector_learns_the_alignment(tmp_path, store):
    log = _train(tmp_path, store, "long", steps=40, lr=3e-3, repa_projector_dim=32)
    first, last = (sum(r["loss_proj"] for r in part) / 5 for part in (log[:5], log[-5:]))
    assert last < first - 0.1, (first, last)


def test_stream_mode_recomputed_blocks_and_compile(tmp_path):
    """Stream mode, features on a 2x2 grid (upsampled to the DiT's 4x4); recomputing a block
    changes nothing; --compile (the whole model, projector included) gives the eager losses."""
    small = add_features(write_store(tmp_path / "s.zarr", n=32, shard=8, variants=2), tokens=4)
    kw = {"steps": 3, "data": "stream", "shuffle_shards": 2}
    eager = _train(tmp_path, small, "eager", **kw)
    recomputed = _train(tmp_path, small, "recomputed", checkpoint_blocks=2, **kw)
    compiled = _train(tmp_path, small, "compiled", compile=True, **kw)  # ~50 s on 2 cores
    assert _terms(recomputed) == _terms(eager)
    for a, c in zip(_terms(eager), _terms(compiled), strict=True):
        assert a == pytest.approx(c, rel=1e-4)


def test_two_processes_match_one_with_repa_and_reg(tmp_path, store, python):
    """torchrun, 2 ranks on gloo, batch 4 each = 1 rank with batch 8, with REPA and REG: each
    rank's rows of one draw of noise (the class token's too), the features of its own samples."""
    options = tiny_options(store, tmp_path / "two", steps=3, **REPA, reg=True)
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(ROOT / "cli.py"), "--", *train_args(options)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    train(resolve_config(None, {**options, "run": str(tmp_path / "one")}))
    two, one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "loss_mse", "loss_proj", "loss_cls", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_the_ddt_head_trains_with_repa_and_sampling_ignores_the_projector(
    tmp_path, store, tiny_vae_dir
):
    run = tmp_path / "head"
    result = runner.invoke(app, train_args(tiny_options(store, run, steps=2, **REPA, **HEAD)))
    assert result.exit_code == 0, result.output
    assert all("loss_proj" in r for r in read_log(run))
    loaded, meta = load_for_inference(run)
    assert loaded.projector is None and loaded.head is not None
    trained = model_from_config(meta["model"]["config"])  # as the EMA in training: projector on
    trained.load_state_dict(load_file(run / "checkpoints" / "0000002" / "ema.safetensors"))
    kw = dict(latent_shape=(4, 8, 8), device=torch.device("cpu"), precision="fp32")
    args = (objective_from_meta(meta["objective"]), torch.tensor([0, 2]))
    z = [
        make_latents(m.eval(), *args, ImageNoise(0, [0, 1]), SolveConfig(steps=3, cfg=2.0), **kw)
        for m in (loaded, trained)
    ]
    assert torch.equal(z[0], z[1])
    result = _sample(tmp_path / "samples", run, tiny_vae_dir)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 2


def test_fine_tuning_an_imported_repa_model_keeps_its_projector(tmp_path, tiny_vae_dir):
    """`import --format repa` keeps the projector beside the weights; `train --init` with REPA's
    widths starts from it (and from the imported DiT, in REPA's time)."""
    import_repa(tmp_path / "imported", tiny_vae_dir)
    store = write_store(tmp_path / "s.zarr", n=16, classes=MODEL["num_classes"])
    add_features(store, dims=MODEL["z_dims"][0], tokens=16)
    options = tiny_options(store, tmp_path / "run", steps=1, lr=1e-5, timesteps="uniform")
    options.update(TINY, normalization="vae_scaling", init=str(tmp_path / "imported"))
    options.update(repa_coeff=0.5, repa_depth=MODEL["encoder_depth"])
    options["repa_projector_dim"] = MODEL["projector_dim"]
    train(resolve_config(None, options))
    ckpt = load_checkpoint(tmp_path / "run")
    ema, _, _ = read_official(FIXTURES / "repa_train.pt")
    for i in (0, 2, 4):
        ours, theirs = ckpt.model_state[f"projector.{i}.weight"], ema[f"projectors.0.{i}.weight"]
        assert not torch.equal(ours, theirs)  # one AdamW step of lr 1e-5 from REPA's
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert ckpt.meta["objective"]["time_scale"] == 1.0  # REPA's time, kept


def test_reg_trains_and_samples_latents_and_class_token_together(tmp_path, store, tiny_vae_dir):
    run = tmp_path / "reg"
    options = tiny_options(store, run, steps=2, **REPA, reg=True, pos_embed="rope")
    result = runner.invoke(app, train_args(options))
    assert result.exit_code == 0, result.output
    log = read_log(run)
    assert all({"loss_mse", "loss_proj", "loss_cls"} <= set(r) for r in log)
    assert all(
        r["loss"] == pytest.approx(r["loss_mse"] + 0.5 * r["loss_proj"] + 0.03 * r["loss_cls"])
        for r in log
    )
    loaded, meta = load_for_inference(run)
    assert meta["model"]["config"]["reg_dim"] == 24 and loaded.class_token is not None
    assert set(meta["repa"]["features"]) == {"features", "features_cls"}
    with torch.no_grad():  # the class token steers the latents' prediction: they are entangled
        for p in loaded.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        state = torch.randn(2, 4 * 8 * 8 + 24)
        other = state.clone()
        other[:, -24:] += 1.0
        t, y = torch.full((2,), 500.0), torch.tensor([0, 1])
        a, b = loaded(state, t, y), loaded(other, t, y)
    assert a.shape == state.shape and not torch.allclose(a[:, :256], b[:, :256])
    for sampler in ("euler", "repa-euler-maruyama"):
        out = tmp_path / sampler
        result = _sample(out, run, tiny_vae_dir, "--sampler", sampler, "--cfg", "1.5")
        assert result.exit_code == 0, result.output
        assert len(list((out / "images").glob("*.png"))) == 2
    refused = _sample(tmp_path / "fid", run, tiny_vae_dir, "--protocol", "sit-fid")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert "--cfg-channels 3 guides some latent channels; a REG model's state" in refused.output


def test_bf16_autocast_with_repa_and_reg_and_bf16_weights_agree(tmp_path, store):
    """bf16 autocast (on the CPU here) through the projector and REG's token; --bf16-weights
    gives autocast's losses bit for bit (its masters see autocast's gradients)."""
    kw = {"steps": 2, "reg": True, "precision": "bf16"}
    autocast = _train(tmp_path, store, "autocast", **kw)
    weights = _train(tmp_path, store, "weights", bf16_weights=True, **kw)
    assert [r["loss_cls"] for r in autocast] == [r["loss_cls"] for r in weights]
    assert _terms(autocast) == _terms(weights)
