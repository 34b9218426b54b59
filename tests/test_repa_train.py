"""REPA training against the official code's loss, its parts, and what it refuses.

The projector-loss fixture (tests/fixtures/official/repa_outputs.pt `loss_*`, see the README
there) was made by running sihyun-yu/REPA's `SILoss` on its tiny SiT: the DiT weights import as
`latentdit import --format repa` does, the projector reaches the model through `--init`.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import write_store
from safetensors.torch import load_file
from test_import import FIXTURES, assert_matches
from test_repa import CONFIG, MODEL, TINY, import_repa, outputs
from test_trainer_runs import tiny_options
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from cli import app
from sampler.importer import read_official
from testkit.features import add_features
from trainer.checkpoint import init_weights, load_for_inference
from trainer.model import build_model, forward_flops
from trainer.normalization import LatentNormalization
from trainer.objective import FlowMatching
from trainer.repa import Alignment, alignment_loss, tokens_on_grid
from trainer.train import build_model_for_store

runner = CliRunner()
REPA_MODEL = {  # the fixture's SiT with its projector, as latentdit's DiT
    "input_size": MODEL["input_size"],
    "in_channels": MODEL["in_channels"],
    "num_classes": MODEL["num_classes"],
    **TINY,
    "repa_depth": MODEL["encoder_depth"],
    "repa_projector_dim": MODEL["projector_dim"],
    "repa_features_dim": MODEL["z_dims"][0],
}
REPA = {"repa_coeff": 0.5, "repa_depth": 1, "repa_projector_dim": 16}  # training options


def train_args(options: dict) -> list[str]:
    """`latentdit train` with `options` as flags (True: a bare switch such as --reg)."""
    flags = [(f"--{k.replace('_', '-')}", v) for k, v in options.items()]
    return ["train", *[a for f, v in flags for a in ((f,) if v is True else (f, str(v)))]]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_vae_dir):
    run = tmp_path_factory.mktemp("import-repa")
    import_repa(run, tiny_vae_dir)
    return run


def init_from(imported, model_config: dict):
    """A DiT initialized from the imported fixture through `--init`'s code path."""
    model = build_model("DiT-S/2", **model_config)
    meta = json.loads((imported / "checkpoints" / "0000000" / "meta.json").read_text())
    norm = LatentNormalization.from_meta(meta["normalization"])
    objective = init_weights(
        model, imported, objective=FlowMatching(timesteps="uniform"), normalization=norm
    )
    return model, objective


def test_projector_loss_equals_repas(imported):
    """For the fixture's batch, noise and time (a generator seeded as SILoss's torch seed, REPA's
    uniform time), the REPA loss's terms are SILoss's denoising and projection losses."""
    ref = outputs()
    model, objective = init_from(imported, REPA_MODEL)
    assert (objective.timesteps, objective.time_scale) == ("uniform", 1.0)  # REPA's, kept
    kept = load_file(imported / "checkpoints" / "0000000" / "projector.safetensors")
    ema, _, _ = read_official(FIXTURES / "repa_train.pt")
    for i in (0, 2, 4):
        for kind in ("weight", "bias"):
            theirs = ema[f"projectors.0.{i}.{kind}"]
            assert torch.equal(kept[f"projector.{i}.{kind}"], theirs)
            assert torch.equal(model.state_dict()[f"projector.{i}.{kind}"], theirs)
    batch = {"latents": ref["loss_x0"], "features": ref["loss_zs"].transpose(1, 2)}  # (B, D, T)
    alignment = Alignment(objective=objective, coeff=0.5, grid=model.grid)
    g = torch.Generator().manual_seed(CONFIG["loss_seed"])
    with torch.no_grad():
        loss = alignment.batch_loss(model, batch, ref["loss_y"], g)
    assert set(loss.terms) == {"mse", "proj"}
    assert_matches(loss.terms["proj"], ref["loss_proj"])
    assert_matches(loss.terms["mse"], ref["loss_denoising"].mean())
    assert loss.value == loss.terms["mse"] + 0.5 * loss.terms["proj"]


def test_projected_tokens_are_repas_zs_tilde(imported):
    ref = outputs()
    model, _ = init_from(imported, REPA_MODEL)
    t = ref["loss_time"].view(-1, 1, 1, 1)
    x_t = (1 - t) * ref["loss_x0"] + t * ref["loss_noise"]
    with torch.no_grad():
        out, projected = model(x_t, ref["loss_time"], ref["loss_y"], align=True)
        plain = model(x_t, ref["loss_time"], ref["loss_y"])
    assert_matches(out, ref["loss_output"])
    assert_matches(projected, ref["loss_zs_tilde"])
    assert torch.equal(plain, out)  # aligning reads the trunk; it changes nothing downstream


