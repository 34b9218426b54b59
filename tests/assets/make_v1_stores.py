"""Write the v1 store assets: stores as latentdit wrote them before arrays were declared.

    .venv/bin/python tests/assets/make_v1_stores.py     # run at commit 6cf4fec (main, 2026-12)

Made once, with the code of main at 6cf4fec (format v1: `latents`, `labels`, `keys`, an optional
`logstd`, no array declaration in the attributes), through the real encode path: 21 generated
images of 3 classes (one of them a broken file) center-cropped to 32 px, a tiny random
AutoencoderKL (`testkit.make_tiny_vae`, 4x4x4 latents), `--flip`, shards of 8 samples (3 shards).
Two stores: posterior "mean" and posterior "moments" (with `logstd`). Written into:

    v1_stores.zip        v1_mean.zarr/ and v1_moments.zarr/, as encode left them (sealed)
    v1_reference.npz     the batches today's trainer makes from v1_mean.zarr (memory and stream)
    v1_reference.json    the losses of a 4-step run on v1_mean.zarr, resumed after step 2

tests/test_v1_stores.py unpacks the zip and checks that later code validates, loads, trains on
and resumes these stores unchanged, with the same batches. Never re-make these files with newer
code: they stand for stores that exist out there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latent_store import open_store
from pipeline.encode import EncodeConfig, encode
from testkit import TINY_DIT, make_tiny_vae
from trainer.config import resolve_config
from trainer.data import BatchLayout, build_batches
from trainer.normalization import normalization_from_store
from trainer.train import train

HERE = Path(__file__).resolve().parent
WNIDS = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 7
ENCODE = dict(image_size=32, flip=True, shard_size=8, chunk_size=4, batch_size=4)
BATCH, STEPS, RESUME_AT = 4, 4, 2  # the reference run: 4 steps, killed after a checkpoint at 2
REFERENCE_STEPS = ((0, 0), (0, 1), (0, 4), (1, 0))  # (epoch, step in epoch) of recorded batches


def make_images(root: Path) -> None:
    """Smooth RGB JPEGs of 40-56 px per class, and one file that is not an image."""
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for j in range(PER_CLASS - (c == 2)):
            rng = np.random.default_rng(10 * c + j)
            h, w = 40 + 3 * j, 56 - 2 * j
            y, x = np.mgrid[0:h, 0:w] / 56
            rgb = [np.sin(rng.uniform(2, 6) * x + rng.uniform(2, 6) * y + rng.uniform(0, 6))]
            rgb += [np.cos(rng.uniform(1, 5) * x - rng.uniform(1, 5) * y) for _ in range(2)]
            img = Image.fromarray(((np.stack(rgb, -1) + 1) * 127.5).astype(np.uint8), "RGB")
            img.save(root / wnid / f"{wnid}_{j}.JPEG", quality=90)
    (root / WNIDS[2] / "broken.JPEG").write_bytes(b"<html>404 Not Found</html>")


def encode_store(name: str, posterior: str) -> None:
    command = (
        f"latentdit encode images/train --out {name} --vae vae --image-size 32 --flip "
        f"--posterior {posterior} --shard-size 8 --chunk-size 4 --batch-size 4"
    )
    source = Path("images/train")
    kw = dict(posterior=posterior, workers=0, device="cpu", calibration_samples=21, **ENCODE)
    encode(EncodeConfig(source=source, out=name, vae="vae", command=command, **kw))


def reference_batches(store_path: str) -> dict[str, np.ndarray]:
    """x and y of REFERENCE_STEPS in memory and stream mode (seed 0, one rank)."""
    store = open_store(store_path)
    norm = normalization_from_store(store, "channel_stats")
    layout = BatchLayout(batch_size=BATCH, grad_accum=1, rank=0, world_size=1)
    out = {}
    for mode in ("memory", "stream"):
        source = build_batches(
            store, norm, layout, mode=mode, seed=0, device=torch.device("cpu"), shuffle_shards=2
        )
        for epoch, step in REFERENCE_STEPS:
            ((x, y),) = source.get(epoch, step)
            out[f"{mode}_e{epoch}_s{step}_x"] = x.numpy()
            out[f"{mode}_e{epoch}_s{step}_y"] = y.numpy()
    return out


def reference_run(store_path: str) -> list[dict]:
    """log.jsonl of a tiny run stopped after step RESUME_AT and resumed to STEPS."""
    options = {"store": store_path, "run": "run", **TINY_DIT, "batch_size": BATCH}
    options.update(warmup_steps=0, log_every=1, ckpt_every=RESUME_AT, device="cpu")
    train(resolve_config(None, {**options, "steps": RESUME_AT}))
    train(resolve_config(None, {**options, "steps": STEPS}))
    return [json.loads(line) for line in Path("run/log.jsonl").read_text().splitlines()]


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the stores record the absolute paths of the images and the VAE here
        make_images(Path("images/train"))
        make_tiny_vae(Path("vae"))
        encode_store("v1_mean.zarr", "mean")
        encode_store("v1_moments.zarr", "moments")
        with zipfile.ZipFile(HERE / "v1_stores.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for store in ("v1_mean.zarr", "v1_moments.zarr"):
                for f in sorted(Path(store).rglob("*")):
                    if f.is_file():
                        z.write(f, f.as_posix())
        np.savez(HERE / "v1_reference.npz", **reference_batches("v1_mean.zarr"))
        records = reference_run("v1_mean.zarr")
        keep = ("step", "loss", "grad_norm", "lr")
        losses = [{k: r[k] for k in keep} for r in records]
        run = {"batch_size": BATCH, "steps": STEPS, "resume_at": RESUME_AT, "log": losses}
        (HERE / "v1_reference.json").write_text(json.dumps(run, indent=1) + "\n")
        os.chdir(HERE)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
