"""Bad invocations of every command: each is one `error:` line (or Typer's usage error), exit 2,
never a traceback. Missing, empty and wrong-kind paths; out-of-range numbers; wrong VAEs;
malformed config files; incompatible resumes; bad classes, samplers and devices."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIT, make_checkpoint, make_image_tree, make_tiny_vae, write_store
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
TINY = [a for k, v in TINY_DIT.items() for a in (f"--{k.replace('_', '-')}", str(v))]
TINY += ["--batch-size", "8", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Everything the bad invocations point at: good things, files, empty and broken folders."""
    w = tmp_path_factory.mktemp("bad")
    made = {
        "store": write_store(w / "s.zarr", n=16),
        "other": write_store(w / "o.zarr", n=16, seed=5),
    }
    made.update(
        file=w / "file.txt", empty=w / "empty", vae=make_tiny_vae(w / "vae"), tree=w / "train"
    )
    made["file"].write_text("hello")
    made["empty"].mkdir()
    make_image_tree(made["tree"])
    made["run"] = w / "run"
    ok = runner.invoke(
        app,
        ["train", "--store", str(made["store"]), "--run", str(made["run"]), "--steps", "2", *TINY],
    )
    assert ok.exit_code == 0, ok.output
    make_checkpoint(w / "ckpt", made["vae"])
    made["ckpt"] = w / "ckpt"
    for name, text in {"bad.toml": "steps = [", "bad.yaml": "steps: [1,\n", "list.yaml": "- 1\n",
                       "unknown.toml": "learning_rate = 3\n", "type.toml": 'steps = "many"\n', "c.txt": "steps=1"}.items():  # fmt: skip
        (w / name).write_text(text)
    made["broken_run"] = w / "broken_run"
    shutil.copytree(made["run"], made["broken_run"])
    (made["broken_run"] / "config.json").write_text("{")
    made["broken_meta"] = w / "broken_meta"
    shutil.copytree(made["run"], made["broken_meta"])
    (made["broken_meta"] / "checkpoints/0000002/meta.json").write_text('{"format": ')
    made["w"] = w
    return made


