"""Importing official DiT/SiT checkpoints, checked against what the official code produced.

The golden fixtures in tests/fixtures/official/ (see its README) were made by running
facebookresearch/DiT and willisma/SiT on tiny random-weight models; every comparison is at 1e-5
relative to the largest reference value.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from sampler.errors import CheckpointImportError
from sampler.guidance import guided
from sampler.import_config import ImportConfig
from sampler.importer import import_checkpoint, infer_shapes, read_official
from sampler.latents import SolveConfig, make_latents
from sampler.solvers import (
    ddpm_step,
    ddpm_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
)
from trainer.checkpoint import load_for_inference
from trainer.model import DiT, build_model, paper_parameter_count
from trainer.objective import DDPM, ddpm_betas, objective_from_meta
from trainer.vlb import hybrid_terms

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CONFIG = json.loads((FIXTURES / "config.json").read_text())
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
C = 4  # latent channels of the fixtures
runner = CliRunner()


def assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal within 1e-5 of the reference's largest magnitude."""
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5 * scale)


def outputs(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{name}_outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_vae_dir) -> dict[str, Path]:
    """Both train.py fixtures imported (EMA weights, what the outputs were made with)."""
    runs = {}
    for name in ("dit", "sit"):
        run = tmp_path_factory.mktemp(f"import-{name}")
        cfg = ImportConfig(checkpoint=FIXTURES / f"{name}_train.pt", run=run, format=name,
                           vae=str(tiny_vae_dir), **TINY)  # fmt: skip
        import_checkpoint(cfg)
        runs[name] = run
    return runs


def load(imported, name: str) -> tuple[DiT, dict]:
    return load_for_inference(imported[name])


class Recorded:
    """The official run's noise: the starting latents, then one recorded tensor per draw."""

    def __init__(self, initial: torch.Tensor, draws: torch.Tensor) -> None:
        self.start, self.draws = initial, list(draws)

    def initial(self, shape, device) -> torch.Tensor:
        return self.start.clone()

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.draws.pop(0)


# --- model ----------------------------------------------------------------------------------


def test_learn_sigma_parameter_count_is_the_papers():
    with torch.device("meta"):
        model = build_model(
            "DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True
        )
    assert model.out_channels == 8
    assert paper_parameter_count(model) == 675_129_632


@pytest.mark.parametrize("name", ["dit", "sit"])
def test_forward_matches_the_official_model(imported, name):
    model, meta = load(imported, name)
    ref = outputs(name)
    with torch.no_grad():
        got = model(ref["x"], ref["t_forward"].float(), ref["y"])
    if name == "dit":
        assert meta["model"]["config"]["learn_sigma"] and got.shape[1] == 2 * C
    else:  # SiT's forward discards its sigma half; the import drops those weights
        assert meta["source"]["sigma_dropped"] and got.shape[1] == C
    assert_matches(got, ref["forward"])


@pytest.mark.parametrize("name", ["dit", "sit"])
def test_bare_and_train_layouts_read_alike(name):
    bare, args, layout = read_official(FIXTURES / f"{name}_bare.pt")
    assert (layout, args) == ("bare", {})
    model_weights, args, layout = read_official(FIXTURES / f"{name}_train.pt", "model")
    assert layout == "train" and args["model"] in ("DiT-S/2", "SiT-S/4")
    assert all(torch.equal(bare[k], model_weights[k]) for k in bare)
    expected = {k: v for k, v in CONFIG[name].items() if k != "num_heads"}  # heads: not in shapes
    assert infer_shapes(bare, FIXTURES) == {**expected, "mlp_ratio": 4.0}


def test_guidance_on_three_channels_is_forward_with_cfg(imported):
    model, _ = load(imported, "dit")
    ref = outputs("dit")
    fn = guided(lambda x, t, y: model(x, t, y), ref["y"], scale=CONFIG["cfg"],
                null_class=model.null_class, channels=3)  # fmt: skip
    with torch.no_grad():
        got = fn(ref["x"], ref["t_forward"].float())
    assert_matches(got, ref["forward_with_cfg"][: CONFIG["batch"]])


