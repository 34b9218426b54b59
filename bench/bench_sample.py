"""Sampling throughput: images/s, share of the bf16 peak and the projected time of a 50K FID set.

    python bench/bench_sample.py                         # small CPU mode: DiT-S/8, tiny decoder
    python bench/bench_sample.py --device cuda --precision bf16 --model DiT-XL/2 --latent-size 32 \
        --sd-vae --rows ddpm:250:256:timed=10:cfg=1.5,heun:50:256:cfg=1.8:interval=0-0.7 \
        --variants eager,compile:default,cast --profile

Runs the sampler's own code: `make_latents` (guidance, solver) on an `InferenceModel` of a DiT with
random weights (they time the same as trained ones), then `LatentDecoder` through the decoder-only
path from an AutoencoderKL saved with `save_pretrained`. A row is
SAMPLER:STEPS:BATCH[:timed=K][:cfg=S][:interval=LO-HI] (BATCH auto: what `--auto-batch MAX` found
with the sampler's own probe, `sampler.batch_size`); the objective follows the solver (DDPM for
ddpm/ddim/dpm++2m, flow matching otherwise). With timed=K < STEPS only the first K steps of the
STEPS-step schedule run and the solve time is scaled by STEPS/K: exact for DDPM solvers, whose steps
all cost the same, not for rows with a guidance interval (run those in full). Each variant (eager,
compile:MODE, cast = weights cast to --precision) runs every row on the same noise; rows after
the first variant report their largest latent difference from it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from kernel_profile import profile_call
from torch.profiler import record_function

from foundation.precision import autocast, parse_precision
from sampler.batch_size import HEADROOM, CudaFits, probe_batch_size
from sampler.config import SolveConfig
from sampler.decoder import LatentDecoder
from sampler.inference import InferenceModel
from sampler.latents import make_latents
from sampler.plan import ImageNoise
from sampler.solvers import SOLVERS
from testkit import make_vae
from trainer.metrics import peak_flops
from trainer.model import build_model, forward_flops
from trainer.objective import DDPM, FlowMatching

CLASSES = 1000
FID_IMAGES = 50_000
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
SMALL_VAE = {"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "norm_num_groups": 16}
CPU_ROWS = "euler:5:8,heun:5:8:interval=0-0.7,ddpm:250:8:timed=5"
INIT_STD = 0.02  # every weight random (adaLN-Zero's zeros would make the outputs trivial)


def meta_for(latent_size: int) -> dict:
    """The checkpoint meta the decoder checks: 4 channels, the VAE's default scaling factor."""
    return {
        "latent_shape": [4, latent_size, latent_size],
        "normalization": {"kind": "vae_scaling", "mean": [0.0] * 4, "std": [1 / 0.18215] * 4},
        "vae": {"scaling_factor": 0.18215, "downsampling": 8},
    }


def parse_row(spec: str) -> dict:
    """SAMPLER:STEPS:BATCH[:timed=K][:cfg=S][:interval=LO-HI] -> row settings (BATCH may be auto)."""
    name, steps, batch, *extra = spec.split(":")
    batch = batch if batch == "auto" else int(batch)
    row = {"sampler": name, "steps": int(steps), "batch": batch, "cfg": 4.0, "interval": None}
    row["timed"] = row["steps"]
    for item in extra:
        key, value = item.split("=")
        if key == "interval":
            row["interval"] = tuple(float(v) for v in value.split("-"))
        else:
            row[key] = float(value) if key == "cfg" else int(value)
    return row


class CountingNet:
    """The model function under test: counts the rows it runs; a profiler range per call."""

    def __init__(self, net: InferenceModel) -> None:
        self.net, self.null_class, self.config, self.rows = net, net.null_class, net.config, 0

    def __call__(self, x, t, y):
        self.rows += len(x)
        with record_function("dit"):
            return self.net(x, t, y)


class Stop(Exception):  # control flow: the timed steps are done
    def __init__(self, x):
        self.x = x


def solve(net, row: dict, args, *, steps_to_run: int):
    """Latents of one batch after `steps_to_run` steps of the row's schedule (the solver's x)."""
    objective = DDPM() if SOLVERS[row["sampler"]].kind == "ddpm" else FlowMatching()
    settings = SolveConfig(
        sampler=row["sampler"], steps=row["steps"], cfg=row["cfg"], cfg_interval=row["interval"]
    )
    indices = range(row["batch"])

    def stop_early(info):
        if info["i"] + 1 == steps_to_run < row["steps"]:
            raise Stop(info["x"])

    try:
        return make_latents(
            net, objective, torch.tensor([i % CLASSES for i in indices]), ImageNoise(0, indices),
            settings, latent_shape=(4, args.latent_size, args.latent_size), device=args.dev,
            precision=args.precision, callback=stop_early,
        )  # fmt: skip
    except Stop as stop:
        return stop.x


