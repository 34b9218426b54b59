"""Encode throughput: the pipeline, the encode graph alone, and today's unfused path, side by side.

    python bench/bench_encode.py [--images 96] [--image-size 256] [--workers 1] [--device cpu]
                                 [--flip] [--compile] [--dtype bf16] [--sweep 64,128,256]
                                 [--compile --compile-mode reduce-overhead --mode-sweep default]

Prints one JSON object (with --sweep, one per extra batch size first; with --mode-sweep, one per
extra compile mode, each with its codes against the unfused path): decode+crop images/s of
one worker; the unfused path alone (`encode_variants` + `quantize` + a copy to the host, as every
batch ran before the encode graph); the encode graph alone (uint8 crops to uint8 codes on the
device, pipelined as the encode job launches it, compiled with --compile); the whole pipeline (the
real `encode_shards`: DataLoader workers, graph, shard writes); pipeline / graph (goal >= 0.95:
the data path must not starve the model); and how the graph's codes agree with the unfused path's.
The images are generated ImageNet-sized JPEGs; the VAE is an AutoencoderKL with the SD-VAE layout
and random weights, `--channels` wide (the SD-VAE itself is 128,256,512,512; random weights time
the same). Rates count images (crops); with --flip each image is encoded twice.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foundation.compile import compile_cache
from foundation.distributed import DistInfo
from latent_store import LatentStore, StoreWriter, create_store
from latent_store.quantize import quantize
from pipeline.encode import EncodeConfig, cudnn_benchmark, encode_shards, make_launcher
from pipeline.loader import collate, load_item, shard_batches
from pipeline.source import open_source
from pipeline.store_setup import calibrate_quantization, store_spec
from pipeline.vae import encode_variants, load_vae
from testkit import make_vae

IMAGENET_SIZE = (500, 375)  # the most common ImageNet train resolution
WARMUP_BATCHES = 3  # before timing the graph: compile, then (CUDA graph modes) warm up and record


def make_tree(root: Path, images: int, classes: int = 4, distinct: int = 1024) -> None:
    """ImageNet-sized JPEGs (smooth noise, quality 90) in `classes` wnid folders; beyond the first
    `distinct`, files repeat earlier bytes (decoding costs the same, making them does not)."""
    rng = np.random.default_rng(0)
    made: list[bytes] = []
    for i in range(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        if i < distinct:
            small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(IMAGENET_SIZE, Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            made.append(buf.getvalue())
        (folder / f"img_{i:05d}.JPEG").write_bytes(made[i % len(made)])


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def run_unfused(cfg: EncodeConfig, vae, quant, batches) -> list[torch.Tensor]:
    """Today's unfused path, batch by batch: float latents, quantize, wait for the codes."""
    out = []
    for batch, keys in batches:
        mean, _ = encode_variants(vae, batch.crops, keys, flip=cfg.flip, posterior=cfg.posterior)
        out.append(quantize(mean, quant)[0].cpu())
    return out


def run_graph(launcher, batches) -> list[torch.Tensor]:
    """The encode graph as `encode_shards` drives it: batch k+1 launched before k is read."""
    out, previous = [], None
    for batch, keys in batches:
        current = launcher.launch(batch.crops, keys)
        if previous is not None:
            out.append(previous.wait().codes)
        previous = current
    out.append(previous.wait().codes)
    return out


def timed(fn, device: str) -> tuple[float, object]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t, result


def make_batches(items, source, batch_size: int, n: int) -> list:
    """(Batch, keys) covering n images' worth of work, cycling over the decoded crops."""
    batches = []
    for b in shard_batches([(0, n)], batch_size):
        batch = collate([items[i % len(items)] for i in b])
        batches.append((batch, [source.key(i % len(source)) for i in b]))
    return batches