# --- DiT sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", sorted(CONFIG["spacings"]))
def test_official_spacing_is_space_timesteps(spacing):
    ddim = spacing.startswith("ddim")
    steps = int(spacing.removeprefix("ddim"))
    got = ddpm_timesteps(1000, steps, "official", ddim=ddim)
    assert sorted(got) == CONFIG["spacings"][spacing] and got == sorted(got, reverse=True)


@pytest.mark.parametrize("variance", ["learned", "fixed-small", "fixed-large"])
@pytest.mark.parametrize("index", [7, 3, 0])
def test_single_ddpm_step_matches_p_sample(imported, variance, index):
    model, meta = load(imported, "dit")
    ref = outputs("dit")
    abar = objective_from_meta(meta["objective"]).alphas_cumprod
    ts = sorted(ddpm_timesteps(1000, CONFIG["steps"], "official"))  # respaced index i -> ts[i]
    t, a = ts[index], float(abar[ts[index]])
    a_next = float(abar[ts[index - 1]]) if index > 0 else 1.0
    with torch.no_grad():
        eps, v = model(ref["x"], torch.full((3,), float(t)), ref["y_cond"]).chunk(2, dim=1)
    got, _ = ddpm_step(ref["x"], eps, a=a, a_next=a_next, variance=variance, var_values=v,
                       noise=ref[f"step_{variance}_{index}_noise"])  # fmt: skip
    assert_matches(got, ref[f"step_{variance}_{index}"])


def test_dit_protocol_loop_matches_sample_py(imported):
    """DiT's sample.py loop: learned variance, official spacing, guidance on 3 channels."""
    model, meta = load(imported, "dit")
    ref = outputs("dit")
    solve = SolveConfig(sampler="ddpm", steps=CONFIG["steps"], cfg=CONFIG["cfg"], cfg_channels=3,
                        variance="learned", spacing="official")  # fmt: skip
    got = make_latents(model, objective_from_meta(meta["objective"]), ref["y_cond"],
                       Recorded(ref["ddpm_z"], ref["ddpm_cfg_noise"]), solve,
                       latent_shape=(C, 8, 8), device=torch.device("cpu"), precision="fp32")  # fmt: skip
    assert_matches(got, ref["ddpm_cfg"])


def test_ddpm_solver_with_learned_variance_directly(imported):
    model, meta = load(imported, "dit")
    ref = outputs("dit")
    fn = guided(lambda x, t, y: model(x, t, y), ref["y_cond"], scale=CONFIG["cfg"],
                null_class=model.null_class, channels=3)  # fmt: skip
    draws = list(ref["ddpm_cfg_noise"])
    got = sample_ddpm(fn, ref["ddpm_z"], CONFIG["steps"], variance="learned", spacing="official",
                      alphas_cumprod=objective_from_meta(meta["objective"]).alphas_cumprod,
                      noise=lambda x: draws.pop(0))  # fmt: skip
    assert_matches(got, ref["ddpm_cfg"])
    assert len(draws) == 1  # the official loop draws at t = 0 too, and masks it


def test_ddim_official_spacing_matches(imported):
    model, meta = load(imported, "dit")
    ref = outputs("dit")
    got = sample_ddim(lambda x, t: model(x, t, ref["y_cond"])[:, :C], ref["ddpm_z"], CONFIG["steps"],
                      alphas_cumprod=objective_from_meta(meta["objective"]).alphas_cumprod,
                      spacing="official")  # fmt: skip
    assert_matches(got, ref["ddim"])


def test_hybrid_loss_and_its_gradients_match(imported):
    model, meta = load(imported, "dit")
    model.requires_grad_(True)
    ref = outputs("dit")
    objective = objective_from_meta(meta["objective"])
    assert isinstance(objective, DDPM) and objective.learn_sigma
    t = ref["loss_t"]
    abar = objective.alphas_cumprod[t].view(-1, 1, 1, 1)  # float64, as the reference's tables
    x_t = abar.sqrt().float() * ref["loss_x0"] + (1 - abar).sqrt().float() * ref["loss_noise"]
    out = model(x_t, t.float(), ref["y_cond"])
    mse, vb = hybrid_terms(out, x0=ref["loss_x0"], x_t=x_t, t=t, eps=ref["loss_noise"],
                           betas=ddpm_betas("linear"))  # fmt: skip
    assert_matches(mse, ref["loss_mse"])
    assert_matches(vb, ref["loss_vb"])
    (mse + vb).mean().backward()
    assert_matches(model.final_layer.linear.weight.grad, ref["loss_grad_final"])
    assert_matches(model.t_embedder[0].weight.grad, ref["loss_grad_t_embedder"])


