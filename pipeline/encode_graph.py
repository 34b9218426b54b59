"""The encode graph: uint8 crops in, uint8 codes out, every step on the device.

    graph = EncodeGraph(ae, quant=spec.quant, posterior="mean", flip=True)
    out = graph(crops)     # uint8 (b, H, W, 3) -> out.codes uint8 (b, V, C, h, w)

One module does, in one pass on the device, what `encode_variants` then `quantize` do: the flip
variant stacked into the same batch, to float in the model's image range, channels_last, the
autoencoder's own `encode` (`foundation.autoencoders`: a KL model's encoder, `quant_conv` and
posterior moments, FLUX.2's patchify and BatchNorm normalization, a DC-AE, an RAE's ViT), a
posterior sample from noise given as input, and the per-channel uint8 quantization of the store
(`latent_store.quantize_codes`, the arithmetic `quantize` runs). Only uint8 codes and the
per-sample clip counts leave the GPU, and `torch.compile` sees the whole encode as one graph
(GroupNorm + SiLU fusion, the quantization folded into the last layer's epilogue). Eager, it
computes exactly what `encode_variants` + `quantize` compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from latent_store import QuantParams
from latent_store.arrays import LATENTS, LOGSTD
from latent_store.quantize import quantize_codes
from pipeline.vae import key_seed, posterior_latents, posterior_noise

LAYOUTS = ("NHWC", "NCHW")


@dataclass(frozen=True)
class EncodedBatch:
    """What one batch leaves the device as."""

    codes: torch.Tensor  # uint8 (b, V, C, h, w): the posterior mean or sample, quantized
    clipped: torch.Tensor  # int64 (b,): values of each crop (all variants) clipped by quantization
    logstd: torch.Tensor | None  # uint8 (b, V, C, h, w) quantized log std (posterior "moments")

    def named(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({array name: codes}, {array name: clipped per crop}), as the store names them."""
        arrays = {LATENTS: self.codes} | ({LOGSTD: self.logstd} if self.logstd is not None else {})
        return arrays, {LATENTS: self.clipped}