def sync(args) -> None:
    if args.dev.type == "cuda":
        torch.cuda.synchronize(args.dev)


def warm_up(net, row: dict, args) -> float:
    """Run the model at each shape the row uses (compiles, records CUDA graphs); seconds."""
    t0 = time.perf_counter()
    shapes = [row["batch"]] + ([2 * row["batch"]] if row["cfg"] != 1.0 else [])
    calls = 3 if isinstance(net, InferenceModel) and net.forward is not net.model else 1
    for rows in [r for r in shapes for _ in range(calls)]:
        x = torch.randn(rows, 4, args.latent_size, args.latent_size, device=args.dev)
        t = torch.full((rows,), 0.5, device=args.dev)
        with autocast(args.dev, args.precision):
            net(x, t, torch.zeros(rows, dtype=torch.long, device=args.dev))
    sync(args)
    return time.perf_counter() - t0


def time_row(net, decoder, row: dict, args, flops_per_row: float) -> tuple[dict, torch.Tensor]:
    counting = CountingNet(net)
    warmup_s = warm_up(net, row, args)
    if args.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.dev)
    t0 = time.perf_counter()
    z = solve(counting, row, args, steps_to_run=row["timed"])
    sync(args)
    t1 = time.perf_counter()
    with autocast(args.dev, args.precision):
        decoder(z)
    t2 = time.perf_counter()
    scale = row["steps"] / row["timed"]
    solve_s, decode_s = (t1 - t0) * scale, t2 - t1
    images_per_s = row["batch"] / (solve_s + decode_s)
    tflops = counting.rows * flops_per_row / (t1 - t0) / 1e12
    peak = peak_flops(args.dev)
    result = {
        **{k: row[k] for k in ("sampler", "steps", "batch", "cfg")},
        "interval": list(row["interval"]) if row["interval"] else None,
        "timed_steps": row["timed"],
        "model_rows_per_image": round(counting.rows * scale / row["batch"], 2),
        "warmup_s": round(warmup_s, 3),
        "solve_s": round(solve_s, 3),
        "decode_s": round(decode_s, 3),
        "decode_share": round(decode_s / (solve_s + decode_s), 4),
        "images_per_s": round(images_per_s, 3),
        "ms_per_image_per_model_row": round(1e3 * (t1 - t0) / counting.rows, 3),
        "model_tflops_per_s": round(tflops, 6),
        "peak_fraction": None if peak is None else round(tflops * 1e12 / peak, 4),
        "hours_for_50k": round(FID_IMAGES / images_per_s / 3600, 3),
        "projected": scale != 1.0,
    }
    if args.dev.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(args.dev) / 2**30, 2)
    return result, z.float().cpu()


def make_variant(model, spec: str, args) -> InferenceModel:
    if spec == "eager":
        return InferenceModel(model)
    if spec == "cast":
        return InferenceModel(copy.deepcopy(model), weights_dtype=args.precision.dtype)
    kind, _, mode = spec.partition(":")
    if kind != "compile" or not mode:
        raise SystemExit(f"--variants: {spec!r} is not eager, cast or compile:MODE")
    return InferenceModel(model, compile=mode)


def profile_step(model, decoder, row: dict, args) -> dict:
    """Kernel classes of one guided solver step (DiT forward inside) and of the decoder."""
    net = CountingNet(InferenceModel(model))
    one_step = {**row, "timed": 1}
    warm_up(net.net, row, args)
    step = profile_call(
        lambda: solve(net, one_step, args, steps_to_run=1), args.dev, ranges=("dit",)
    )
    dit_ms = step["ranges_ms"].get("dit")  # the rest: guidance combine, solver update, noise, host
    step["outside_dit_ms"] = round(step["wall_ms"] - dit_ms, 3) if dit_ms else None
    z = torch.randn(row["batch"], 4, args.latent_size, args.latent_size, device=args.dev)
    with autocast(args.dev, args.precision):
        decoder(z)  # warm
        decode = profile_call(lambda: decoder(z), args.dev)
    return {"row": f"{row['sampler']} batch {row['batch']} cfg {row['cfg']}", "guided_step": step,
            "decoder": decode}  # fmt: skip