def test_vlb_gradient_stops_at_the_mean(imported):
    """L_vlb alone moves no weight that only the eps half of the output depends on."""
    model, _ = load(imported, "dit")
    model.requires_grad_(True)
    x0 = torch.randn(2, C, 8, 8)
    out = model(x0, torch.tensor([5.0, 500.0]), torch.tensor([0, 1]))
    t = torch.tensor([5, 500])
    _, vb = hybrid_terms(out, x0=x0, x_t=x0, t=t, eps=x0, betas=ddpm_betas("linear"))
    vb.mean().backward()
    rows = model.final_layer.linear.weight.grad.view(2 * 2, 2 * C, -1)  # (p q, c, D)
    assert rows[:, :C].abs().max() == 0 and rows[:, C:].abs().max() > 0


# --- SiT sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "key"), [(sample_euler, "ode_euler"), (sample_heun, "ode_heun2")]
)
def test_sit_ode_matches(imported, solver, key):
    model, meta = load(imported, "sit")
    ref = outputs("sit")
    objective = objective_from_meta(meta["objective"])
    assert meta["objective"]["t0"] == "noise"
    net = lambda x, t, y: -model(x, objective.model_time(t), y)  # noqa: E731
    fn = guided(net, ref["y_cond"], scale=CONFIG["cfg"], null_class=model.null_class, channels=3)
    with torch.no_grad():
        got = solver(fn, ref["z"], CONFIG["steps"])
    assert_matches(got, ref[key])


def test_sit_protocol_sde_matches(imported):
    model, meta = load(imported, "sit")
    ref = outputs("sit")
    solve = SolveConfig(sampler="euler-maruyama", steps=CONFIG["steps"], cfg=CONFIG["cfg"],
                        cfg_channels=3, diffusion=2.0, last_step=0.04)  # fmt: skip
    noise = Recorded(ref["z"], ref["sde_noise"])
    got = make_latents(model, objective_from_meta(meta["objective"]), ref["y_cond"], noise, solve,
                       latent_shape=(C, 8, 8), device=torch.device("cpu"), precision="fp32")  # fmt: skip
    assert_matches(got, ref["sde"])
    assert not noise.draws
    _ = sample_euler_maruyama  # the solver behind "euler-maruyama"


# --- bad input --------------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_files(tmp: Path) -> dict[str, Path]:
    files = {}
    files["unsafe"] = tmp / "unsafe.pt"
    torch.save({"model": Evil(), "ema": {}}, files["unsafe"])
    files["pickle"] = tmp / "plain.pkl"
    files["pickle"].write_bytes(pickle.dumps({"model": Evil()}, protocol=4))
    files["not_dit"] = tmp / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, files["not_dit"])
    files["junk"] = tmp / "junk.pt"
    files["junk"].write_bytes(b"not a checkpoint")
    files["list"] = tmp / "list.pt"
    torch.save([1, 2], files["list"])
    return files


