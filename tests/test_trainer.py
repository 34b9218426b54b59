"""The trainer: DiT presets, objectives, normalization, checkpoints, the training loop and CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import write_store
from typer.testing import CliRunner

from latent_store import LatentStore
from trainer.checkpoint import (
    CheckpointNotFoundError,
    capture_rng_state,
    checkpoint_meta,
    load_checkpoint,
    load_for_inference,
    restore_rng_state,
    save_checkpoint,
)
from trainer.config import resolve_config
from trainer.data import BatchLayout, DataError, build_batches
from trainer.model import DIT_PRESETS, DiT, ModelConfigError, build_model, forward_flops
from trainer.normalization import LatentNormalization, NormalizationError, normalization_from_store
from trainer.objective import DDPM, FlowMatching, ObjectiveError, drop_labels, objective_from_meta
from trainer.presets import has_head
from trainer.step import lr_at

CPU = torch.device("cpu")
runner = CliRunner()


TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}

# Parameters of our DiT for 4x32x32 latents and 1000 classes (1001 label rows, 4 output channels,
# fixed positions in a buffer), and the paper-equivalent count: the reference implementation also
# counts its frozen (1, T, D) position table as a parameter and predicts 8 channels (learn_sigma).
PRESET_PARAMS = {
    "DiT-S/1": 32_849_668,
    "DiT-B/1": 130_285_060,
    "DiT-L/1": 457_799_684,
    "DiT-XL/1": 674_788_612,
    "DiT-S/2": 32_858_896,
    "DiT-S/4": 32_895_808,
    "DiT-S/8": 33_043_456,
    "DiT-B/2": 130_303_504,
    "DiT-B/4": 130_377_280,
    "DiT-B/8": 130_672_384,
    "DiT-L/2": 457_824_272,
    "DiT-L/4": 457_922_624,
    "DiT-L/8": 458_316_032,
    "DiT-XL/2": 674_816_272,
    "DiT-XL/4": 674_926_912,
    "DiT-XL/8": 675_369_472,
}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}  # DiT paper, Table 1 (millions)


def reference_count(model: DiT) -> int:
    """Our count plus what the reference adds: the frozen position table and the sigma outputs."""
    c = model.config
    tokens = (c["input_size"] // c["patch_size"]) ** 2
    sigma_outputs = c["patch_size"] ** 2 * c["in_channels"]
    own = sum(p.numel() for p in model.parameters())
    return own + tokens * c["hidden_size"] + sigma_outputs * (c["hidden_size"] + 1)


@pytest.mark.parametrize("preset", [p for p in DIT_PRESETS if not has_head(p)])
def test_preset_parameter_counts(preset):
    with torch.device("meta"):
        model = build_model(preset, input_size=32, in_channels=4, num_classes=1000)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PRESET_PARAMS[preset]
    assert model.y_embedder.weight.shape[0] == 1001 and model.null_class == 1000
    size = preset.split("-")[1].split("/")[0]
    assert reference_count(model) / 1e6 == pytest.approx(PAPER_PARAMS_M[size], rel=0.01)
    if preset == "DiT-XL/2":
        assert reference_count(model) == 675_129_632
        assert forward_flops(model.config) / 2 == pytest.approx(118.6e9, rel=0.01)


def tiny_model(**kw) -> DiT:
    torch.manual_seed(0)
    args = {"input_size": 8, "in_channels": 4, "num_classes": 3, "patch_size": 2, **TINY, **kw}
    model = DiT(**args)
    for p in model.parameters():  # leave DiT's zero init so outputs depend on every input
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize(
    "kw", [{}, {"pos_embed": "rope", "qk_norm": True}, {"grad_checkpointing": True}]
)
def test_forward_shapes_and_conditioning(kw):
    model = tiny_model(**kw)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 500.0, 999.0])
    out = model(x, t, torch.tensor([0, 1, 3]))
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, torch.tensor([1, 1, 3])))
    assert not torch.allclose(out, model(x, t + 1, torch.tensor([0, 1, 3])))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_autocast_forward():
    model = tiny_model(pos_embed="rope", qk_norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([5.0, 50.0]), torch.tensor([0, 3]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_grad_checkpointing_gives_the_same_gradients():
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([0, 2])
    grads = []
    for ckpt in (False, True):
        model = tiny_model(grad_checkpointing=ckpt)
        model(x, t, y).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"input_size": 6, "patch_size": 4}, "not divisible by patch size 4"),
        ({"pos_embed": "learned"}, "pos_embed 'learned'"),
        ({"num_heads": 3}, "not divisible by 3 heads"),
    ],
)
def test_bad_model_configs(kw, match):
    with pytest.raises(ModelConfigError, match=match):
        tiny_model(**kw)
    with pytest.raises(ModelConfigError, match="unknown model preset 'DiT-M/2'"):
        build_model("DiT-M/2", input_size=32, in_channels=4, num_classes=10)


def test_flow_matching_loss_and_meta():
    fm = FlowMatching(timesteps="uniform")
    x0, y = torch.randn(64, 4, 8, 8), torch.zeros(64, dtype=torch.long)
    seen = {}

    def oracle(x_t, t, y):  # knows x0, so it can return the exact velocity
        seen["t"] = t
        tt = (t / 1000).view(-1, 1, 1, 1)
        eps = (x_t - (1 - tt) * x0) / tt
        return eps - x0

    loss = fm.loss(oracle, x0, y, torch.Generator().manual_seed(0)).value
    assert loss.item() < 1e-6 and seen["t"].min() >= 0 and seen["t"].max() <= 1000
    assert fm.loss(lambda x, t, y: torch.zeros_like(x), x0, y, torch.Generator()).value.item() > 1.5
    assert objective_from_meta(json.loads(json.dumps(fm.to_meta()))) == fm
    t = FlowMatching().sample_t((20000,), torch.Generator().manual_seed(0), "cpu")
    assert abs(t.median().item() - 0.5) < 0.02 and t.std().item() < 0.25  # logit-normal(0, 1)
    with pytest.raises(ObjectiveError, match="timesteps 'beta'"):
        FlowMatching(timesteps="beta")


def test_global_batch_draws_do_not_depend_on_the_split():
    fm, x0 = FlowMatching(), torch.randn(8, 4, 8, 8)
    y = torch.arange(8) % 3

    def model(x, t, y):
        return x * t.view(-1, 1, 1, 1) / 1000

    def per_row(offset, n):
        g = torch.Generator().manual_seed(5)
        ys = drop_labels(y[offset : offset + n], 0.5, 3, g, offset=offset, total=8)
        return ys, fm.loss(model, x0[offset : offset + n], ys, g, offset=offset, total=8).value

    y_all, whole = per_row(0, 8)
    (y_a, a), (y_b, b) = per_row(0, 4), per_row(4, 4)
    assert torch.equal(torch.cat([y_a, y_b]), y_all) and (y_all == 3).any()
    torch.testing.assert_close((a + b) / 2, whole)


def test_ddpm_schedules():
    linear, cosine = DDPM().alphas_cumprod, DDPM(schedule="cosine").alphas_cumprod
    assert linear.dtype == torch.float64 and linear.shape == (1000,)
    assert linear[0].item() == pytest.approx(1 - 1e-4)
    assert linear[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # Ho et al.'s abar_T
    assert (cosine.diff() < 0).all() and cosine[-1].item() < 1e-8
    x0 = torch.randn(16, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert DDPM().loss(lambda x, t, y: torch.zeros_like(x), x0, None, g).value.item() > 0.8
    assert objective_from_meta(DDPM(schedule="cosine").to_meta()) == DDPM(schedule="cosine")
    with pytest.raises(ObjectiveError, match="schedule 'sqrt'"):
        DDPM(schedule="sqrt")


def test_normalization_from_store(store_path):
    store = LatentStore(store_path)
    stats = normalization_from_store(store, "channel_stats")
    assert stats.mean == pytest.approx(store.summary["channel_mean"])
    vae = normalization_from_store(store, "vae_scaling")
    assert vae.mean == (0.0,) * 4 and vae.std == (2.0,) * 4  # tiny VAE: scaling_factor 0.5
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(stats.denormalize(stats.normalize(x)), x)
    assert LatentNormalization.from_meta(stats.to_meta()) == stats
    with pytest.raises(NormalizationError, match="'minmax' is not one of"):
        normalization_from_store(store, "minmax")


def test_checkpoint_round_trip(tmp_path, store_path):
    model, ema = tiny_model(), tiny_model(pos_embed="sincos")
    ema.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    store = LatentStore(store_path)
    meta = checkpoint_meta(
        preset="DiT-S/2",
        model=model,
        objective=FlowMatching(),
        normalization=normalization_from_store(store, "channel_stats"),
        store=store,
    )
    state = {"rng": capture_rng_state(), "data": {"epoch": 1, "step_in_epoch": 2}}
    expected = torch.rand(3)  # the first draw after the captured state
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-0000004-99").mkdir(parents=True)  # as a killed writer leaves it
    for step in (5, 10, 15):
        save_checkpoint(
            run, step=step, model=model, ema=ema, train_state=state, meta=meta, keep_last=2
        )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "0000010",
        "0000015",
        "latest",
    ]
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000015"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 900.0]), torch.tensor([2, 3])
    for weights, module in (("ema", ema), ("model", model)):
        loaded, meta_back = load_for_inference(run, weights=weights)
        assert not loaded.training and meta_back["step"] == 15
        assert torch.equal(loaded(x, t, y), module(x, t, y))
    assert meta_back["classes"][2] == {"index": 2, "id": "n00000002", "name": "class 2"}
    assert meta_back["vae"]["scaling_factor"] == 0.5 and meta_back["latent_shape"] == [4, 8, 8]
    ckpt = load_checkpoint(run / "checkpoints" / "0000010")
    assert ckpt.meta["step"] == 10 and ckpt.train_state["data"]["epoch"] == 1
    restore_rng_state(ckpt.train_state["rng"])
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint here"):
        load_for_inference(tmp_path / "empty")


def test_tiny_run_fixture_meets_the_contract(tiny_run):
    model, meta = load_for_inference(tiny_run, weights="ema")
    assert meta["step"] == 2 and meta["model"]["preset"] == "DiT-S/2"
    assert objective_from_meta(meta["objective"]) == FlowMatching()
    norm = LatentNormalization.from_meta(meta["normalization"])
    assert norm.kind == "channel_stats" and len(norm.std) == 4
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([10.0, 990.0]), torch.tensor([model.null_class, 0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_flops_grow_with_tokens():
    with torch.device("meta"):
        small = build_model("DiT-S/4", input_size=32, in_channels=4, num_classes=10).config
    big = {**small, "patch_size": 2}
    assert 3.5 < forward_flops(big) / forward_flops(small) < 4.5
    assert math.isfinite(forward_flops(small))


# --- data -----------------------------------------------------------------------------------------


def _layout(batch=8, accum=1, rank=0, world=1):
    return BatchLayout(batch_size=batch, grad_accum=accum, rank=rank, world_size=world)


def test_memory_batches_do_not_depend_on_world_size(tmp_path):
    store = LatentStore(write_store(tmp_path / "s.zarr", n=24, variants=2))
    norm = normalization_from_store(store, "channel_stats")

    def batches(rank, world, accum):
        data = build_batches(
            store, norm, _layout(8, accum, rank, world), mode="memory", seed=3, device=CPU
        )
        assert data.steps_per_epoch == 3
        return [data.get(epoch, step) for epoch in (0, 1) for step in range(3)]

    one = batches(0, 1, 1)
    two = list(zip(batches(0, 2, 1), batches(1, 2, 1), strict=True))
    for whole, (a, b) in zip(one, two, strict=True):
        assert torch.equal(whole[0]["latents"], torch.cat([a[0]["latents"], b[0]["latents"]]))
        assert torch.equal(whole[0]["labels"], torch.cat([a[0]["labels"], b[0]["labels"]]))
    labels = torch.cat([b[0]["labels"] for b in one[:3]])
    assert sorted(labels.tolist()) == sorted((torch.arange(24) % 3).tolist())  # one epoch
    assert not torch.equal(one[0][0]["latents"], one[3][0]["latents"])  # a new order each epoch
    accum = batches(0, 1, 2)
    assert torch.equal(
        torch.cat([accum[0][0]["latents"], accum[0][1]["latents"]]), one[0][0]["latents"]
    )
    mean = torch.cat([b[0]["latents"] for b in one]).mean(dim=(0, 2, 3))
    assert mean.abs().max() < 0.3  # channel_stats normalization centers the channels


def test_stream_batches_resume_mid_epoch(tmp_path):
    store = LatentStore(write_store(tmp_path / "s.zarr", n=40, shard=8, chunk=4))
    norm = normalization_from_store(store, "vae_scaling")
    layout = _layout(4, 1, 1, 2)
    data = build_batches(store, norm, layout, mode="stream", seed=0, device=CPU, shuffle_shards=2)
    assert data.steps_per_epoch == 8  # each of 2 ranks holds at least 2 shards of 8 samples
    seq = [data.get(0, k)[0]["labels"] for k in range(data.steps_per_epoch)]
    fresh = build_batches(store, norm, layout, mode="stream", seed=0, device=CPU, shuffle_shards=2)
    assert torch.equal(fresh.get(0, 5)[0]["labels"], seq[5])
    assert torch.equal(fresh.get(0, 6)[0]["labels"], seq[6])
    with pytest.raises(DataError, match="not divisible by world size 2"):
        _layout(5, 1, 0, 2)


def test_lr_schedule():
    cfg = resolve_config(None, {"store": "s", "run": "r", "warmup_steps": 10, "steps": 110})
    assert lr_at(0, cfg) == pytest.approx(1e-5) and lr_at(9, cfg) == lr_at(100, cfg) == 1e-4
    cosine = dataclasses.replace(cfg, cosine_decay=True, min_lr=1e-6)
    assert lr_at(60, cosine) == pytest.approx((1e-4 + 1e-6) / 2) and lr_at(110, cosine) == 1e-6