def _channel_buffer(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


class EncodeGraph(nn.Module):
    """uint8 crops to uint8 latent codes (see the module docstring); shares the model's weights."""

    def __init__(
        self,
        ae,
        *,
        quant: QuantParams,
        posterior: str = "mean",
        flip: bool = False,
        logstd_quant: QuantParams | None = None,
        layout: str = "NHWC",
    ) -> None:
        super().__init__()
        assert layout in LAYOUTS, f"layout {layout!r} is not one of {LAYOUTS}"
        assert (posterior == "moments") == (logstd_quant is not None), "moments need logstd_quant"
        ae.check_posterior(posterior)
        self.ae, self.model = ae, ae.model  # the model registered: the graph holds its weights
        self.posterior, self.flip, self.layout = posterior, flip, layout
        self.variants = 2 if flip else 1
        device = ae.device
        self.register_buffer("offset", _channel_buffer(quant.offset).to(device), persistent=False)
        self.register_buffer("scale", _channel_buffer(quant.scale).to(device), persistent=False)
        if logstd_quant is not None:
            self.register_buffer(
                "logstd_offset", _channel_buffer(logstd_quant.offset).to(device), persistent=False
            )
            self.register_buffer(
                "logstd_scale", _channel_buffer(logstd_quant.scale).to(device), persistent=False
            )

    def model_input(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops (b, H, W, 3) or (b, 3, H, W), with their flips when asked, to the encoder's
        input: (V*b, 3, H, W) in the image range, the model's dtype, channels_last."""
        width = 2 if self.layout == "NHWC" else 3
        views = torch.cat([crops, crops.flip(width)]) if self.flip else crops
        return self.ae.to_input(views.permute(0, 3, 1, 2) if self.layout == "NHWC" else views)

    def forward(
        self, crops: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """crops uint8 (b, ...) as `layout` says; noise float32 (V*b, C, h, w) for "sample"
        (variant-major: all crops' first variant, then all their flips). Returns the fields of an
        `EncodedBatch` as a tuple (codes, clipped, logstd codes or None)."""
        b = crops.shape[0]
        mean, logstd = self.ae.encode(self.model_input(crops))
        latents = posterior_latents(mean, logstd, self.posterior, noise)
        codes, clipped = quantize_codes(_by_variant(latents, b), self.offset, self.scale)
        log_codes = None
        if self.posterior == "moments":
            log_codes, _ = quantize_codes(
                _by_variant(logstd, b), self.logstd_offset, self.logstd_scale
            )
        return codes, clipped, log_codes


def _by_variant(x: torch.Tensor, b: int) -> torch.Tensor:
    """(V*b, C, h, w), variant-major -> (b, V, C, h, w)."""
    return torch.stack(x.split(b), dim=1)


class Launched:
    """One batch on its way to the host: its outputs in (pinned) host memory once `wait` returns.

    The copies are taken here, when the batch is launched, never later: a graph replayed as a CUDA
    graph (torch.compile's reduce-overhead) writes every call's outputs into the same buffers, so
    batch k's must be copied out before batch k+1 is launched. On a GPU the copies are queued on
    the outputs' stream right behind the graph (the next replay queues behind them); on the CPU
    they are made at once.
    """

    def __init__(self, outputs: tuple, rows: int, make: Callable = EncodedBatch) -> None:
        """outputs: the graph's tensors (None for an absent one); `make(*copies)` is what `wait`
        returns (an EncodedBatch for the encode graph)."""
        self._host = make(*(None if t is None else to_host(t, rows) for t in outputs))
        first = next(t for t in outputs if t is not None)
        self._done = None
        if first.is_cuda:  # on the outputs' device, whichever device is current
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(first.device))

    def wait(self):
        """The batch's outputs on the CPU (waits for this batch only, not later launches)."""
        if self._done is not None:
            self._done.synchronize()
        return self._host


def to_host(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A copy of the first `rows` of t in host memory: pinned and not waited for (CUDA), or made
    now (CPU). Never a view: the graph may write its next outputs into t's memory."""
    t = t[:rows]
    if not t.is_cuda:
        return t.clone()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class BatchLauncher:
    """Launches the encode graph on one batch of crops at a time, without waiting for it.

    With `static_batch`, every batch is padded to that many crops (the pad rows are dropped before
    anything leaves the device), so a compiled graph sees one shape and never recompiles for a
    shard's last batch or a batch with failed images. With `cuda_graphs` (a graph compiled in a
    mode that replays CUDA graphs) every launch is marked a new step for torch's CUDA graph trees:
    the previous launch's outputs, already copied out, may be overwritten from then on.
    """

    def __init__(
        self,
        graph: nn.Module,
        *,
        device: torch.device,
        latent_shape: tuple[int, ...],
        variants: int,
        posterior: str,
        static_batch: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        self.graph, self.device, self.latent_shape = graph, device, latent_shape
        self.variants, self.posterior, self.static_batch = variants, posterior, static_batch
        self.cuda_graphs = cuda_graphs

    @torch.inference_mode()
    def launch(self, crops: torch.Tensor, keys: list[str]) -> Launched:
        """Start encoding uint8 crops (b, H, W, 3) of the samples `keys`; returns at once on GPUs."""
        b = len(keys)
        pad = 0 if self.static_batch is None else self.static_batch - b
        crops = crops.to(self.device, non_blocking=True)
        if pad > 0:
            crops = torch.cat([crops, crops.new_zeros((pad, *crops.shape[1:]))])
        noise = None
        if self.posterior == "sample":  # seeded per key and variant, drawn on the CPU
            seeds = [key_seed(k, v) for v in range(self.variants) for k in keys]
            noise = posterior_noise(seeds, self.latent_shape).view(self.variants, b, -1)
            noise = torch.nn.functional.pad(noise, (0, 0, 0, max(pad, 0)))
            noise = noise.view(-1, *self.latent_shape)
            if self.device.type == "cuda":
                noise = noise.pin_memory()
            noise = noise.to(self.device, non_blocking=True)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return Launched(self.graph(crops, noise), b)
