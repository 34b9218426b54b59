"""The DDT head (RAE's DiT^DH) and patch-1 presets: RAE's own outputs, parameter and FLOP counts,
the head-less DiT unchanged, recomputation, bad configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sampler.errors import CheckpointImportError
from sampler.import_config import ImportConfig
from sampler.importer import import_checkpoint
from trainer.config import ConfigError, resolve_config
from trainer.ddt_head import DDTHead
from trainer.model import DiT, ModelConfigError, build_model, forward_flops, model_from_config
from trainer.presets import DDT_HEAD, DIT_PRESETS, PATCH_SIZES, has_head

FIXTURES = Path(__file__).parent / "fixtures"
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
TINY_HEAD = {"head_depth": 2, "head_width": 48, "head_heads": 3}


def tiny(
    preset: str = "DiT-DH-S/1", *, size: int = 4, channels: int = 8, seed: int = 0, **kw
) -> DiT:
    torch.manual_seed(seed)
    extra = {**TINY, **(TINY_HEAD if has_head(preset) else {}), **kw}
    return build_model(preset, input_size=size, in_channels=channels, num_classes=3, **extra)


def randomized(model: DiT, seed: int = 1) -> DiT:
    """Random weights everywhere (no zero init), so outputs depend on every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(model: DiT, batch: int = 3, seed: int = 2):
    c, size = model.config["in_channels"], model.config["input_size"]
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, c, size, size, generator=g), torch.rand(batch, generator=g) * 1000
    return x, t, torch.arange(batch) % (model.null_class + 1)


# --- RAE's own code -------------------------------------------------------------------------------


def test_head_matches_raes_ddt_head():
    """RAE's DiTwDDTHead (tests/fixtures/official/make_rae_fixture.py ran it): given the same trunk
    tokens and timestep embedding, our head gives RAE's output, with RAE's weights mapped."""
    ref = torch.load(FIXTURES / "official" / "rae_ddt_head.pt", weights_only=True)
    state = ref["head_state"]
    trunk_depth = min(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    conv = state["x_embedder.proj.weight"]  # (W, C, p, p) -> (W, p p C), our patch order
    ours = {
        "x_embedder.weight": conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1),
        "x_embedder.bias": state["x_embedder.proj.bias"],
    }
    for key, value in state.items():
        if key.startswith(("s_projector.", "final_layer.", "blocks.")):
            key = key.replace("s_projector.", "projector.").replace("norm_final.", "norm.")
            if key.startswith("blocks."):
                _, i, rest = key.split(".", 2)
                key = f"blocks.{int(i) - trunk_depth}.{rest}"
            ours[key] = value
    x, trunk, t_emb = ref["x"], ref["trunk"], ref["t_emb"]
    width, channels = state["s_projector.weight"].shape[0], x.shape[1]
    head = DDTHead(
        trunk_width=trunk.shape[-1],
        width=width,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        patch_values=channels,
        out_values=channels,
        qk_norm=False,
        rope_grid=x.shape[-1],
    )
    head.load_state_dict(ours)  # strict: every parameter mapped, none left over
    with torch.no_grad():
        out = head(rearrange(x, "b c h w -> b (h w) c"), trunk, t_emb)
    got = rearrange(out, "b (h w) c -> b c h w", h=x.shape[-2])
    scale = float(ref["out"].abs().max())
    torch.testing.assert_close(got, ref["out"], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("preset", "head_params"), [("DiT-DH-XL/1", 164_970_580), ("DiT-DH-S/1", 163_397_716)]
)
def test_dh_presets_have_raes_head(preset, head_params):
    """RAE's DiTDH-XL and DiTDH-S on DINOv2-B latents (768x16x16): the head's parameters as
    counted from RAE's DiTwDDTHead; the trunk is the DiT preset's."""
    with torch.device("meta"):
        model = build_model(preset, input_size=16, in_channels=768, num_classes=1000)
        plain = build_model(
            preset.replace("DiT-DH", "DiT"), input_size=16, in_channels=768, num_classes=1000
        )
    assert (
        {k: model.config[k] for k in DDT_HEAD}
        == DDT_HEAD
        == {"head_depth": 2, "head_width": 2048, "head_heads": 16}
    )
    assert sum(p.numel() for p in model.head.parameters()) == head_params
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    final = sum(p.numel() for p in plain.final_layer.parameters())
    assert trunk == sum(p.numel() for p in plain.parameters()) - final  # no trunk final layer


def test_every_patch_size_has_presets_for_each_family():
    assert PATCH_SIZES[0] == 1
    for p in PATCH_SIZES:
        assert (
            DIT_PRESETS[f"DiT-XL/{p}"]["patch_size"]
            == DIT_PRESETS[f"DiT-DH-XL/{p}"]["patch_size"]
            == p
        )
    with pytest.raises(ModelConfigError, match=r"one of \[1, 2, 4\]"):
        tiny("DiT-S/8", size=12)


# --- the head-less DiT is today's -----------------------------------------------------------------


