"""Encode throughput: the whole pipeline against the VAE forward alone on the same batches.

    python bench/bench_encode.py [--images 96] [--image-size 256] [--workers 1] [--device cpu]

Prints one JSON object: decode+crop images/s of one worker, VAE-forward-only images/s, pipeline
images/s (DataLoader workers + encoder + quantize + shard writes, the real `encode_shards`), and
their ratio (goal >= 0.9: the data path must not starve the model). The images are generated
ImageNet-sized JPEGs; the VAE is an AutoencoderKL with the SD-VAE layout and random weights,
`--channels` wide (the SD-VAE itself is 128,256,512,512; random weights time the same).
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foundation.distributed import DistInfo
from latent_store import LatentStore, StoreWriter, create_store
from pipeline.encode import EncodeConfig, encode_shards
from pipeline.loader import collate, load_item, shard_batches
from pipeline.source import open_source
from pipeline.store_setup import calibrate_quantization, store_spec
from pipeline.vae import encode_posterior, load_vae
from testkit import make_vae

IMAGENET_SIZE = (500, 375)  # the most common ImageNet train resolution


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--channels", default="16,32,32,32", help="encoder widths (SD-VAE: 128,256,512,512)"
    )
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder")
    ap.add_argument(
        "--distinct", type=int, default=1024, help="distinct images (decoded for forward-only)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of the main process"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tree(tmp / "train", args.images, distinct=args.distinct)
        cfg = EncodeConfig(
            source=tmp / "train",
            out=tmp / "store.zarr",
            vae=str(make_vae(tmp / "vae", channels, layers_per_block=2)),  # as in the SD-VAE
            dtype=args.dtype,
            device=args.device,
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            shard_size=min(args.images, 4096),  # several shards: writes overlap the encoding
            chunk_size=min(args.images, 1024),
            compile=args.compile,
            calibration_samples=args.batch_size,
        )
        source = open_source(cfg.source)
        vae, vae_info = load_vae(cfg.vae_config(args.device))  # as `encode` loads it
        pre = cfg.preprocess_config()

        t = time.perf_counter()
        items = [load_item(source, i, pre) for i in range(min(len(source), args.distinct))]
        decode_s = time.perf_counter() - t

        batches = [  # every image's worth of forward work, cycling over the decoded crops
            collate([items[i % len(items)] for i in b])
            for b in shard_batches([(0, len(source))], cfg.batch_size)
        ]
        encode_posterior(vae, batches[0].crops, posterior="mean")  # warm-up
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        for batch in batches:
            encode_posterior(vae, batch.crops, posterior="mean")
        sync()
        forward_s = time.perf_counter() - t

        quant, _ = calibrate_quantization(cfg, source, vae, pre)
        create_store(
            cfg.out,
            store_spec(cfg, source, vae_info, quant),
            [source.key(i) for i in range(len(source))],
        )
        writer = StoreWriter(LatentStore(cfg.out))
        t = time.perf_counter()
        encode_shards(
            cfg,
            source,
            vae,
            pre,
            writer,
            DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(args.device)),
        )
        pipeline_s = time.perf_counter() - t

    n = args.images
    print(
        json.dumps(
            {
                "bench": "encode",
                "device": torch.cuda.get_device_name()
                if args.device.startswith("cuda")
                else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                "vae_channels": list(channels),
                "image_size": args.image_size,
                "dtype": args.dtype,
                "compile": args.compile,
                "images": n,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "threads": args.threads,
                "decode_crop_images_per_s_per_worker": rate(len(items), decode_s),
                "vae_forward_images_per_s": rate(n, forward_s),
                "pipeline_images_per_s": rate(n, pipeline_s),
                "pipeline_over_forward": round(forward_s / pipeline_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