def probe_batch(model, decoder, args) -> dict:
    """--auto-batch: the sampler's own probe (a guided call of 2b rows, a decode of b) on CUDA."""
    if args.dev.type != "cuda":  # what `latentdit sample --auto-batch` does off CUDA
        return {"batch": args.auto_start, "probed": False, "note": "CUDA only: start batch kept"}
    fits = CudaFits(
        model, lambda z: decoder(z, to_cpu=False), latent_shape=(4, args.latent_size, args.latent_size),
        device=args.dev, precision=args.precision,
    )  # fmt: skip
    probe = probe_batch_size(fits, start=args.auto_start, cap=args.auto_batch)
    return {
        "batch": probe.batch, "probed": True, "cap": args.auto_batch, "headroom": HEADROOM,
        "budget_gib": round(fits.budget / 2**30, 2), "seconds": round(probe.seconds, 2),
        "trials": [{"batch": b, "fits": ok, "peak_gib": None if p is None else round(p / 2**30, 2)}
                   for b, ok, p in probe.trials],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/8")
    p.add_argument("--latent-size", type=int, default=16)
    p.add_argument("--rows", default=CPU_ROWS, help="SAMPLER:STEPS:BATCH[:timed=K][:cfg=S]...")
    p.add_argument("--variants", default="eager", help="eager, cast, compile:MODE (comma list)")
    p.add_argument("--sd-vae", action="store_true", help="SD-VAE-sized decoder (slow on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--profile", action="store_true", help="kernel classes of the first row's step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--json", default=None, help="also write the report here, after every row")
    p.add_argument("--auto-batch", type=int, default=None, help="probe the largest batch up to "
                   "this cap (CUDA); rows with BATCH auto use it")  # fmt: skip
    p.add_argument("--auto-start", type=int, default=16, help="the probe's first batch")
    args = p.parse_args()
    args.dev, args.precision = torch.device(args.device), parse_precision(args.precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dev.type == "cuda":
        torch.cuda.set_device(args.dev)

    torch.manual_seed(0)
    with torch.device(args.dev):  # initialise on the device: DiT-XL/2 builds in seconds there
        model = build_model(
            args.model, input_size=args.latent_size, in_channels=4, num_classes=CLASSES
        )
        with torch.no_grad():
            for weight in model.parameters():
                weight.normal_(0.0, INIT_STD)
    model = model.eval().requires_grad_(False)
    rows = [parse_row(s) for s in args.rows.split(",")]
    flops_per_row = forward_flops(model.config)
    report = {
        "bench": "sample",
        "device": str(args.dev) if args.dev.type == "cpu" else torch.cuda.get_device_name(args.dev),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "model_params": sum(w.numel() for w in model.parameters()),
        "forward_gflop_per_row": round(flops_per_row / 1e9, 2),
        "image_size": args.latent_size * 8,
        "precision": str(args.precision),
        "peak_tflops": None if peak_flops(args.dev) is None else peak_flops(args.dev) / 1e12,
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = make_vae(Path(tmp) / "vae", **(SD_VAE if args.sd_vae else SMALL_VAE))
        decoder = LatentDecoder.load(str(vae_dir), meta_for(args.latent_size), device=args.dev)
        report["decoder_params"] = sum(w.numel() for w in decoder.ae.model.parameters())
        if args.auto_batch:
            report["auto_batch"] = probe_batch(model, decoder, args)
            for row in rows:
                row["batch"] = (
                    report["auto_batch"]["batch"] if row["batch"] == "auto" else row["batch"]
                )
        elif any(row["batch"] == "auto" for row in rows):
            raise SystemExit("--rows: BATCH auto needs --auto-batch MAX")
        if args.profile:
            report["profile"] = profile_step(model, decoder, rows[0], args)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
        reference: dict[int, torch.Tensor] = {}
        for n, spec in enumerate(args.variants.split(",")):
            net, results = make_variant(model, spec, args), []
            key = spec if spec not in report["variants"] else f"{spec} #{n + 1}"  # a repeat
            for k, row in enumerate(rows):
                try:
                    result, z = time_row(net, decoder, row, args, flops_per_row)
                except torch.OutOfMemoryError as e:  # the largest batch that fits is a finding
                    results.append({**row, "error": str(e).splitlines()[0]})
                    torch.cuda.empty_cache()
                    continue
                if k in reference:
                    diff = (z - reference[k]).abs().max().item()
                    result["max_abs_diff_vs_first_variant"] = round(diff, 6)
                    result["max_abs_first_variant"] = round(reference[k].abs().max().item(), 4)
                reference.setdefault(k, z)
                results.append(result)
                report["variants"][key] = results
                if args.json:  # rewritten after every row: a run cut short keeps what it measured
                    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
