"""The fused encode graph: uint8 crops to uint8 codes on the device, as the unfused path."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from foundation.compile import COMPILE_MODES, uses_cuda_graphs
from latent_store import LatentditError
from latent_store.quantize import calibrate, quantize
from pipeline import encode_config
from pipeline.encode import make_launcher
from pipeline.encode_config import EncodeConfig
from pipeline.encode_graph import BatchLauncher, EncodeGraph
from pipeline.vae import VaeConfig, encode_variants, load_vae

KEYS = [f"n0/{i}.JPEG" for i in range(5)]
CFG = EncodeConfig(source=Path("."), out="unused.zarr", batch_size=8).for_device("cpu")
CL = torch.channels_last


@pytest.fixture(scope="module")
def vae(tiny_vae_dir):
    return load_vae(VaeConfig(id=str(tiny_vae_dir)))[0]


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return torch.randint(
        0,
        256,
        (len(KEYS), 32, 32, 3),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.uint8,
    )


@pytest.mark.parametrize("posterior", ["mean", "sample", "moments"])
@pytest.mark.parametrize("flip", [False, True])
def test_graph_equals_the_unfused_path(vae, crops, posterior, flip):
    """Eager on the CPU in fp32 the graph gives today's codes bit for bit (and the same clips)."""
    mean, logstd = encode_variants(vae, crops, KEYS, flip=flip, posterior=posterior)
    quant = calibrate(mean[:2], lower_percentile=5, upper_percentile=95, margin=0)  # some clip
    log_quant = calibrate(logstd) if logstd is not None else None
    want, want_clipped = quantize(mean, quant)
    graph = EncodeGraph(vae, quant=quant, posterior=posterior, flip=flip, logstd_quant=log_quant)
    launcher = BatchLauncher(
        graph, device=vae.device, latent_shape=(4, 4, 4), variants=1 + flip, posterior=posterior
    )
    out = launcher.launch(crops, KEYS).wait()
    assert out.codes.dtype == torch.uint8 and out.codes.shape == want.shape
    assert torch.equal(out.codes, want)
    assert want_clipped > 0 and int(out.clipped.sum()) == want_clipped
    if posterior == "moments":
        assert torch.equal(out.logstd, quantize(logstd, log_quant)[0])