def _golden():
    spec = importlib.util.spec_from_file_location(
        "make_dit_golden", FIXTURES / "golden" / "make_dit_golden.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dit_without_a_head_is_unchanged():
    """Recorded with main before the head existed (tests/fixtures/golden): the same initialization
    bit for bit (its RNG draws pin the module order), outputs and gradients; no head keys in the
    config, so checkpoints of head-less models are as before."""
    golden = _golden()
    ref = torch.load(FIXTURES / "golden" / "dit_golden.pt", weights_only=True)
    digests = dict(
        line.split()
        for line in (FIXTURES / "golden" / "dit_golden_init.txt").read_text().splitlines()
    )
    for i, (preset, kw) in enumerate(golden.CASES):
        got, want = golden.run_case(i, preset, kw), ref[f"{i}:{preset}"]
        assert got["init_sha256"] == digests[f"{i}:{preset}"], preset
        torch.testing.assert_close(got["out"], want["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["bf16"], want["bf16"], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got["grads"], want["grads"], rtol=1e-4, atol=1e-7)
    model = tiny("DiT-S/2")
    assert model.head is None and not any(k.startswith("head") for k in model.config)
    assert model.num_blocks == 2 and model.transformer_blocks == list(model.blocks)


# --- the head -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"pos_embed": "rope", "qk_norm": True}, {"learn_sigma": True}])
def test_head_forward_conditioning_and_gradients(kw):
    fresh = tiny(**kw)
    x, t, y = inputs(fresh)
    assert torch.equal(fresh(x, t, y), torch.zeros(3, fresh.out_channels, 4, 4))  # zeroed output
    assert fresh.final_layer is None and fresh.num_blocks == 4
    model = randomized(fresh)
    out = model(x, t, y)
    assert out.shape == (3, model.out_channels, 4, 4)
    assert not torch.allclose(out, model(x, t, (y + 1) % 4))
    assert not torch.allclose(out, model(x, t + 1, y))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    rebuilt = model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x, t, y), out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, t, y).float()).all()


def test_recomputed_blocks_count_the_head_and_keep_the_gradients():
    grads = []
    for blocks in (0, 2, 3, 4):  # none, the trunk, the trunk and one head block, all
        model = randomized(tiny())
        model.checkpoint_blocks = blocks
        model(*inputs(model)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    assert tiny(grad_checkpointing=True).checkpoint_blocks == 4


@pytest.mark.parametrize(
    ("preset", "kw"),
    [
        ("DiT-S/1", {}),
        ("DiT-S/2", {"learn_sigma": True}),
        ("DiT-DH-S/1", {}),
        ("DiT-DH-S/2", {"pos_embed": "rope"}),
        ("DiT-DH-S/1", {"head_width": 32, "head_heads": 2}),
    ],
)
def test_forward_flops_match_a_direct_count(preset, kw):
    """forward_flops against torch's FlopCounterMode on the real forward (math attention, which
    it can see): both count the matrix products, so they agree (exactly, today)."""
    model = tiny(preset, size=8, **kw)
    x, t, y = inputs(model, batch=2)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert forward_flops(model.config) == pytest.approx(counter.get_total_flops() / 2, rel=0.02)


def test_head_flops_at_raes_size():
    """DiT-DH-XL/1 on 768x16x16: the head adds ~85 GFLOP to the trunk's ~238 per forward."""
    with torch.device("meta"):
        dh = build_model("DiT-DH-XL/1", input_size=16, in_channels=768, num_classes=1000).config
        xl = build_model("DiT-XL/1", input_size=16, in_channels=768, num_classes=1000).config
    assert forward_flops(dh) / 1e9 == pytest.approx(323.16, abs=0.01)
    assert forward_flops(xl) / 1e9 == pytest.approx(238.12, abs=0.01)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"head_width": None}, "needs both a depth and a width"),
        ({"head_heads": 5}, "head width 48 is not divisible by 5"),
        ({"pos_embed": "rope", "head_heads": 8}, "head size divisible by 4, got 6 in the head"),
        ({"head_depth": 0}, "must be >= 1"),
    ],
)
def test_bad_head_configs(kw, match):
    with pytest.raises(ModelConfigError, match=match):
        tiny(**kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"head_heads": 4}, "--model DiT-S/2 has no head: give --head-depth"),
        ({"head_width": 0}, "must be >= 1"),
        ({"head_width": 64}, "--head-depth and --head-width make the DDT head together"),
        ({"model": "DiT-DH-S/1", "checkpoint_blocks": 15}, r"in \[0, 14\] \(the model's blocks"),
    ],
)
def test_bad_head_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(None, {"store": "s", "run": "r", "model": "DiT-S/2", **kw})


def test_official_checkpoints_import_without_a_head(tmp_path):
    """Official DiT/SiT weights have no DDT head: a DiT-DH preset is refused, naming the plain ones."""
    cfg = ImportConfig(
        checkpoint=FIXTURES / "official" / "dit_train.pt",
        run=tmp_path / "run",
        format="dit",
        vae="unused",
        model="DiT-DH-S/2",
        **TINY,
    )
    with pytest.raises(CheckpointImportError, match=r"without a DDT head .* DiT-S/1, DiT-S/2"):
        import_checkpoint(cfg)
    assert not (tmp_path / "run").exists()
