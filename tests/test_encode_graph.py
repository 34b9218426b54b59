"""The fused encode graph: uint8 crops to uint8 codes on the device, as the unfused path."""

from __future__ import annotations

import pytest
import torch

from latent_store.quantize import calibrate, quantize
from pipeline.encode_graph import BatchLauncher, EncodeGraph
from pipeline.vae import VaeConfig, encode_variants, load_vae

KEYS = [f"n0/{i}.JPEG" for i in range(5)]


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
