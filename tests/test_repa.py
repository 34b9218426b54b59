"""REPA: its checkpoints imported, its samplers rule for rule, its loss fixture, against its code.

The golden fixtures tests/fixtures/official/repa_* were made by running sihyun-yu/REPA
(`models/sit.py`, `samplers.py`, `loss.py`) on a tiny random-weight SiT (see the README there and
make_repa_fixtures.py). Outputs are compared at 1e-5 relative to the largest reference value.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_import import FIXTURES, assert_matches

from sampler.config import SolveConfig, protocol_solve
from sampler.guidance import guided
from sampler.import_config import ImportConfig
from sampler.importer import import_checkpoint, read_official
from sampler.latents import make_latents
from sampler.plan import ImageNoise
from trainer.checkpoint import load_for_inference
from trainer.objective import FlowMatching, objective_from_meta

CONFIG = json.loads((FIXTURES / "repa_config.json").read_text())
MODEL = CONFIG["model"]
TINY = {k: MODEL[k] for k in ("hidden_size", "depth", "num_heads")}
C, S = MODEL["in_channels"], MODEL["input_size"]
SAMPLERS = {"euler": "repa-euler", "heun": "repa-heun", "sde": "repa-euler-maruyama"}


def outputs() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "repa_outputs.pt", weights_only=True)


def import_repa(run, vae_dir, name: str = "repa_train.pt", **flags):
    cfg = ImportConfig(
        checkpoint=FIXTURES / name, run=run, format="repa", vae=str(vae_dir), **{**TINY, **flags}
    )
    return import_checkpoint(cfg)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_vae_dir):
    """repa_train.pt imported (its EMA weights, what the outputs were made with)."""
    run = tmp_path_factory.mktemp("import-repa")
    import_repa(run, tiny_vae_dir)
    return load_for_inference(run)


class SeededNoise:
    """The official run's noise: `z` to start, then draws of a generator seeded as the fixture
    seeded torch before calling REPA's sampler (its randn_like of the float64 state)."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z, self.generator = z, torch.Generator().manual_seed(CONFIG["noise_seed"])

    def initial(self, shape, device) -> torch.Tensor:
        return self.z.clone()

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype)


def solve(sampler: str, guidance: bool, **extra) -> SolveConfig:
    g = CONFIG["guidance"]
    kw = {"cfg": g["cfg_scale"], "cfg_interval": (g["guidance_low"], g["guidance_high"])}
    return SolveConfig(sampler=sampler, steps=CONFIG["steps"], **(kw if guidance else {}), **extra)


def latents(imported, cfg: SolveConfig) -> torch.Tensor:
    model, meta = imported
    ref = outputs()
    return make_latents(
        model,
        objective_from_meta(meta["objective"]),
        ref["y_cond"],
        SeededNoise(ref["z"]),
        cfg,
        latent_shape=(C, S, S),
        device=torch.device("cpu"),
        precision="fp32",
    )


# --- import -------------------------------------------------------------------------------------


def test_import_reproduces_repas_forward(imported):
    model, _ = imported
    ref = outputs()
    with torch.no_grad():
        got = model(ref["x"], ref["t_forward"], ref["y"])  # REPA time in [0, 1] as it is
    assert got.shape == ref["forward"].shape
    assert_matches(got, ref["forward"])


def test_import_records_time_convention_and_projectors(imported):
    model, meta = imported
    objective = objective_from_meta(meta["objective"])
    assert isinstance(objective, FlowMatching)
    assert (objective.time_scale, objective.reverse_time, objective.timesteps) == (
        1.0,
        False,
        "uniform",
    )
    assert meta["objective"]["t0"] == "data" and objective.velocity_sign == 1.0  # v = eps - x0
    source = meta["source"]
    assert (source["format"], source["layout"], source["weights"]) == ("repa", "train", "ema")
    assert source["projectors"] == {
        "dropped_tensors": 6,
        "z_dims": MODEL["z_dims"],
        "projector_dim": MODEL["projector_dim"],
        "encoder_depth": MODEL["encoder_depth"],
        "enc_type": "dinov2-vit-b",
        "proj_coeff": 0.5,
        "kept": "projector.safetensors",  # beside the weights, for `train --init` (test_repa_train)
    }
    assert source["args"]["model"] == "SiT-B/2" and not source["sigma_dropped"]
    assert not any("projector" in k for k in model.state_dict())
    assert model.config["num_classes"] == MODEL["num_classes"] and not model.config["learn_sigma"]


