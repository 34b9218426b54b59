"""What a sampling run records and how it is cut: pixel settings on resume, the batch-size probe,
batch-independent images, the writer thread, the model rows the guidance interval runs."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from sampler import outputs
from sampler.batch_size import REFINE, pick_batch_size, probe_batch_size
from sampler.config import SampleConfig, SolveConfig
from sampler.errors import SamplerError
from sampler.latents import make_latents
from sampler.plan import ImageNoise
from sampler.sample import sample
from sampler.writer import HostImages
from testkit import make_checkpoint, tiny_dit
from trainer.objective import DDPM, FlowMatching

KW = {"classes": ("1",), "n": 5, "npz": True, "png": False, "batch_size": 2}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_vae_dir):
    run = tmp_path_factory.mktemp("settings") / "run"
    make_checkpoint(run, tiny_vae_dir)
    return run


def config(run, out, *, steps=2, cfg=2.0, sampler=None, interval=None, **kw) -> SampleConfig:
    solve = SolveConfig(steps=steps, cfg=cfg, sampler=sampler, cfg_interval=interval)
    return SampleConfig(checkpoint=run, out=out, solve=solve, **kw)


@pytest.fixture(scope="module")
def cut_run(flow_run, tmp_path_factory):
    """A run of 5 images interrupted after its first part (images 0, 1), made eager in fp32."""
    out = tmp_path_factory.mktemp("cut") / "out"
    real, parts = outputs.write_part, []

    def crash_after_one(*args, **kw):
        if parts:
            raise KeyboardInterrupt("killed")
        parts.append(args[1])
        real(*args, **kw)

    outputs.write_part = crash_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            sample(config(flow_run, out, **KW))
    finally:
        outputs.write_part = real
    assert outputs.done_parts(out) == [(0, 2)]
    return out


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_manifest_records_the_pixel_settings(cut_run):
    settings = json.loads((cut_run / outputs.MANIFEST).read_text())
    assert {k: settings[k] for k in ("precision", "compile", "cast_weights")} == {
        "precision": "fp32",  # resolved: the CPU's default
        "compile": None,
        "cast_weights": False,
    }


@pytest.mark.parametrize(
    ("changed", "match"),
    [
        ({"precision": "bf16"}, r"precision 'fp32' there vs 'bf16' now\); resume with the "
         r"settings there \(--precision fp32\) or choose another --out"),
        ({"compile": "default"}, r"compile None there vs 'default' now\).*\(no --compile\)"),
        ({"cast_weights": True, "precision": "bf16"},
         r"precision 'fp32' there vs 'bf16' now; cast_weights False there vs True now\).*"
         r"\(--precision fp32 --no-cast-weights\)"),
        ({"seed": 1}, r"seed 0 there vs 1 now\).*\(--seed 0\)"),
        ({"steps": 3, "cfg": 1.5}, r"steps 2 there vs 3 now; cfg 2.0 there vs 1.5 now\).*"
         r"\(--steps 2 --cfg 2.0\)"),
    ],
)  # fmt: skip
def test_a_resume_with_changed_pixel_settings_is_refused_and_loses_nothing(
    flow_run, cut_run, tmp_path, changed, match
):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    before = snapshot(out)
    with pytest.raises(SamplerError, match=match) as refused:
        sample(config(flow_run, out, **{**KW, **changed}))
    assert "\n" not in str(refused.value)
    assert snapshot(out) == before


def test_an_unchanged_resume_finishes_the_run(flow_run, cut_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    resumed = sample(config(flow_run, out, **KW))
    whole = sample(config(flow_run, tmp_path / "whole", **KW))
    assert resumed.made == 3 and resumed.npz.read_bytes() == whole.npz.read_bytes()


def test_an_old_manifest_resumes_with_the_defaults_of_its_time(flow_run, cut_run, tmp_path):
    """A sample.json without precision/compile/cast_weights: eager, as stored, the device default."""
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    path = out / outputs.MANIFEST
    old = {k: v for k, v in json.loads(path.read_text()).items()}
    for key in ("precision", "compile", "cast_weights"):
        del old[key]
    path.write_text(json.dumps(old, indent=2))
    with pytest.raises(SamplerError, match=r"precision 'fp32' there vs 'bf16' now"):
        sample(config(flow_run, out, **{**KW, "precision": "bf16"}))
    with pytest.raises(SamplerError, match=r"compile None there vs 'default' now"):
        sample(config(flow_run, out, **{**KW, "compile": "default"}))
    assert sample(config(flow_run, out, **KW)).made == 3
    assert json.loads(path.read_text()) == old  # left as it was


# --- the batch-size probe --------------------------------------------------------------------------


class FakeFits:
    """fits(b) for a device where batches up to `limit` fit; records the trials."""

    def __init__(self, limit: int) -> None:
        self.limit, self.tried = limit, []

    def __call__(self, b: int) -> bool:
        self.tried.append(b)
        return b <= self.limit


@pytest.mark.parametrize(
    ("limit", "start", "cap", "expected"),
    [
        (300, 16, 1024, 288),  # 16..256 fit, 512 not; bisected to within 1/16 of 300
        (1000, 16, 1024, 992),
        (5000, 16, 1024, 1024),  # the cap fits
        (5000, 16, 1000, 1000),  # a cap that is not a power of two times start
        (7, 16, 1024, 7),  # not even the start fits: bisect below it
        (1, 16, 1024, 1),
        (64, 64, 64, 64),
        (40, 100, 64, 40),  # start above the cap starts at the cap
    ],
)
def test_the_probe_finds_the_largest_batch_that_fits(limit, start, cap, expected):
    fits = FakeFits(limit)
    probe = probe_batch_size(fits, start=start, cap=cap)
    assert probe.batch == expected <= min(limit, cap)
    assert probe.batch >= min(limit, cap) * (1 - 1 / REFINE) - 1
    assert [b for b, _, _ in probe.trials] == fits.tried and len(fits.tried) <= 20
    assert all(ok == (b <= limit) for b, ok, _ in probe.trials)


def test_the_probe_refuses_when_nothing_fits():
    with pytest.raises(SamplerError, match="--auto-batch: not even a batch of 1 fits"):
        probe_batch_size(FakeFits(0), start=16, cap=1024)


def test_auto_batch_probes_on_cuda_only():
    made = []

    def make_fits():
        made.append(1)
        return FakeFits(100)

    cpu = torch.device("cpu")
    assert pick_batch_size(16, 1024, cpu, make_fits) == (16, None) and not made
    assert pick_batch_size(16, None, torch.device("cuda"), make_fits) == (16, None) and not made
    batch, probe = pick_batch_size(16, 1024, torch.device("cuda"), make_fits)  # a fake trial
    assert batch == probe.batch == 100 and made == [1]


class FakeCuda:
    """torch.cuda's memory functions for a device of `total` bytes, its peak set by the model."""

    def __init__(self, monkeypatch, total: int) -> None:
        self.peak, self.total = 0, total
        for name, fn in {
            "empty_cache": lambda: None,
            "synchronize": lambda device=None: None,
            "mem_get_info": lambda device=None: (self.total, self.total),
            "memory_allocated": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: setattr(self, "peak", 0),
            "max_memory_allocated": lambda device=None: self.peak,
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_a_cuda_trial_fails_on_out_of_memory_and_above_the_headroom(monkeypatch):
    """CudaFits on the CPU with torch.cuda's memory calls faked: 1 byte per model row."""
    from sampler.batch_size import HEADROOM, CudaFits

    cuda = FakeCuda(monkeypatch, total=1000)
    rows = []

    def model(x, t, y):
        rows.append(len(x))
        if len(x) > 1200:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(x) == 666:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        cuda.peak = len(x)
        return x

    decoded = []
    fits = CudaFits(
        model, lambda z: decoded.append(len(z)), latent_shape=(4, 2, 2),
        device=torch.device("cpu"), precision="fp32",
    )  # fmt: skip
    assert fits.budget == 1000 * (1 - HEADROOM)
    assert fits(400) and fits.last_peak == 800 and rows == [800] and decoded == [400]
    assert not fits(460) and fits.last_peak == 920  # fits in memory, not in the headroom
    assert not fits(700) and fits.last_peak is None  # out of memory
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not a miss: raised
        fits(333)
    assert probe_batch_size(fits, start=16, cap=1024).batch == 448  # 2 x 448 rows <= 900


def test_auto_batch_on_the_cpu_keeps_the_batch_size(flow_run, tmp_path):
    result = sample(
        config(flow_run, tmp_path / "o", classes=("0",), n=3, batch_size=2, auto_batch=64)
    )
    assert result.batch_size == 2 and result.probe is None and result.made == 3
    with pytest.raises(SamplerError, match="--auto-batch must be >= 1"):
        config(flow_run, tmp_path / "o", auto_batch=0)


# --- images do not depend on the batch; writes happen off the sampling thread ---------------------


def test_batch_3_and_batch_8_make_the_same_npz(flow_run, tmp_path):
    """Per-image generators: an SDE solver (noise every step) and the guidance interval."""
    kw = {"classes": ("0", "2"), "n": 6, "npz": True, "png": False, "grid": False}
    solve = {"steps": 4, "cfg": 3.0, "sampler": "euler-maruyama", "interval": (0.0, 0.6)}
    three = sample(config(flow_run, tmp_path / "b3", batch_size=3, **kw, **solve))
    eight = sample(config(flow_run, tmp_path / "b8", batch_size=8, **kw, **solve))
    with np.load(three.npz) as a, np.load(eight.npz) as b:
        a, b = a["arr_0"].astype(int), b["arr_0"].astype(int)
    assert a.shape == b.shape == (12, 32, 32, 3)
    diff = np.abs(
        a - b
    )  # batched matmuls may round differently per batch size: a rare 1-level step
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert len({im.tobytes() for im in a}) == 12


def test_pngs_and_parts_are_written_on_the_writer_thread(flow_run, tmp_path, monkeypatch):
    """The sampling thread hands decoded images over and never waits for them itself."""
    threads: dict[str, set[str]] = {"png": set(), "part": set(), "numpy": set()}

    def on_thread(kind, fn):
        def wrapped(*args, **kw):
            threads[kind].add(threading.current_thread().name)
            return fn(*args, **kw)

        return wrapped

    monkeypatch.setattr(outputs, "write_png", on_thread("png", outputs.write_png))
    monkeypatch.setattr(outputs, "write_part", on_thread("part", outputs.write_part))
    monkeypatch.setattr(HostImages, "numpy", on_thread("numpy", HostImages.numpy))
    result = sample(config(flow_run, tmp_path / "o", classes=("1",), n=5, batch_size=2, npz=True,
                           grid=False))  # fmt: skip
    assert result.made == 5 and len(list((tmp_path / "o" / "images").glob("*.png"))) == 5
    main = threading.current_thread().name
    for kind, names in threads.items():
        assert names and main not in names, (kind, names)
        assert all(n.startswith("sample-writer") for n in names), (kind, names)


# --- the guidance interval: which rows reach the model ---------------------------------------------


class CountingDiT:
    """A tiny DiT that records the rows and labels of every call."""

    def __init__(self) -> None:
        self.model = tiny_dit().eval()
        self.config, self.null_class, self.calls = self.model.config, self.model.null_class, []

    def __call__(self, x, t, y):
        self.calls.append((len(x), y.tolist()))
        return self.model(x, t, y)


LABELS = [0, 1, 2]
COND, BOTH = (3, LABELS), (6, LABELS + [3] * 3)  # 3 = the null class


@pytest.mark.parametrize(
    ("objective", "solve", "calls"),
    [
        # Heun 4: t = 1, .75 | .75, .5 | .5, .25 | .25, 0; inside [0, 0.6] from the 4th call on
        (FlowMatching(), SolveConfig(sampler="heun", steps=4, cfg=3.0, cfg_interval=(0.0, 0.6)),
         [COND] * 3 + [BOTH] * 5),
        (FlowMatching(), SolveConfig(sampler="heun", steps=2, cfg=3.0), [BOTH] * 4),
        (FlowMatching(), SolveConfig(sampler="euler", steps=3, cfg=1.0), [COND] * 3),
        # DDPM 5 trailing steps: 999, 799, 599, 399, 199; the interval [0, 0.5] is t <= 500
        (DDPM(), SolveConfig(sampler="ddim", steps=5, cfg=2.0, cfg_interval=(0.0, 0.5)),
         [COND] * 3 + [BOTH] * 2),
        (DDPM(), SolveConfig(sampler="ddpm", steps=5, cfg=2.0, cfg_interval=(0.7, 1.0)),
         [BOTH] * 2 + [COND] * 3),
    ],
)  # fmt: skip
def test_outside_the_guidance_interval_only_the_conditional_rows_run(objective, solve, calls):
    net = CountingDiT()
    z = make_latents(
        net, objective, torch.tensor(LABELS), ImageNoise(0, range(3)), solve,
        latent_shape=(4, 4, 4), device=torch.device("cpu"), precision="fp32",
    )  # fmt: skip
    assert net.calls == calls
    assert z.shape == (3, 4, 4, 4) and torch.isfinite(z).all()


def test_the_decoder_decodes_in_chunks(flow_run, tiny_vae_dir, monkeypatch):
    """Its memory stays that of one chunk at any batch; the images are those of one call."""
    from sampler import decoder as decoder_module
    from trainer.checkpoint import load_for_inference

    _, meta = load_for_inference(flow_run)
    decoder = decoder_module.LatentDecoder.load(str(tiny_vae_dir), meta)
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = decoder(z)
    sizes = []
    real = decoder.ae.decode_to_uint8
    monkeypatch.setattr(decoder_module, "DECODE_CHUNK", 2)
    monkeypatch.setattr(
        decoder.ae, "decode_to_uint8", lambda x, **kw: sizes.append(len(x)) or real(x, **kw)
    )
    chunked = decoder(z)
    assert sizes == [2, 2, 1] and chunked.shape == whole.shape == (5, 32, 32, 3)
    assert (chunked.int() - whole.int()).abs().max() <= 1
