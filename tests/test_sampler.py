"""Sampler: solvers on a closed-form Gaussian, guidance, decoder-only VAE loading, sampling runs."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
import torch
from conftest import make_tiny_vae
from typer.testing import CliRunner

from foundation.autoencoders.loading import load_decoder
from foundation.errors import VaeLoadError
from latent_store import LatentditError
from sampler.decoder import LatentDecoder
from sampler.errors import SamplerError, VaeMismatchError
from sampler.guidance import guided
from sampler.plan import ImageNoise, plan_labels, resolve_class
from sampler.solvers import SOLVERS, sample_ddim, sample_ddpm
from trainer.objective import DDPM

runner = CliRunner()


# --- solvers on data x0 ~ N(MU, SIG^2) per dimension, whose exact predictions are closed form ------

MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
SIG = torch.tensor([0.5, 1.5], dtype=torch.float64)
ABAR = DDPM().alphas_cumprod  # linear betas, T = 1000


def flow_velocity(x, t, *, guide_at=None):
    """E[eps - x0 | x_t = x] on x_t = (1 - t) x0 + t eps: Gaussian conditioning, exact.

    `guide_at`: what REPA's solvers pass to a guided model function (no guidance here).
    """
    t = t.double()[:, None]
    m, var = (1 - t) * MU, (1 - t) ** 2 * SIG**2 + t**2
    cov = t - (1 - t) * SIG**2  # Cov(eps - x0, x_t)
    return (-MU + cov / var * (x.double() - m)).float()


def ddpm_eps(x, t):
    """E[eps | x_t = x] on x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: exact."""
    a = ABAR[t.long()][:, None]
    m, var = a.sqrt() * MU, a * SIG**2 + 1 - a
    return ((1 - a).sqrt() / var * (x.double() - m)).float()


def start_noise(kind: str, rows: int, standardize: bool) -> torch.Tensor:
    """Samples of the solver's starting distribution: N(0, 1) (flow) or exactly x_{T-1} (DDPM)."""
    z = torch.randn(rows, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if standardize:  # deterministic solvers: remove the sampling error, keep the solver's own
        z = (z - z.mean(0)) / z.std(0)
    if kind == "ddpm":
        a = ABAR[-1]
        z = a.sqrt() * MU + (a * SIG**2 + 1 - a).sqrt() * z
    return z.float()


def moment_error(kind, name, steps, **kw) -> float:
    solver = SOLVERS[name]
    x = start_noise(kind, 20_000 if solver.takes_noise else 2_000, not solver.takes_noise)
    if kind == "ddpm":
        out = solver.fn(ddpm_eps, x, steps, alphas_cumprod=ABAR, disable=True, **kw)
    else:
        out = solver.fn(flow_velocity, x, steps, disable=True, **kw)
    err = (out.double().mean(0) - MU).abs() + (out.double().std(0) - SIG).abs()
    return float(err.max())


# (solver, few steps, many steps, largest error at many steps)
CASES = [
    ("euler", 4, 200, 0.015),
    ("heun", 2, 50, 0.001),
    ("euler-maruyama", 4, 200, 0.04),  # stochastic: 20k draws put a ~0.02 floor on the error
    ("repa-euler", 4, 200, 0.015),
    ("repa-heun", 2, 50, 0.001),
    ("repa-euler-maruyama", 4, 200, 0.04),
    ("ddpm", 10, 1000, 0.03),
    ("ddim", 10, 250, 0.025),  # first order; a 1000-step schedule caps its steps
    ("dpm++2m", 10, 100, 0.002),
]


@pytest.mark.parametrize(("name", "few", "many", "tol"), CASES, ids=[c[0] for c in CASES])
def test_solvers_converge_to_the_gaussian(name, few, many, tol):
    """Every solver's mean and std approach the data's as steps grow, and are close at many steps."""
    assert {c[0] for c in CASES} == set(SOLVERS)
    kind = SOLVERS[name].kind
    coarse, fine = moment_error(kind, name, few), moment_error(kind, name, many)
    assert fine < coarse / 3, (coarse, fine)
    assert fine < tol, fine


def test_heun_is_second_order_and_the_shift_keeps_convergence():
    for name in ("heun", "repa-heun"):  # REPA's uncorrected last step keeps the order
        errors = [moment_error("flow_matching", name, s) for s in (4, 8, 16)]
        assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3, errors  # ~4x per halving
    assert moment_error("flow_matching", "heun", 50, shift=3.0) < 0.002


def test_ddim_with_eta_one_is_ddpm_ancestral():
    """DDIM's eta = 1 posterior equals DDPM's "fixed small" posterior, given the same noise."""
    x = start_noise("ddpm", 256, False)

    def runs(solver, **kw):
        gen = torch.Generator().manual_seed(1)
        noise = lambda like: torch.randn(like.shape, generator=gen)  # noqa: E731
        return solver(ddpm_eps, x, 20, alphas_cumprod=ABAR, noise=noise, disable=True, **kw)

    torch.testing.assert_close(runs(sample_ddim, eta=1.0), runs(sample_ddpm), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(runs(sample_ddim, eta=0.0), runs(sample_ddpm), atol=1e-2)


# --- guidance -----------------------------------------------------------------------------------


class RecordingNet:
    """A class-conditional model whose output differs per label on every channel; records calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        return x * (1 + y.float()[:, None, None, None]) + t[:, None, None, None] * 0.1


def test_guidance_formula_one_batched_forward_on_all_channels():
    x, t, y = torch.randn(3, 4, 2, 2), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    net = RecordingNet()
    out = guided(net, y, scale=4.0, null_class=3)(x, t)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    assert net.batches[0] == 6  # cond and uncond rows in one forward
    assert ((out - cond).abs().amax(dim=(0, 2, 3)) > 0).all()  # every channel is guided


def test_cfg_one_is_the_unguided_model_and_skips_the_uncond_pass():
    x, t, y = torch.randn(3, 4, 2, 2), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    net = RecordingNet()
    out = guided(net, y, scale=1.0, null_class=3)(x, t)
    assert torch.equal(out, net(x, t, y)) and net.batches == [3, 3]


def test_guidance_interval():
    x, y = torch.randn(2, 4, 2, 2), torch.tensor([0, 1])
    net = RecordingNet()
    fn = guided(net, y, scale=3.0, null_class=2, interval=(0.2, 0.6))
    outside = fn(x, torch.full((2,), 0.9))
    assert torch.equal(outside, net(x, torch.full((2,), 0.9), y)) and net.batches[0] == 2
    inside = fn(x, torch.full((2,), 0.4))
    assert not torch.equal(inside, net(x, torch.full((2,), 0.4), y)) and 4 in net.batches


# --- decoder-only VAE loading --------------------------------------------------------------------


def test_only_the_decoder_is_read(tiny_vae_dir, safetensors_reads):
    read = safetensors_reads
    vae = load_decoder(str(tiny_vae_dir)).model
    with safetensors.safe_open(tiny_vae_dir / "diffusion_pytorch_model.safetensors", "pt") as f:
        on_disk = list(f.keys())  # listing names reads no tensor
    assert any(k.startswith("encoder.") for k in on_disk)
    assert read and all(k.startswith(("decoder.", "post_quant_conv.")) for k in read)
    assert sorted(read) == sorted(k for k in on_disk if k.startswith(("decoder.", "post_quant")))
    names = [n for n, _ in vae.named_parameters()] + [n for n, _ in vae.named_buffers()]
    assert names and not [n for n in names if n.startswith(("encoder.", "quant_conv."))]
    assert vae.encoder is None and vae.quant_conv is None
    assert not any(t.is_meta for t in [*vae.parameters(), *vae.buffers()])

    from diffusers import AutoencoderKL

    full = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    z = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, full.decode(z).sample)


def test_pre_0_14_attention_names_are_renamed(tiny_vae_dir, tmp_path):
    """VAEs saved before diffusers 0.14 (e.g. the SD VAEs) name attention query/key/value/proj_attn."""
    import shutil

    from safetensors.torch import load_file, save_file

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(tiny_vae_dir / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for k, v in state.items():
        for new, legacy in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        renamed[k] = v
    assert "decoder.mid_block.attentions.0.query.weight" in renamed
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(tiny_vae_dir, legacy_dir)
    save_file(renamed, legacy_dir / "diffusion_pytorch_model.safetensors")
    z = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        expected = load_decoder(str(tiny_vae_dir)).decode(z)
        torch.testing.assert_close(load_decoder(str(legacy_dir)).decode(z), expected)


def test_hub_ids_resolve_through_the_hub_cache_offline(tiny_vae_dir, tmp_path, monkeypatch):
    """A hub pipeline repo (VAE in vae/) found in the HF cache with HF_HUB_OFFLINE=1, no network."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--acme--tiny-diffusion"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_vae_dir, repo / "snapshots" / commit / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = load_decoder("acme/tiny-diffusion").model
    assert vae.encoder is None and vae.config.latent_channels == 4
    with pytest.raises(VaeLoadError, match="--vae acme/absent: cannot load its decoder"):
        load_decoder("acme/absent")


def checkpoint_meta_for(vae_dir, **vae):
    return {
        "latent_shape": [4, 4, 4],
        "normalization": {"kind": "channel_stats", "mean": [0.1, 0.2, -0.3, 0.4], "std": [2.0] * 4},
        "vae": {"id": "the/store-vae", "scaling_factor": 0.5, "shift_factor": None, **vae},
    }


def test_a_mismatched_vae_is_refused_naming_both(tiny_vae_dir, tmp_path):
    meta = checkpoint_meta_for(tiny_vae_dir)
    decoder = LatentDecoder.load(str(tiny_vae_dir), meta)
    z = torch.randn(2, 4, 4, 4)
    raw = z * 2.0 + torch.tensor([0.1, 0.2, -0.3, 0.4]).view(1, 4, 1, 1)  # x = z * std + mean
    images = decoder(z)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
    assert torch.equal(images, decoder.ae.decode_to_uint8(raw))
    assert not torch.equal(images, decoder.ae.decode_to_uint8(z))
    wide = make_tiny_vae(tmp_path / "wide", latent_channels=8)
    with pytest.raises(VaeMismatchError, match=r"latent channels 4 \(checkpoint.*vs 8 \(VAE"):
        LatentDecoder.load(str(wide), meta)
    with pytest.raises(VaeMismatchError, match=r"scaling_factor 0.18215 \(checkpoint.*vs 0.5"):
        LatentDecoder.load(
            str(tiny_vae_dir), checkpoint_meta_for(tiny_vae_dir, scaling_factor=0.18215)
        )
    with pytest.raises(LatentditError, match="nowhere: no such folder"):
        load_decoder(str(tmp_path / "nowhere"))


# --- what to make --------------------------------------------------------------------------------

CLASSES = [
    {"index": 0, "id": "n01440764", "name": "tench, Tinca tinca"},
    {"index": 1, "id": "n01443537", "name": "goldfish"},
    {"index": 2, "id": "n01484850", "name": "great white shark"},
]


def test_classes_by_index_id_or_name():
    names = ("2", "n01443537", "Tench", "tinca tinca", "Great_White_Shark")
    assert [resolve_class(c, CLASSES) for c in names] == [2, 1, 0, 0, 2]
    with pytest.raises(SamplerError, match=r"--class 'carp'.*'n01440764'"):
        resolve_class("carp", CLASSES)
    with pytest.raises(SamplerError, match="out of range"):
        resolve_class("3", CLASSES)


def test_fid_mode_is_class_balanced():
    labels = plan_labels(classes=CLASSES, requested=(), n=1, fid_samples=30, seed=0)
    assert len(labels) == 30 and np.bincount(labels).tolist() == [10, 10, 10]
    with pytest.raises(SamplerError, match="not a multiple of the 3 classes"):
        plan_labels(classes=CLASSES, requested=(), n=1, fid_samples=31, seed=0)
    random = plan_labels(classes=CLASSES, requested=(), n=12, fid_samples=None, seed=5)
    assert len(random) == 12 and set(random) <= {0, 1, 2}
    picked = plan_labels(
        classes=CLASSES, requested=("goldfish", "0"), n=2, fid_samples=None, seed=0
    )
    assert picked.tolist() == [1, 1, 0, 0]


def test_image_noise_depends_on_the_image_not_the_batch():
    like = torch.empty(1, 4, 3, 3)
    alone = ImageNoise(7, [5])(like)[0]
    batch = ImageNoise(7, [4, 5, 6])(torch.empty(3, 4, 3, 3))
    assert torch.equal(batch[1], alone) and not torch.equal(batch[0], alone)
    assert not torch.equal(ImageNoise(8, [5])(like)[0], alone)
