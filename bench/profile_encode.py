"""Where the encoder's time goes: one batch of the encode graph under torch.profiler, by kernel class.

    python bench/profile_encode.py [--channels 128,256,512,512] [--image-size 256] [--batch-size 256]
                                   [--dtype bf16] [--compile] [--calls 3]

Prints one JSON object: per class (convolution, group_norm, elementwise (SiLU and others),
attention, layout copies, cast, ...) the device seconds per batch and their share; TFLOP/s for the
convolutions and attention (FLOPs counted by torch.utils.flop_counter on the same graph), GB/s for
GroupNorm and SiLU (bytes: each reads its input and writes its output once, counted by hooks); the
device's busy share of the timeline. The VAE is a random-weight AutoencoderKL of the SD-VAE layout
(`--channels`), the crops random uint8, the graph the real `pipeline.encode_graph.EncodeGraph`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_profile import flop_counts, profile_region, summarize

from foundation.autoencoders.loading import VaeConfig
from foundation.compile import compile_cache
from latent_store import calibrate
from pipeline.encode import cudnn_benchmark
from pipeline.encode_graph import EncodeGraph
from pipeline.vae import encode_variants, load_vae
from testkit import make_vae


def activation_bytes(vae, run) -> dict[str, float]:
    """Bytes GroupNorm and SiLU modules read and write in one call of run() (once each)."""
    counts = {"group_norm": 0.0, "elementwise": 0.0}

    def hook(kind):
        def count(_module, inputs, output):
            counts[kind] += sum(t.numel() * t.element_size() for t in (*inputs, output))

        return count

    handles = [
        m.register_forward_hook(
            hook("group_norm" if isinstance(m, nn.GroupNorm) else "elementwise")
        )
        for m in vae.model.encoder.modules()
        if isinstance(m, (nn.GroupNorm, nn.SiLU))
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", default="16,32,32,32", help="SD-VAE: 128,256,512,512")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-cache", type=Path, default=None)
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--calls", type=int, default=3, help="profiled batches (after 2 warm-ups)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    channels = tuple(int(c) for c in args.channels.split(","))
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_vae(Path(tmp) / "vae", channels, layers_per_block=2)  # the SD-VAE layout
        vae, _ = load_vae(VaeConfig(id=str(path), dtype=args.dtype, device=args.device))
    g = torch.Generator().manual_seed(0)
    size = (args.batch_size, args.image_size, args.image_size, 3)
    crops = torch.randint(0, 256, size, generator=g, dtype=torch.uint8).to(args.device)
    keys = [str(i) for i in range(args.batch_size)]
    mean, _ = encode_variants(vae, crops[:8], keys[:8], flip=False, posterior="mean")
    graph = EncodeGraph(vae, quant=calibrate(mean))
    eager = graph

    def call(module):
        with torch.inference_mode():
            return module(crops)

    flops = flop_counts(lambda: call(eager))
    nbytes = activation_bytes(vae, lambda: call(eager))
    with (
        compile_cache(args.compile_cache if args.compile else None),
        cudnn_benchmark(args.cudnn_benchmark),
    ):
        if args.compile:
            graph = torch.compile(graph, dynamic=False)
        t = time.perf_counter()
        for _ in range(2):
            call(graph)
        sync()
        warmup_s = time.perf_counter() - t
        with profile_region() as prof:
            t = time.perf_counter()
            for _ in range(args.calls):
                call(graph)
            sync()
            seconds = time.perf_counter() - t
    summary = summarize(prof, calls=args.calls, seconds=seconds, flops=flops, bytes_by_class=nbytes)
    total_flops = sum(flops.values())
    print(
        json.dumps(
            {
                "bench": "profile_encode",
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "torch": torch.__version__,
                "vae_channels": list(channels),
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "compile": args.compile,
                "warmup_s": round(warmup_s, 2),
                "gflop_per_image": total_flops / args.batch_size / 1e9,
                "images_per_s_profiled": args.batch_size * args.calls / seconds,
                "achieved_tflop_per_s": total_flops * args.calls / seconds / 1e12,
                **summary,
            }
        )
    )


if __name__ == "__main__":
    main()