def test_bare_layout_imports_the_model_weights(tmp_path, tiny_vae_dir):
    """The released last.pt layout: a bare state dict (generate.py load_state_dict's it as is)."""
    bare, args, layout = read_official(FIXTURES / "repa_bare.pt")
    model_weights, _, _ = read_official(FIXTURES / "repa_train.pt", "model")
    assert (layout, args) == ("bare", {}) and all(
        torch.equal(bare[k], model_weights[k]) for k in bare
    )
    import_repa(tmp_path / "run", tiny_vae_dir, "repa_bare.pt")
    model, meta = load_for_inference(tmp_path / "run")
    assert meta["source"]["layout"] == "bare"
    assert meta["source"]["projectors"]["encoder_depth"] is None  # a bare file cannot tell
    assert torch.equal(model.blocks[1].attn.qkv.weight, bare["blocks.1.attn.qkv.weight"])


def test_legacy_layout_is_renamed(tmp_path, tiny_vae_dir):
    """generate.py --legacy: blocks after encoder_depth stored as decoder_blocks.{i - depth}."""
    state = torch.load(FIXTURES / "repa_bare.pt", weights_only=True)
    depth = MODEL["encoder_depth"]

    def legacy(key: str) -> str:
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= depth:
            return ".".join(["decoder_blocks", str(int(parts[1]) - depth), *parts[2:]])
        return key

    torch.save({legacy(k): v for k, v in state.items()}, tmp_path / "legacy.pt")
    import_repa(tmp_path / "a", tiny_vae_dir, "repa_bare.pt")
    cfg = ImportConfig(
        checkpoint=tmp_path / "legacy.pt",
        run=tmp_path / "b",
        format="repa",
        vae=str(tiny_vae_dir),
        **TINY,
    )
    import_checkpoint(cfg)
    a, b = (load_for_inference(tmp_path / r)[0].state_dict() for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- samplers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_match_repas(imported, name, guidance):
    """repa-euler / repa-heun / repa-euler-maruyama = euler_sampler / heun / euler_maruyama_sampler,
    with cfg 1.8 on [0.3, 0.7] (steps outside it unguided) and without guidance."""
    ref = outputs()[f"{name}_{'cfg' if guidance else 'nocfg'}"]
    got = latents(imported, solve(SAMPLERS[name], guidance))
    assert got.dtype == torch.float32  # the latents' dtype; REPA's float64 state inside
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)
    assert_matches(got, ref)  # in fact ~1e-7: float32 model outputs


def test_fixture_noise_is_the_seeded_generators():
    """What REPA's euler_maruyama_sampler drew (recorded) is what SeededNoise gives."""
    ref = outputs()
    noise = SeededNoise(ref["z"])
    state = ref["z"].double()
    assert all(torch.equal(noise(state), draw) for draw in ref["sde_cfg_noise"])


def test_image_noise_is_drawn_like_the_float64_state():
    """Each image's own generator, in float64 for REPA's SDE state; the same alone or in a batch."""
    state = torch.empty(2, C, S, S, dtype=torch.float64)
    batch = ImageNoise(0, [5, 6])(state)
    assert batch.dtype == torch.float64
    assert torch.equal(batch[1:], ImageNoise(0, [6])(state[:1]))
    assert ImageNoise(0, [5])(state[:1].float()).dtype == torch.float32


def test_todays_heun_differs_from_repas(imported):
    """Today's heun corrects the last step and decides guidance per call: not REPA's Heun."""
    ref = outputs()["heun_cfg"]
    ours = latents(imported, solve("heun", True))
    assert float((ours.double() - ref).abs().max()) > 1e-4