@pytest.mark.parametrize(
    ("case", "flags", "match"),
    [
        ("unsafe", {}, r"refusing to unpickle print: only state dicts"),
        ("pickle", {}, r"not a torch checkpoint that loads with weights_only=True"),
        ("not_dit", {}, r"not a DiT/SiT checkpoint \(no x_embedder"),
        ("junk", {}, r"not a torch checkpoint that loads"),
        ("list", {}, r"not a DiT/SiT checkpoint \(a list"),
        ("dit_train", {}, r"hidden_size 32, the checkpoint's args.model DiT-S/2 says 384"),
        (
            "dit_train",
            {"hidden_size": 64, "depth": 2, "num_heads": 2},
            r"hidden_size 32, --hidden-size says 64",
        ),
        ("dit_bare", {"model": "DiT-XL/2"}, r"hidden_size 32, --model DiT-XL/2 says 1152"),
        ("dit_bare", {}, r"give --num-heads"),
        ("dit_bare", {"depth": 3, "hidden_size": 32, "num_heads": 2}, r"depth 2, --depth says 3"),
        ("dit_train", {**TINY, "weights": "opt"}, r"--weights 'opt' is not one of"),
        ("dit_train", {**TINY, "format": "sit"}, r"args are DiT's, not SiT's; use --format dit"),
        ("sit_train", {**TINY, "format": "dit"}, r"args are SiT's, not DiT's; use --format sit"),
        ("dit_train", {**TINY, "format": "adm"}, r"--format 'adm' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_vae_dir, case, flags, match):
    files = _bad_files(tmp_path)
    path = files.get(case, FIXTURES / f"{case}.pt")
    run = tmp_path / "run"
    with pytest.raises(CheckpointImportError, match=match) as err:
        import_checkpoint(ImportConfig(checkpoint=path, run=run, vae=str(tiny_vae_dir), **flags))
    assert "\n" not in str(err.value)
    assert not run.exists()


def test_sit_with_another_path_is_refused(tmp_path, tiny_vae_dir):
    ckpt = torch.load(FIXTURES / "sit_train.pt", weights_only=False)
    ckpt["args"] = argparse.Namespace(**{**vars(ckpt["args"]), "path_type": "GVP"})
    torch.save(ckpt, tmp_path / "gvp.pt")
    with pytest.raises(CheckpointImportError, match=r"SiT path_type 'GVP' is not supported"):
        import_checkpoint(ImportConfig(checkpoint=tmp_path / "gvp.pt", run=tmp_path / "run",
                                       format="sit", vae=str(tiny_vae_dir), **TINY))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_import_records_provenance(imported):
    _, meta = load(imported, "dit")
    src = meta["source"]
    assert src["layout"] == "train" and src["weights"] == "ema" and len(src["sha256"]) == 64
    assert meta["normalization"]["kind"] == "vae_scaling"
    assert meta["objective"] == {**meta["objective"], "kind": "ddpm", "learn_sigma": True}
    assert [c["id"] for c in meta["classes"]] == [str(i) for i in range(5)]


# --- CLI end to end ---------------------------------------------------------------------------


def test_cli_import_then_sample(tmp_path, tiny_vae_dir):
    run, out = tmp_path / "run", tmp_path / "samples"
    result = runner.invoke(app, ["import", str(FIXTURES / "dit_bare.pt"), "--run", str(run), "--format", "dit",
                                 "--vae", str(tiny_vae_dir), "--hidden-size", "32", "--depth", "2", "--num-heads", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    noise = np.random.default_rng(0).standard_normal((2, C, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    result = runner.invoke(app, ["sample", str(run), "--out", str(out), "--protocol", "dit-fid", "--steps", "5",
                                 "--n", "2", "--class", "1", "--noise", str(tmp_path / "noise.npy"), "--save-latents"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 2
    latents = np.load(out / "latents.npy")
    assert latents.shape == (2, C, 8, 8) and np.isfinite(latents).all()
    settings = json.loads((out / "sample.json").read_text())
    assert settings == {**settings, "sampler": "ddpm", "steps": 5, "cfg": 1.5, "cfg_channels": 3,
                        "variance": "learned", "spacing": "official"}  # fmt: skip
    assert "noise_blake2b" in settings and "labels_blake2b" in settings
    again = runner.invoke(app, ["import", str(FIXTURES / "dit_bare.pt"), "--run", str(run), "--vae", str(tiny_vae_dir), "--num-heads", "2"])  # fmt: skip
    assert again.exit_code == 2 and "already holds checkpoints" in again.output


# --- fine-tuning an imported model --------------------------------------------------------------


def test_train_fine_tunes_an_imported_dit_with_the_hybrid_loss(imported, tmp_path):
    from conftest import write_store

    from trainer.checkpoint import CheckpointMismatchError, load_checkpoint
    from trainer.config import resolve_config
    from trainer.train import train

    store = write_store(tmp_path / "store.zarr", n=16, classes=5)
    options = {"store": str(store), "run": str(tmp_path / "run"), "model": "DiT-S/2", **TINY,
               "objective": "ddpm", "learn_sigma": True, "normalization": "vae_scaling",
               "init": str(imported["dit"]), "steps": 2, "batch_size": 8, "warmup_steps": 0}  # fmt: skip
    run = train(resolve_config(None, options))
    ckpt = load_checkpoint(run)
    assert ckpt.meta["objective"]["learn_sigma"] and ckpt.meta["model"]["config"]["learn_sigma"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    imported_weights = load_for_inference(imported["dit"])[0].state_dict()
    moved = [k for k, v in ckpt.model_state.items() if not torch.equal(v, imported_weights[k])]
    assert moved and set(ckpt.model_state) == set(imported_weights)  # started there, then trained
    with pytest.raises(
        CheckpointMismatchError,
        match=r"its model \{'learn_sigma': True\} differs from this run's \{'learn_sigma': False\}",
    ):
        train(resolve_config(None, {**options, "run": str(tmp_path / "r2"), "learn_sigma": False}))


@pytest.mark.parametrize(
    ("solve", "match"),
    [
        (
            {"sampler": "ddim", "steps": 999, "spacing": "official"},
            r"no integer stride makes 999 DDIM steps",
        ),
        (
            {"sampler": "dpm++2m", "variance": "learned"},
            r"--variance applies to the ddpm sampler only",
        ),
        ({"sampler": "heun", "spacing": "official"}, r"is for flow_matching models"),
    ],
)
def test_bad_solver_options_for_an_imported_dit(imported, solve, match):
    from sampler.errors import SamplerError
    from sampler.latents import pick_solver

    _, meta = load(imported, "dit")
    with pytest.raises(SamplerError, match=match):
        pick_solver(SolveConfig(**solve), objective_from_meta(meta["objective"]), learn_sigma=True)


def test_every_ddpm_solver_runs_a_learn_sigma_model(imported):
    from sampler.plan import ImageNoise

    model, meta = load(imported, "dit")
    objective = objective_from_meta(meta["objective"])
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        z = make_latents(model, objective, torch.tensor([0, 4]), ImageNoise(0, [0, 1]),
                         SolveConfig(sampler=sampler, steps=4, cfg=2.0, spacing="official"),
                         latent_shape=(C, 8, 8), device=torch.device("cpu"), precision="fp32")  # fmt: skip
        assert z.shape == (2, C, 8, 8) and torch.isfinite(z).all()


def test_sample_refuses_bad_noise_and_protocol(imported, tmp_path):
    np.save(tmp_path / "noise.npy", np.zeros((3, C, 8, 8), np.float32))
    base = [
        "sample",
        str(imported["dit"]),
        "--out",
        str(tmp_path / "s"),
        "--n",
        "2",
        "--steps",
        "2",
    ]
    result = runner.invoke(app, [*base, "--noise", str(tmp_path / "noise.npy")])
    assert result.exit_code == 2 and "shape (3, 4, 8, 8), need (2, 4, 8, 8)" in result.output
    result = runner.invoke(app, [*base, "--protocol", "adm"])
    assert (
        result.exit_code == 2 and "--protocol 'adm' is not one of dit-fid, sit-fid" in result.output
    )


def test_train_fine_tunes_an_imported_sit_in_its_time(imported, tmp_path):
    from conftest import write_store

    from trainer.checkpoint import load_checkpoint
    from trainer.config import resolve_config
    from trainer.train import train

    store = write_store(tmp_path / "store.zarr", n=16, classes=7)
    options = {"store": str(store), "run": str(tmp_path / "run"), "model": "DiT-S/4", **TINY,
               "normalization": "vae_scaling", "init": str(imported["sit"]), "steps": 1,
               "batch_size": 8, "warmup_steps": 0, "timesteps": "uniform"}  # fmt: skip
    meta = load_checkpoint(train(resolve_config(None, options))).meta
    assert meta["objective"] == {
        **meta["objective"],
        "reverse_time": True,
        "time_scale": 1.0,
        "t0": "noise",
    }