def test_init_keeps_a_projector_only_where_its_widths_fit(imported, caplog):
    narrow = {**REPA_MODEL, "repa_projector_dim": 16}  # REPA's is 48 wide
    torch.manual_seed(0)
    fresh = build_model("DiT-S/2", **narrow).state_dict()
    torch.manual_seed(0)
    model, _ = init_from(imported, narrow)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh.items() if k.startswith("projector."))
    assert "has a projector of other shapes" in caplog.text and "starts fresh" in caplog.text
    plain, _ = init_from(imported, {k: v for k, v in REPA_MODEL.items() if "repa" not in k})
    assert plain.projector is None  # a run without REPA fine-tunes from a REPA import as well


# --- the parts --------------------------------------------------------------------------------


def test_alignment_loss_is_negative_cosine_per_token():
    z = torch.randn(2, 5, 3)
    assert alignment_loss(z, z).item() == pytest.approx(-1.0)
    assert alignment_loss(3 * z, z).item() == pytest.approx(-1.0)  # scale-free
    assert alignment_loss(-z, z).item() == pytest.approx(1.0)
    a, b = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    assert alignment_loss(a, b).item() == 0.0
    halves = torch.cat([z, -z], dim=1)  # half the tokens aligned, half opposed: the mean is 0
    assert alignment_loss(halves, torch.cat([z, z], dim=1)).item() == pytest.approx(0.0, abs=1e-6)


def test_stored_token_grids_are_resampled_to_the_dits():
    """(B, D, T) row-major tokens: the same grid is only transposed; a finer DiT grid gets the
    bilinear upsampling, a coarser one the means of the blocks it covers."""
    grid = torch.arange(16.0).view(1, 1, 16)  # token r * 4 + c holds r * 4 + c
    assert torch.equal(tokens_on_grid(grid, 4), grid.transpose(1, 2))
    down = tokens_on_grid(grid, 2)[0, :, 0]
    assert down.tolist() == [2.5, 4.5, 10.5, 12.5]  # mean(0, 1, 4, 5), mean(2, 3, 6, 7), ...
    up = tokens_on_grid(grid, 8)[0, :, 0].view(8, 8)
    assert up.shape == (8, 8) and torch.all(up[:, 1:] >= up[:, :-1]) and up[7, 7] == 15.0
    assert torch.equal(tokens_on_grid(torch.full((2, 3, 16), 7.0), 8), torch.full((2, 64, 3), 7.0))


def test_sampling_loads_the_model_without_its_projector(tmp_path):
    store = add_features(write_store(tmp_path / "s.zarr", n=16), tokens=16)
    run = tmp_path / "run"
    result = runner.invoke(app, train_args(tiny_options(store, run, steps=1, **REPA)))
    assert result.exit_code == 0, result.output
    weights = load_file(run / "checkpoints" / "0000001" / "ema.safetensors")
    assert {"projector.0.weight", "projector.4.bias"} <= set(weights)
    loaded, meta = load_for_inference(run)
    assert loaded.projector is None and "repa_depth" not in loaded.config
    assert meta["model"]["config"]["repa_depth"] == 1  # the checkpoint still says what it was
    state = loaded.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in state)


@pytest.mark.parametrize("reg", [False, True], ids=["repa", "reg"])
def test_flops_count_the_projector_and_the_class_token(reg):
    """forward_flops of a training forward (align=True) against torch's FlopCounterMode."""
    sizes = {"repa_depth": 1, "repa_projector_dim": 16, "repa_features_dim": 24}
    sizes |= {"reg_dim": 24} if reg else {}
    model = build_model("DiT-S/2", input_size=8, in_channels=4, num_classes=3, **TINY, **sizes)
    x = torch.randn(2, 4 * 64 + 24) if reg else torch.randn(2, 4, 8, 8)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x, torch.rand(2), torch.tensor([0, 1]), align=True)
    assert forward_flops(model.config) == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    plain = build_model("DiT-S/2", input_size=8, in_channels=4, num_classes=3, **TINY)
    if not reg:
        extra = forward_flops(model.config) - forward_flops(plain.config)
        assert extra == 2 * 16 * (32 * 16 + 16 * 16 + 16 * 24)  # tokens x the MLP's multiply-adds