def _cases(m: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    w, s, f, e = m["w"], str(m["store"]), str(m["file"]), str(m["empty"])
    enc = ["encode", str(m["tree"]), "--vae", str(m["vae"]), "--workers", "0", "--device", "cpu"]
    enc += ["--image-size", "32", "--out"]
    o = str(w / "o-new.zarr")
    tr = ["train", "--store", s, "--run", str(w / "r1"), *TINY]
    run, ck = ["train", "--run", str(m["run"])], ["sample", str(m["ckpt"]), "--out", str(w / "smp")]
    cases = {
        "inspect missing": (["inspect", str(w / "nope.zarr")], "no latent store here"),
        "inspect a file": (["inspect", f], "no latent store here"),
        "inspect an empty folder": (["inspect", e], "no latent store here"),
        "validate a file": (["validate", f], "no latent store here"),
        "validate an empty folder": (["validate", e], "no latent store here"),
        "validate max-clipped 2": (["validate", s, "--max-clipped", "2"], "--max-clipped"),
        "validate decode-check 0": (["validate", s, "--decode-check", "0"], "--decode-check"),
        "encode source missing": (["encode", str(w / "nope"), "--out", o], "does not exist"),
        "encode source a file": (["encode", f, "--out", o], "do not exist"),
        "encode source empty": (["encode", e, "--out", o, "--vae", str(m["vae"])], "no images found"),
        "encode out a file": ([*enc, f], "a file, not a store folder"),
        "encode out a non-store folder": ([*enc, str(m["tree"])], "holds something other than"),
        "encode vae missing": ([*enc[:2], "--vae", str(w / "novae"), "--out", o], "no such folder"),
        "encode vae not a vae": ([*enc[:2], "--vae", e, "--out", o], "cannot load VAE"),
        "encode vae a file": ([*enc[:2], "--vae", f, "--out", o], "not a VAE folder"),
        "encode image-size 0": ([*enc, o, "--image-size", "0"], "--image-size"),
        "encode image-size 36": ([*enc, o, "--image-size", "36"], "not a multiple of"),
        "encode batch-size 0": ([*enc, o, "--batch-size", "0"], "--batch-size"),
        "encode workers -1": ([*enc, o, "--workers", "-1"], "--workers"),
        "encode max-pixels 0": ([*enc, o, "--max-pixels", "0"], "max"),
        "encode calibration 0": ([*enc, o, "--calibration-samples", "0"], "--calibration-samples"),
        "encode shard/chunk": ([*enc, o, "--shard-size", "5", "--chunk-size", "2"], "multiple of --chunk-size"),
        "encode max-failures word": ([*enc, o, "--max-failures", "lots"], "give a count"),
        "encode max-failures 150%": ([*enc, o, "--max-failures", "150%"], "a fraction in"),
        "encode posterior": ([*enc, o, "--posterior", "median"], "median"),
        "encode compile-mode": ([*enc, o, "--compile", "--compile-mode", "fast"], "use one of default"),
        "encode compile-mode no-compile": ([*enc, o, "--no-compile", "--compile-mode", "default"], "add --compile"),
        "encode compile-mode uncompiled": ([*enc, o, "--compile-mode", "reduce-overhead"], "add --compile"),
        "encode classes missing": ([*enc, o, "--classes", str(w / "none.txt")], "cannot read"),
        "encode classes wrong": ([*enc, o, "--classes", f], "is not in"),
        "encode val-labels wrong": ([*enc, o, "--val-labels", f], "devkit"),
        "encode resume mismatched": ([*enc, s], "another configuration"),
        "download list missing": (["download", str(w / "x.csv"), "--out", str(w / "dl")], "does not exist"),
        "download list not a table": (["download", f, "--out", str(w / "dl")], "must end in"),
        "train no store": (["train", "--run", str(w / "r1")], "missing --store"),
        "train store missing": (["train", "--store", str(w / "no.zarr"), "--run", str(w / "r1"), *TINY], "no latent store"),
        "train store a file": (["train", "--store", f, "--run", str(w / "r1"), *TINY], "no latent store"),
        "train run a file": (["train", "--store", s, "--run", f, *TINY], "a file, not a run folder"),
        "train steps 0": ([*tr, "--steps", "0"], "--steps must be >= 1"),
        "train lr -1": ([*tr, "--lr", "-1"], "--lr must be > 0"),
        "train p-uncond 1": ([*tr, "--p-uncond", "1"], "--p-uncond"),
        "train model": ([*tr, "--model", "DiT-Q/2"], "unknown model preset"),
        "train data": ([*tr, "--data", "disk"], "--data 'disk'"),
        "train device": ([*tr, "--device", "tpu"], "not a torch device"),
        "train batch too big": ([*tr, "--batch-size", "64"], "fewer than one global batch"),
        "train config bad toml": (["train", "--config", str(w / "bad.toml")], "cannot parse"),
        "train config bad yaml": (["train", "--config", str(w / "bad.yaml")], "cannot parse"),
        "train config a list": (["train", "--config", str(w / "list.yaml")], "a table of options"),
        "train config unknown key": (["train", "--config", str(w / "unknown.toml")], "learning_rate"),
        "train config wrong type": ([*tr, "--config", str(w / "type.toml")], "bad train options"),
        "train config .txt": (["train", "--config", str(w / "c.txt")], "use a .toml"),
        "train config a folder": (["train", "--config", e], "no such file"),
        "train resume lr": ([*run, "--lr", "0.5"], r"--lr: 0.0001 (run) vs 0.5 (now)"),
        "train resume depth": ([*run, "--depth", "3"], "--depth: 2 (run) vs 3 (now)"),
        "train resume objective": ([*run, "--objective", "ddpm"], "--objective: 'flow_matching' (run)"),
        "train resume steps below": ([*run, "--steps", "1"], "below the step"),
        "train resume other store": ([*run, "--store", str(m["other"])], "with other data"),
        "train run config malformed": (["train", "--run", str(m["broken_run"])], "config.json is unreadable"),
        "train run meta malformed": (["train", "--run", str(m["broken_meta"])], "meta.json is unreadable"),
        "train bare run without config": (["train", "--run", e], "missing --store"),
        "sample checkpoint missing": (["sample", str(w / "nope"), "--out", str(w / "smp")], "no such run dir"),
        "sample checkpoint a file": (["sample", f, "--out", str(w / "smp")], "no checkpoint here"),
        "sample no checkpoint": (["sample", e, "--out", str(w / "smp")], "no checkpoint here"),
        "sample meta malformed": (["sample", str(m["broken_meta"]), "--out", str(w / "smp")], "meta.json is unreadable"),
        "sample out a file": (["sample", str(m["ckpt"]), "--out", f], "a file, not a folder"),
        "sample class name": ([*ck, "--class", "zebra", "--device", "cpu"], "no class has this"),
        "sample class index": ([*ck, "--class", "7", "--device", "cpu"], "index out of range"),
        "sample sampler": ([*ck, "--sampler", "magic", "--device", "cpu"], "--sampler 'magic'"),
        "sample device": ([*ck, "--device", "tpu"], "not a torch device"),
        "sample n 0": ([*ck, "--n", "0"], "--n"),
        "sample steps 0": ([*ck, "--steps", "0", "--device", "cpu"], "steps"),
        "demo train-steps 0": (["demo", "--out", str(w / "demo"), "--train-steps", "0"], "steps"),
        "sample cfg -1": ([*ck, "--cfg", "-1"], "--cfg"),
        "sample weights": ([*ck, "--weights", "best", "--device", "cpu"], "--weights"),
        "sample precision": ([*ck, "--precision", "fp8", "--device", "cpu"], "fp8"),
        "sample wrong vae": ([*ck, "--vae", e, "--device", "cpu"], "cannot load its decoder"),
        "sample fid-samples 0": ([*ck, "--fid-samples", "0", "--device", "cpu"], "--fid-samples"),
        "demo out a file": (["demo", "--out", f, "--quick"], "a file, not a folder"),
    }  # fmt: skip
    if not torch.cuda.is_available():
        cases["train cuda absent"] = ([*tr, "--device", "cuda"], "no CUDA device")
        cases["train gpu data without cuda"] = ([*tr, "--data", "gpu"], "needs a CUDA device")
        cases["sample cuda absent"] = ([*ck, "--device", "cuda"], "no CUDA device")
        cases["encode cuda absent"] = ([*enc[:4], "--device", "cuda", "--out", o], "no CUDA")
    return cases


CASE_NAMES = sorted(_cases({k: Path(k) for k in ("w", "store", "file", "empty", "tree", "vae", "other", "run", "ckpt", "broken_run", "broken_meta")}))  # fmt: skip


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_invocation_is_one_line(world, case):
    args, match = _cases(world)[case]
    before = sorted(p.name for p in world["w"].iterdir())
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    if "Usage:" in result.output:  # Typer's own check of a range, a choice or a path
        assert any(match in line for line in lines), result.output
    else:
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.output
        assert match in errors[0], result.output
    assert sorted(p.name for p in world["w"].iterdir()) == before  # nothing made on the way


@pytest.mark.parametrize("case", ["train device", "sample device", "encode out a file"])
def test_one_gpu_index_for_every_local_rank_is_refused(world, monkeypatch, case):
    """Under torchrun with several processes per node, `--device cuda:1` would put every rank on
    GPU 1 (NCCL then fails far from the cause): refused before anything starts, naming the fix."""
    args = list(_cases(world)[case][0])
    args[args.index("--device") + 1] = "cuda:1"
    if case.startswith("encode"):
        args[-1] = str(world["w"] / "o-new.zarr")  # a good --out: only the device is wrong
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = sorted(p.name for p in world["w"].iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: --device cuda:1 under torchrun with 2 processes per node"), last
    assert sorted(p.name for p in world["w"].iterdir()) == before