def forward_figures(
    cfg,
    vae,
    spec,
    items,
    source,
    n: int,
    device: str,
    unfused: bool,
    repeats: int = 1,
    unfused_images: int | None = None,
) -> dict:
    """Graph alone (after a warm-up that compiles), and the unfused path alone (on the first
    `unfused_images`, its rate scaled), at cfg.batch_size; with `repeats`, the two alternate and
    each keeps its best time (for noisy machines)."""
    batches = make_batches(items, source, cfg.batch_size, n)
    skips = counters["inductor"]["cudagraph_skips"]
    launcher = make_launcher(cfg, vae, spec)
    # warm-up: compiles; in a CUDA graph mode the 1st call runs eagerly, the 2nd records the graph
    compile_s, _ = timed(lambda: run_graph(launcher, batches[:WARMUP_BATCHES]), device)
    some = batches[: max(1, unfused_images // cfg.batch_size)] if unfused_images else batches
    if unfused:
        run_unfused(cfg, vae, spec.quant, batches[:1])  # warm-up
    graph_s = unfused_s = float("inf")
    for _ in range(repeats):
        t, codes = timed(lambda: run_graph(launcher, batches), device)
        graph_s = min(graph_s, t)
        if unfused:
            t, want = timed(lambda: run_unfused(cfg, vae, spec.quant, some), device)
            unfused_s = min(unfused_s, t * len(batches) / len(some))
    figures = {
        "batch_size": cfg.batch_size,
        "repeats": repeats,
        "graph_warmup_s": round(compile_s, 2),
        "graph_images_per_s": rate(n, graph_s),
    }
    if launcher.cuda_graphs:  # graphs torch would not replay as CUDA graphs (its log says why)
        figures["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    if unfused:
        d = (torch.cat(codes[: len(want)]).int() - torch.cat(want).int()).abs()
        figures |= {
            "unfused_images_per_s": rate(n, unfused_s),
            "graph_over_unfused": round(unfused_s / graph_s, 3),
            "codes_equal_to_unfused": round((d == 0).float().mean().item(), 6),
            "codes_max_diff": int(d.max()),
        }
    if device.startswith("cuda"):
        figures["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sweep", default="", help="more batch sizes for the graph alone: 64,256")
    ap.add_argument("--workers", type=int, default=None, help="default: sized to the machine")
    ap.add_argument(
        "--channels", default="16,32,32,32", help="encoder widths (SD-VAE: 128,256,512,512)"
    )
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--flip", action="store_true", help="encode each crop's flip too")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encode graph")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile")
    ap.add_argument(
        "--mode-sweep", default="", help="with --compile, more modes for the graph alone: default"
    )
    ap.add_argument("--compile-cache", type=Path, default=None, help="torch.compile cache folder")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--no-unfused", action="store_true", help="skip timing the unfused path")
    ap.add_argument("--repeats", type=int, default=1, help="alternate graph/unfused, keep best")
    ap.add_argument(
        "--unfused-images", type=int, default=None, help="time the unfused path on this many only"
    )
    ap.add_argument(
        "--distinct", type=int, default=1024, help="distinct images (decoded for forward-only)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of the main process"
    )
    args = ap.parse_args()
    if args.mode_sweep and not args.compile:
        ap.error("--mode-sweep times other compile modes: add --compile")
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    device, n = args.device, args.images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tree(tmp / "train", n, distinct=args.distinct)
        cfg = EncodeConfig(
            source=tmp / "train",
            out=tmp / "store.zarr",
            vae=str(make_vae(tmp / "vae", channels, layers_per_block=2)),  # as in the SD-VAE
            dtype=args.dtype,
            device=device,
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            flip=args.flip,
            shard_size=min(n, 4096),  # several shards: writes overlap the encoding
            chunk_size=min(n, 1024),
            compile=args.compile,
            compile_mode=args.compile_mode if args.compile else None,
            compile_cache=args.compile_cache,
            cudnn_benchmark=args.cudnn_benchmark,
            calibration_samples=args.batch_size,
        ).for_device(torch.device(device).type)
        source = open_source(cfg.source)
        vae, vae_info = load_vae(cfg.vae_config(device))  # as `encode` loads it
        pre = cfg.preprocess_config()

        t = time.perf_counter()
        items = [load_item(source, i, pre) for i in range(min(len(source), args.distinct))]
        decode_s = time.perf_counter() - t
        spec = store_spec(
            cfg, source, vae, vae_info, *calibrate_quantization(cfg, source, vae, pre)
        )
        context = {
            "bench": "encode",
            "device": torch.cuda.get_device_name()
            if device.startswith("cuda")
            else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "vae_channels": list(channels),
            "image_size": args.image_size,
            "dtype": args.dtype,
            "flip": args.flip,
            "compile": args.compile,
            "compile_mode": cfg.compile_mode,
            "images": n,
            "threads": args.threads,
        }

        def figures(c: EncodeConfig, unfused: bool = not args.no_unfused, repeats: int = 1):
            return forward_figures(
                c, vae, spec, items, source, n, device, unfused, repeats, args.unfused_images
            )

        with (
            compile_cache(args.compile_cache if args.compile else None),
            cudnn_benchmark(args.cudnn_benchmark),
        ):
            for size in [int(b) for b in args.sweep.split(",") if b]:
                sized = figures(replace(cfg, batch_size=size), unfused=False)
                print(json.dumps({**context, "sweep": True, **sized}), flush=True)
            for mode in [m for m in args.mode_sweep.split(",") if m]:
                moded = figures(replace(cfg, compile_mode=mode))
                sweep = {"sweep": True, "compile_mode": mode}
                print(json.dumps({**context, **sweep, **moded}), flush=True)
            forward = figures(cfg, repeats=args.repeats)
            create_store(cfg.out, spec, [source.key(i) for i in range(len(source))])
            writer = StoreWriter(LatentStore(cfg.out))
            info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
            pipeline_s, _ = timed(
                lambda: encode_shards(cfg, source, vae, pre, writer, info), device
            )

    print(
        json.dumps(
            {
                **context,
                **forward,
                "workers": cfg.decode_workers(torch.device(device).type),
                "decode_crop_images_per_s_per_worker": rate(len(items), decode_s),
                "pipeline_images_per_s": rate(n, pipeline_s),
                "pipeline_over_graph": round(
                    rate(n, pipeline_s) / forward["graph_images_per_s"], 3
                ),
                "attention_processors": sorted(
                    {type(p).__name__ for p in vae.model.attn_processors.values()}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