# --- bad input: one line, nothing written ----------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store without features, its copy with features (REG's class token too), and a second
    copy whose features differ."""
    root = tmp_path_factory.mktemp("repa-stores")
    plain = write_store(root / "plain.zarr", n=16, variants=2)
    for name, seed in (("features", 0), ("other", 1)):
        shutil.copytree(plain, root / f"{name}.zarr")
        add_features(root / f"{name}.zarr", tokens=16, cls=True, seed=seed)
    return root


BAD = [
    (
        "plain",
        {"repa_coeff": 0.5, "repa_depth": 1},
        r"--repa-coeff needs the vision encoder's 'features' in the store, and .*plain.zarr has only latents: encode it with `latentdit encode \.\.\. --features ENCODER`",
    ),
    (
        "features",
        {"repa_coeff": 0.5, "repa_depth": 3},
        r"--repa-depth 3 is beyond --model DiT-S/2's 2 trunk blocks: give --repa-depth in \[1, 2\]",
    ),
    ("features", {"repa_coeff": 0.5}, r"--repa-depth 8 is beyond --model DiT-S/2's 2 trunk blocks"),
    (
        "features",
        {"repa_depth": 1},
        r"--repa-depth and --repa-projector-dim set REPA's projector: give --repa-coeff too",
    ),
    ("features", {"repa_coeff": 0.0}, r"--repa-coeff must be > 0"),
    (
        "features",
        {"reg": True},
        r"--reg trains with REPA's alignment, as REG does: give --repa-coeff",
    ),
    (
        "features",
        {"reg_coeff": 0.1, **REPA},
        r"--reg-coeff weighs REG's class-token loss: give --reg",
    ),
    (
        "features",
        {"reg": True, **REPA, "model": "DiT-DH-S/2", "head_width": 32, "head_heads": 2},
        r"--reg needs a DiT without the DDT head",
    ),
]


@pytest.mark.parametrize(("store", "options", "match"), BAD)
def test_bad_repa_input_is_one_line_and_writes_nothing(stores, tmp_path, store, options, match):
    run = tmp_path / "run"
    options = tiny_options(stores / f"{store}.zarr", run, steps=1, **options)
    result = runner.invoke(app, train_args(options))
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert re.search(match, result.output), result.output
    assert not run.exists()


def test_reg_needs_the_class_token_and_square_grids(tmp_path):
    plain = write_store(tmp_path / "s.zarr", n=16)
    shutil.copytree(plain, tmp_path / "t.zarr")
    add_features(plain, tokens=16)  # patch tokens, no class token
    add_features(tmp_path / "t.zarr", tokens=12)  # a 3 x 4 grid: not the square a DiT makes
    for store, options, match in (
        (plain, {**REPA, "reg": True}, r"--reg needs the vision encoder's 'features_cls' in the"),
        (tmp_path / "t.zarr", REPA, r"'features' \(24, 12\): 12 feature tokens are not a square"),
    ):
        options = tiny_options(store, tmp_path / "run", steps=1, **options)
        result = runner.invoke(app, train_args(options))
        assert result.exit_code == 2 and re.search(match, result.output), result.output
        assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_resume_on_other_features_is_refused(stores, tmp_path):
    """The run's checkpoint records the features (layout, description, checksums); a store whose
    features differ (same latents) is refused, naming what differs, and the run stays as it was."""
    run = tmp_path / "run"
    options = tiny_options(stores / "features.zarr", run, steps=2, **REPA)
    assert runner.invoke(app, train_args(options)).exit_code == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = {**options, "store": str(stores / "other.zarr"), "steps": 3}
    result = runner.invoke(app, train_args(again))
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    differs = r"fingerprint: 'blake2b-128:\w+' \(run\) vs 'blake2b-128:\w+' \(store\)"
    assert re.search(
        rf"0000002 was trained on other 'features' than the store holds \({differs}\)",
        result.output,
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_model_is_sized_to_the_stores_features(stores):
    from latent_store import open_store
    from trainer.config import resolve_config

    store = open_store(stores / "features.zarr")
    cfg = resolve_config(None, tiny_options(store.path, "unused", **REPA, reg=True))
    model = build_model_for_store(cfg, store)
    sizes = {"repa_depth": 1, "repa_projector_dim": 16, "repa_features_dim": 24, "reg_dim": 24}
    assert {k: model.config[k] for k in sizes} == sizes