def test_static_batch_padding_and_nchw_input(vae, crops):
    """Padded to a static batch (as --compile runs it) or fed NCHW, the codes stay the same."""
    mean, _ = encode_variants(vae, crops, KEYS, flip=True, posterior="sample")
    quant = calibrate(mean)
    kw = dict(device=vae.device, latent_shape=(4, 4, 4), variants=2, posterior="sample")
    nhwc = EncodeGraph(vae, quant=quant, posterior="sample", flip=True)
    want = BatchLauncher(nhwc, **kw).launch(crops, KEYS).wait()
    padded = BatchLauncher(nhwc, static_batch=8, **kw).launch(crops, KEYS).wait()
    assert padded.codes.shape == want.codes.shape and padded.clipped.shape == (len(KEYS),)
    diff = (padded.codes.int() - want.codes.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99  # batch size may move rounding
    nchw = EncodeGraph(vae, quant=quant, posterior="sample", flip=True, layout="NCHW")
    out = BatchLauncher(nchw, **kw).launch(crops.permute(0, 3, 1, 2), KEYS).wait()
    assert torch.equal(out.codes, want.codes)


class ReusedOutputs(nn.Module):
    """A stand-in for a graph replayed as a CUDA graph: every call writes its codes into the same
    output buffer (as torch.compile's reduce-overhead does on a GPU) and returns that buffer."""

    def __init__(self, latent_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.latent_shape, self.out = latent_shape, None

    def forward(self, crops, noise=None):
        codes = crops.float().mean((1, 2, 3)).to(torch.uint8).view(-1, 1, 1, 1, 1)
        codes = codes.expand(-1, 1, *self.latent_shape)
        if self.out is None:
            self.out = (codes.clone(), torch.zeros(len(crops), dtype=torch.int64), None)
        self.out[0].copy_(codes)
        self.out[1].copy_(crops.flatten(1)[:, 0])
        return self.out


@pytest.mark.parametrize("static_batch", [None, 8])
def test_a_batch_is_copied_out_before_the_next_launch(crops, static_batch):
    """Batch k's host outputs stay batch k's after batch k+1 is launched into the same buffers
    (the CUDA graph output aliasing bug: reading k back after k+1 overwrote it)."""
    launcher = BatchLauncher(
        ReusedOutputs((4, 4, 4)),
        device=torch.device("cpu"),
        latent_shape=(4, 4, 4),
        variants=1,
        posterior="mean",
        static_batch=static_batch,
    )
    first = launcher.launch(crops, KEYS)
    second = launcher.launch(255 - crops, KEYS)  # as encode_shards: k+1 launched before k is read
    a, b = first.wait(), second.wait()
    assert torch.equal(a.codes[:, 0, 0, 0, 0], crops.float().mean((1, 2, 3)).to(torch.uint8))
    assert torch.equal(a.clipped, crops.flatten(1)[:, 0].long())
    assert not torch.equal(a.codes, b.codes) and torch.equal(b.clipped, 255 - a.clipped)


def test_cuda_graph_modes_mark_every_launch_a_new_step(vae, crops, monkeypatch):
    """In a CUDA graph mode each launch tells torch's graph trees a new step begins (else they
    keep recording new graphs while the last outputs are alive); other modes leave them alone."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    quant = calibrate(encode_variants(vae, crops, KEYS, flip=False, posterior="mean")[0])
    spec = SimpleNamespace(quant=quant, logstd_quant=None, latent_shape=(4, 4, 4), variants=(0,))
    for mode, want in [("default", 0), ("reduce-overhead", 3), ("max-autotune", 3)]:
        marks.clear()
        cfg = replace(CFG, compile=True, compile_mode=mode)
        launcher = make_launcher(cfg, vae, spec)
        launcher.graph = EncodeGraph(vae, quant=quant)  # the eager graph: no compile needed here
        for _ in range(3):
            launcher.launch(crops, KEYS).wait()
        assert len(marks) == want, mode


def test_one_batch_shape_when_compiled_or_autotuned(vae, crops):
    """Padded to --batch-size when compiled or under --cudnn-benchmark (cuDNN times each new
    shape again); eager and untuned, batches run as they come (bit for bit the unfused path)."""
    spec = SimpleNamespace(quant=None, logstd_quant=None, latent_shape=(4, 4, 4), variants=(0,))
    spec.quant = calibrate(encode_variants(vae, crops, KEYS, flip=False, posterior="mean")[0])
    for changes, static in [({}, None), ({"cudnn_benchmark": True}, 8), ({"compile": True}, 8)]:
        assert make_launcher(replace(CFG, **changes), vae, spec).static_batch == static, changes


def test_cuda_graph_modes_are_torchs():
    """The modes that replay CUDA graphs are those torch's mode table turns them on in."""
    table = torch._inductor.list_mode_options()
    assert set(COMPILE_MODES) <= set(table)
    for mode in COMPILE_MODES:
        assert uses_cuda_graphs(mode) == bool(table[mode].get("triton.cudagraphs")), mode


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_compile_mode_gives_the_eager_codes(vae, crops, mode):
    """--compile in each --compile-mode runs on the CPU (where no CUDA graphs are made) and gives
    the eager graph's codes within one code, over several launches (the pipelined order)."""
    mean, _ = encode_variants(vae, crops, KEYS, flip=True, posterior="mean")
    quant = calibrate(mean)
    spec = SimpleNamespace(quant=quant, logstd_quant=None, latent_shape=(4, 4, 4), variants=(0, 1))
    want = quantize(mean, quant)[0]
    launcher = make_launcher(replace(CFG, compile=True, compile_mode=mode, flip=True), vae, spec)
    assert launcher.static_batch == CFG.batch_size  # one shape: no recompiles, CUDA graphs
    launched = [launcher.launch(crops[: len(KEYS) - i], KEYS[: len(KEYS) - i]) for i in range(3)]
    for i, got in enumerate(x.wait() for x in launched):
        diff = (got.codes.int() - want[: len(KEYS) - i].int()).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, mode


def test_mid_block_attention_runs_on_sdpa(vae, crops):
    """The loaded VAE's attention keeps diffusers' SDPA processor, and the encode graph's forward
    does call F.scaled_dot_product_attention (once per mid-block attention)."""
    assert {type(p).__name__ for p in vae.model.attn_processors.values()} == {"AttnProcessor2_0"}

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.sdpa = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.sdpa += func is F.scaled_dot_product_attention
            return func(*args, **(kwargs or {}))

    quant = calibrate(encode_variants(vae, crops, KEYS, flip=False, posterior="mean")[0])
    with torch.inference_mode(), Calls() as calls:
        EncodeGraph(vae, quant=quant)(crops)
    assert calls.sdpa == len(vae.model.encoder.mid_block.attentions) >= 1


def test_channels_last_through_the_encoder(vae, crops):
    """Weights and activations stay channels_last: every conv's weight and input and every 4-D
    GroupNorm input in the graph (the mid-block attention normalizes (b, C, h*w) tokens instead)."""
    convs = [m for m in vae.model.modules() if isinstance(m, nn.Conv2d) and m.weight.ndim == 4]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    seen = []

    def check(module, args):
        if args[0].ndim == 4:
            seen.append((type(module).__name__, args[0].is_contiguous(memory_format=CL)))

    hooks = [
        m.register_forward_pre_hook(check)
        for m in vae.model.modules()
        if isinstance(m, (nn.Conv2d, nn.GroupNorm))
    ]
    quant = calibrate(encode_variants(vae, crops, KEYS, flip=False, posterior="mean")[0])
    try:
        with torch.inference_mode():
            EncodeGraph(vae, quant=quant)(crops)
    finally:
        for h in hooks:
            h.remove()
    assert {name for name, _ in seen} == {"Conv2d", "GroupNorm"}
    assert all(ok for _, ok in seen), [name for name, ok in seen if not ok]


def test_speed_options_resolve_per_device(monkeypatch):
    """Unset speed options take the device's defaults (CUDA_DEFAULTS on a GPU: the one line a GPU
    measurement changes); options given are kept; a mode without compiling is refused."""
    base = EncodeConfig(source=Path("."), out="x.zarr")
    speed = ("compile", "compile_mode", "cudnn_benchmark")
    assert [getattr(base, k) for k in speed] == [None, None, None]
    monkeypatch.setattr(encode_config, "CUDA_DEFAULTS", {})
    for device in ("cpu", "cuda"):
        assert [getattr(base.for_device(device), k) for k in speed] == [False, None, False]
    fast = {"compile": True, "compile_mode": "reduce-overhead", "cudnn_benchmark": True}
    monkeypatch.setattr(encode_config, "CUDA_DEFAULTS", fast)
    cuda, off = base.for_device("cuda"), replace(base, compile=False, cudnn_benchmark=False)
    assert [getattr(cuda, k) for k in speed] == [True, "reduce-overhead", True]
    assert cuda.for_device("cuda") == cuda and base.for_device("cpu") == off
    given = replace(base, compile=False, cudnn_benchmark=False).for_device("cuda")
    assert [getattr(given, k) for k in speed] == [False, None, False]
    assert replace(base, compile_mode="default").for_device("cuda").compile_mode == "default"
    with pytest.raises(LatentditError, match=r"--compile-mode default .*add --compile"):
        replace(base, compile_mode="default").for_device("cpu")
