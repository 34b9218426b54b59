"""Importing official DiT/SiT checkpoints, checked against what the official code produced.

The golden fixtures in tests/fixtures/official/ (see its README) were made by running
facebookresearch/DiT and willisma/SiT on tiny random-weight models; every comparison is at 1e-5
relative to the largest reference value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sampler.config import SolveConfig
from sampler.guidance import guided
from sampler.import_config import ImportConfig
from sampler.importer import import_checkpoint, infer_shapes, read_official
from sampler.latents import make_latents
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


def assert_matches(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within `rel` of the reference's largest magnitude."""
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.float(), ref.float(), rtol=rel, atol=rel * scale)


def outputs(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{name}_outputs.pt", weights_only=True)


def import_fixtures(tmp_path_factory, vae_dir: Path) -> dict[str, Path]:
    """Both train.py fixtures imported (EMA weights, what the outputs were made with)."""
    runs = {}
    for name in ("dit", "sit"):
        run = tmp_path_factory.mktemp(f"import-{name}")
        cfg = ImportConfig(checkpoint=FIXTURES / f"{name}_train.pt", run=run, format=name,
                           vae=str(vae_dir), **TINY)  # fmt: skip
        import_checkpoint(cfg)
        runs[name] = run
    return runs


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_vae_dir) -> dict[str, Path]:
    return import_fixtures(tmp_path_factory, tiny_vae_dir)


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
    # the first layer's gradient sums over every block's backward in float32: the CPU's kernel set
    # (AVX2 vs AVX-512) changes its last bits, 2e-5 of its largest value on some machines
    assert_matches(model.t_embedder[0].weight.grad, ref["loss_grad_t_embedder"], rel=1e-4)


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