def test_guide_at_decides_once_for_the_batch():
    y = torch.tensor([0, 1])

    def net(x, t, y):
        return x + y.view(-1, 1).float()  # cond rows: x + y, null rows (y = 5): x + 5

    fn = guided(net, y, scale=2.0, null_class=5, interval=(0.3, 0.7))
    x, t = torch.zeros(2, 1), torch.full((2,), 0.2)
    assert torch.equal(fn(x, t), net(x, t, y))  # per call: 0.2 is outside
    guided_rows = torch.tensor([[-5.0], [-3.0]])  # 5 + 2 (y - 5)
    assert torch.equal(fn(x, t, guide_at=0.3), guided_rows)  # the step's start decides
    assert torch.equal(fn(x, torch.full((2,), 0.5), guide_at=0.8), net(x, t, y))


def test_repa_fid_protocol(imported):
    cfg = protocol_solve("repa-fid")
    assert (cfg.sampler, cfg.steps, cfg.cfg, cfg.cfg_interval) == (
        "repa-euler-maruyama",
        250,
        1.8,
        (0.0, 0.7),
    )
    assert (cfg.cfg_channels, cfg.shift) == (None, 1.0)  # all channels, REPA's own grid
    assert protocol_solve("repa-fid", {"steps": 4}).steps == 4  # options given beside it win


# --- the projector-loss fixture (kept for REPA training) -----------------------------------------


def test_loss_fixture_is_self_consistent():
    """SILoss(v, linear, uniform): REPA's formula on the recorded tensors gives the recorded losses."""
    ref = outputs()
    x0, noise = ref["loss_x0"], ref["loss_noise"]
    g = torch.Generator().manual_seed(CONFIG["loss_seed"])  # SILoss drew t, then the noise
    assert torch.equal(torch.rand((len(x0), 1, 1, 1), generator=g).flatten(), ref["loss_time"])
    assert torch.equal(torch.randn(x0.shape, generator=g), noise)
    assert (
        ref["loss_zs"].shape == ref["loss_zs_tilde"].shape == (3, (S // 2) ** 2, MODEL["z_dims"][0])
    )
    target = -x0 + noise  # d_alpha x0 + d_sigma eps, alpha = 1 - t, sigma = t
    denoising = ((ref["loss_output"] - target) ** 2).mean(dim=(1, 2, 3))
    assert_matches(denoising, ref["loss_denoising"])
    cos = (F.normalize(ref["loss_zs"], dim=-1) * F.normalize(ref["loss_zs_tilde"], dim=-1)).sum(-1)
    proj = (-cos).mean(dim=1).sum() / (1 * len(x0))  # summed over samples / (len(zs) * batch)
    assert_matches(proj, ref["loss_proj"])


def test_loss_fixture_inputs_reach_the_imported_model(imported):
    """At the recorded x_t and t, the imported DiT gives REPA's output, and REPA's projector on its
    block `encoder_depth` output gives the recorded zs_tilde (projector weights: repa_train.pt)."""
    model, _ = imported
    ref = outputs()
    t = ref["loss_time"]
    x_t = (1 - t.view(-1, 1, 1, 1)) * ref["loss_x0"] + t.view(-1, 1, 1, 1) * ref["loss_noise"]
    seen = {}
    block = model.blocks[MODEL["encoder_depth"] - 1]
    handle = block.register_forward_hook(lambda m, args, out: seen.setdefault("h", out))
    with torch.no_grad():
        out = model(x_t, t, ref["loss_y"])
    handle.remove()
    assert_matches(out, ref["loss_output"])
    ema, _, _ = read_official(FIXTURES / "repa_train.pt")  # EMA weights, projectors included
    h = seen["h"]
    for i in (0, 2, 4):
        h = F.linear(h, ema[f"projectors.0.{i}.weight"], ema[f"projectors.0.{i}.bias"])
        h = F.silu(h) if i < 4 else h
    assert_matches(h, ref["loss_zs_tilde"])
