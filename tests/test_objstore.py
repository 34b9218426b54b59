"""Stores on object storage, for real: a local S3 server (moto on 127.0.0.1) holds a store that
`encode` wrote, that `validate` and `inspect` read, that `train` trains on in each data mode and
that a run sampled from; two simulated nodes (two torchrun agents, c10d rendezvous) encode and
train exactly like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, store_contents, write_store
from test_pipeline import JOB_ARGS, job
from typer.testing import CliRunner

from cli import app
from foundation.urls import redact_storage_options
from latent_store import StoreReadError, load_latents, open_store, validate_store
from latent_store import retry as retry_module
from pipeline.encode import encode
from testkit.s3 import free_port, make_bucket, s3_server, s3fs_filesystem
from trainer.config import resolve_config
from trainer.train import train

TRAIN = {"model": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2, "warmup_steps": 0}
TRAIN |= {"batch_size": 4, "steps": 3, "log_every": 1, "lr": 1e-3, "ckpt_every": 100}


@pytest.fixture(scope="module")
def bucket():
    """A bucket on a moto S3 server of this test module (AWS_ENDPOINT_URL points at it)."""
    with s3_server():
        yield make_bucket("latentdit-tests")


def fresh(bucket: str, name: str = "store.zarr") -> str:
    return f"{bucket}/{uuid.uuid4().hex[:8]}/{name}"


@pytest.fixture(scope="module")
def local_store(image_tree, tiny_vae_dir, tmp_path_factory) -> Path:
    """The image tree encoded into a local folder: what the S3 stores must equal."""
    out = tmp_path_factory.mktemp("local") / "local.zarr"
    encode(job(image_tree, out, tiny_vae_dir))
    return out


@pytest.fixture(scope="module")
def s3_store(bucket, image_tree, tiny_vae_dir) -> str:
    """The same tree encoded by `latentdit encode --out s3://...` (the command line)."""
    url = fresh(bucket)
    args = ["encode", str(image_tree), "--out", url, "--vae", str(tiny_vae_dir), *JOB_ARGS]
    result = invoke(*args, "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return url


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


# --- every command on s3:// -----------------------------------------------------------------------


def test_encode_writes_the_same_store_to_s3(s3_store, local_store):
    a, b = store_contents(s3_store), store_contents(local_store)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name] if name == "attrs" else np.array_equal(a[name], b[name]), name


def test_validate_and_inspect_read_s3(s3_store):
    ok = invoke("validate", s3_store)
    assert ok.exit_code == 0, ok.output
    assert f"{s3_store}: valid" in ok.output
    described = json.loads(invoke("inspect", s3_store, "--json").output)
    assert described["path"] == s3_store
    assert described["samples_written"] == 18 and described["shards_complete"] == 6
    assert described["bytes_on_disk"] > 18 * 4 * 4 * 4  # listed through the object store
    # the tiny random VAE decodes at ~10 dB, under the default --min-psnr of 20
    decoded = invoke("validate", s3_store, "--decode-check", "4", "--min-psnr", "0", "--json")
    assert decoded.exit_code == 0, decoded.output
    assert json.loads(decoded.output)["decode_check"]["samples"] == 4


def test_storage_options_json_replaces_the_environment(s3_store, monkeypatch):
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")
    monkeypatch.setattr(retry_module, "READ_ATTEMPTS", 1)
    try:
        options = json.dumps({"endpoint_url": endpoint})
        ok = invoke("validate", s3_store, "--storage-options", options)
        assert ok.exit_code == 0, ok.output
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def test_the_recorded_command_hides_storage_options():
    argv = ["encode", "src", "--storage-options", '{"secret": "s"}', '--storage-options={"key": 1}']
    assert redact_storage_options(argv) == [
        "encode", "src", "--storage-options", "'...'", "--storage-options=...",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["validate", "STORE", "--storage-options", "{endpoint"], "is not JSON"),
        (["validate", "STORE", "--storage-options", "[1]"], "is not a JSON object"),
        (["validate", "LOCAL", "--storage-options", "{}"], ""),  # {}: nothing to ignore
        (["validate", "LOCAL", "--storage-options", '{"anon": true}'], "are for store URLs"),
        (["inspect", "s3://latentdit-tests/none.zarr"], "no latent store here"),
        (["train", "--store", "STORE", "--run", "s3://latentdit-tests/run"], "not a URL"),
        (["sample", "RUN", "--out", "s3://latentdit-tests/samples"], "not a URL"),
    ],
)
def test_bad_urls_and_options_are_one_line_errors(s3_store, local_store, args, match, tmp_path):
    names = {"STORE": s3_store, "LOCAL": str(local_store), "RUN": str(tmp_path)}
    result = invoke(*[names.get(a, a) for a in args])
    if not match:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert match in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    "mode",
    [
        "memory",
        "stream",
        pytest.param(
            "gpu",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
            ],
        ),
    ],
)
def test_training_on_s3_matches_training_on_disk(s3_store, local_store, tmp_path, mode):
    """`train --store s3://...` in each data mode: the losses of the same store read from disk."""
    device = "cuda" if mode == "gpu" else "cpu"
    run = tmp_path / "s3run"
    result = invoke(
        "train", "--store", s3_store, "--run", str(run), "--data", mode, "--device", device,
        *[a for k, v in TRAIN.items() for a in (f"--{k.replace('_', '-')}", str(v))],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    local = {**TRAIN, "store": str(local_store), "run": str(tmp_path / "disk"), "data": mode}
    train(resolve_config(None, {**local, "device": device}))
    assert losses(run) == losses(tmp_path / "disk")
    assert json.loads((run / "config.json").read_text())["store"] == s3_store


def test_sampling_a_run_trained_on_s3(s3_store, tmp_path):
    run, out = tmp_path / "run", tmp_path / "samples"
    train(resolve_config(None, {**TRAIN, "store": s3_store, "run": str(run)}))
    meta = json.loads(next((run / "checkpoints").glob("0*/meta.json")).read_text())
    assert meta["store"]["path"] == s3_store  # the provenance names the URL, not a mangled path
    result = invoke(
        "sample", str(run), "--out", str(out), "--n", "2", "--steps", "2", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").rglob("*.png"))) == 2


# --- what goes wrong on object stores -------------------------------------------------------------


def test_validate_catches_deleted_objects(bucket, tmp_path):
    url = fresh(bucket)
    write_store(url, n=40)  # shards of 16: 0-15, 16-31, 32-39
    fs = s3fs_filesystem()
    path = url.removeprefix("s3://")
    fs.rm(f"{path}/latents/c/1/0/0/0/0")  # shard 1's latents: reads back as zeros silently
    fs.rm(f"{path}/labels/c/2")  # shard 2's labels: reads back as the fill value -1
    result = invoke("validate", url)
    assert result.exit_code == 1, result.output
    assert "FAIL checksums: shard 1: data file missing (latents/c/1/0/0/0/0)" in result.output
    assert "shard 2: data file missing (labels/c/2)" in result.output
    assert f"{url}: INVALID" in result.output
    fs.rm(f"{path}/zarr.json")
    gone = invoke("validate", url)
    assert gone.exit_code == 2 and "no latent store here" in gone.output, gone.output


def test_a_failed_read_is_retried(bucket, monkeypatch, caplog):
    """Two failed fetches of a shard, then success: the load goes on, the retries are logged."""
    url = fresh(bucket)
    write_store(url, n=40)
    store = open_store(url)
    monkeypatch.setattr(retry_module, "BACKOFF_S", 0.01)
    real, failures = type(store).array, {"left": 2}

    def flaky(self, name):
        if name == "latents" and failures["left"]:
            failures["left"] -= 1
            raise OSError("connection reset by peer")
        return real(self, name)

    monkeypatch.setattr(type(store), "array", flaky)
    arrays = load_latents(store, threads=1)
    assert len(arrays) == 40 and failures["left"] == 0
    assert caplog.text.count("read failed (OSError: connection reset by peer); retry") == 2


def test_a_read_that_keeps_failing_is_named(bucket, monkeypatch):
    """A server that went away: bounded retries, then one line naming the store and the fix."""
    url = fresh(bucket)
    write_store(url, n=8)
    monkeypatch.setattr(retry_module, "BACKOFF_S", 0.01)
    quick = {"retries": {"max_attempts": 1}}  # botocore's own retries: not what is tested here
    dead = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": quick}
    with pytest.raises(StoreReadError, match=r"read failed 4 times, last with .*Connect") as e:
        validate_store(open_store(url, storage_options=dead))
    assert url in str(e.value) and "\n" not in str(e.value)


# --- two nodes ----------------------------------------------------------------------------------


def two_nodes(command: list[str], tmp_path: Path, *, cwds=(ROOT, ROOT), ok=True) -> str:
    """Run `command` under two torchrun agents (2 nodes x 1 rank) meeting at a c10d rendezvous.

    `cwds`: each node's working directory. Returns the end of both nodes' logs.
    """
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}  # AWS_* of the server
    procs = []
    for node, cwd in enumerate(cwds):
        agent = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-id", f"t{port}",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", f"is_host={node == 0}".lower(),
        ]  # fmt: skip
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(subprocess.Popen([*agent, *command], cwd=cwd, env=env, stdout=log, stderr=log))
    codes = [p.wait(timeout=300) for p in procs]
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert (codes == [0, 0]) == ok, logs
    return logs


def test_two_nodes_encode_and_train_like_one_process(
    bucket, image_tree, tiny_vae_dir, local_store, tmp_path
):
    url = fresh(bucket)
    cli = [str(ROOT / "cli.py")]
    encode_args = ["encode", str(image_tree), "--out", url, "--vae", str(tiny_vae_dir), *JOB_ARGS]
    two_nodes([*cli, *encode_args, "--workers", "0", "--device", "cpu"], tmp_path)
    a, b = store_contents(url), store_contents(local_store)
    for name in a:
        assert a[name] == b[name] if name == "attrs" else np.array_equal(a[name], b[name]), name

    options = {**TRAIN, "store": url, "steps": 3}
    train_args = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    two_nodes([*cli, "--", "train", *train_args, "--run", str(tmp_path / "two")], tmp_path)
    train(resolve_config(None, {**options, "run": str(tmp_path / "one")}))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == 3 and two == pytest.approx(one, rel=1e-5)


def test_nodes_that_see_different_checkpoints_stop_together(local_store, tmp_path):
    """A run folder on node-local disk: one node has the checkpoint, the other does not.

    Each node's `--run runs/x` resolves against its own working directory (its "local disk").
    Without the check, one rank would resume at step 2 while the other starts at 0.
    """
    disks = [tmp_path / "node0-disk", tmp_path / "node1-disk"]
    for disk in disks:
        disk.mkdir()
    options = {**TRAIN, "store": str(local_store), "steps": 2}
    train(resolve_config(None, {**options, "run": str(disks[0] / "runs" / "x")}))
    args = [
        a for k, v in {**options, "steps": 4}.items() for a in (f"--{k.replace('_', '-')}", str(v))
    ]
    logs = two_nodes(
        [str(ROOT / "cli.py"), "--", "train", *args, "--run", "runs/x"],
        tmp_path,
        cwds=disks,
        ok=False,
    )
    assert "the ranks see different latest checkpoints (" in logs
    assert "must be one folder that every node shares" in logs
