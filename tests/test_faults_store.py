"""Stores under fault: an object store that stops answering while `encode` creates or fills a
store (through a fault-injecting proxy in front of the local S3 server), a second encode or
sampler on what another process writes, and credentials that must reach no file or message.

Each case asserts the one error line, exit code 2, that what was written before is unchanged
(digests of the objects or files), and that re-running the same command recovers.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from cli_runs import digests, error_line, run_cli
from conftest import TINY_DIT, make_checkpoint, store_contents, write_store
from test_pipeline import JOB_ARGS, _equal, job

from foundation.locks import Lock, LockHeldError
from pipeline.encode import encode
from pipeline.store_create import store_lock
from sampler.outputs import out_lock
from testkit.proxy import FaultProxy
from testkit.s3 import make_bucket, s3_server, s3fs_filesystem

SECRET = "hunter2-do-not-print"


@pytest.fixture(scope="module")
def s3():
    """(bucket URL, endpoint) of a moto server for this module; AWS_* point at it meanwhile."""
    with s3_server() as endpoint:
        yield make_bucket("latentdit-faults"), endpoint


@pytest.fixture(scope="module")
def reference(image_tree, tiny_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-store-ref") / "ref.zarr"
    encode(job(image_tree, out, tiny_vae_dir))
    return out


def objects(url: str) -> dict[str, str]:
    """{key under url: blake2b} of every object, read from the server directly."""
    import hashlib

    fs, root = s3fs_filesystem(), url.removeprefix("s3://")
    fs.invalidate_cache()
    return {
        key[len(root) + 1 :]: hashlib.blake2b(fs.cat_file(key), digest_size=16).hexdigest()
        for key in fs.find(root)
    }


def test_an_object_store_outage_while_encoding(s3, reference, image_tree, tiny_vae_dir):
    """Down while the store is created (the half-made store cannot even be cleaned up), then
    down again mid-encode: one line each; once it answers, the same command finishes the store."""
    bucket, endpoint = s3
    prefix = f"{bucket}/{uuid.uuid4().hex[:8]}"
    url, key = f"{prefix}/store.zarr", prefix.removeprefix("s3://")
    cli = ["encode", image_tree, "--out", url, "--vae", tiny_vae_dir, *JOB_ARGS]
    cli += ["--workers", "0", "--device", "cpu"]
    with FaultProxy(endpoint) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "1"}
        proxy.fail_on(f"PUT /{key}/store.zarr/latents/zarr.json".encode())
        line = error_line(run_cli(*cli, env=env))
        assert "object store request failed (ConnectionClosedError" in line, line
        assert f"while creating the store {url}" in line and "latentdit encode" in line
        assert "store.zarr.creating" in objects(prefix)  # what the next run acts on

        proxy.up()
        proxy.fail_on(f"PUT /{key}/store.zarr/latents/c/2/".encode())
        second = run_cli(*cli, env=env)
        line = error_line(second)
        assert "half-made store" in second.stderr and "taking over the stale lock" in second.stderr
        assert f"while writing shard 2 of {url}" in line and "complete shards are kept" in line
        written = objects(url)
        shards = {
            k: v for k, v in written.items() if k.startswith(("latents/c/0/", "latents/c/1/"))
        }
        assert len(shards) == 2

        proxy.up()
        third = run_cli(*cli, env=env)
        assert third.returncode == 0, third.stderr[-3000:]
    after = objects(url)
    assert {k: after.get(k) for k in shards} == shards  # complete shards were kept as they were
    assert not {"store.zarr.creating", "store.zarr.lock"} & set(objects(prefix))
    assert _equal(store_contents(url), store_contents(reference))


def test_a_second_encode_is_refused(image_tree, tiny_vae_dir, tmp_path):
    out = write_store(tmp_path / "s.zarr", n=16)
    before = digests(tmp_path)
    with store_lock(out, None):  # held by this process: the command below is a second one
        done = run_cli(
            "encode", image_tree, "--out", out, "--vae", tiny_vae_dir, *JOB_ARGS, "--device", "cpu"
        )
    line = error_line(done)
    assert f"store {out} is in use by pid {os.getpid()}" in line
    assert f"remove {out}.lock" in line
    assert digests(tmp_path) == before


def test_a_second_sampler_is_refused(tiny_vae_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", tiny_vae_dir)
    out = tmp_path / "out"
    args = ["sample", ckpt, "--out", out, "--n", "2", "--steps", "2", "--device", "cpu", "--npz"]
    with out_lock(out):
        before = digests(out)
        line = error_line(run_cli(*args, real=False))
        assert digests(out) == before
    assert f"sample folder {out} is in use by pid {os.getpid()}" in line
    done = run_cli(*args, real=False)  # released: the same command now runs
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / ".lock").exists() and (out / "samples_2x32x32x3.npz").is_file()


def test_storage_secrets_reach_no_file_or_message(s3, tmp_path):
    """Credentials given with --storage-options: redacted in RUN/config.json and never printed;
    a bare resume asks for them again (the environment or the option), and works when given."""
    bucket, endpoint = s3
    url = write_store(f"{bucket}/{uuid.uuid4().hex[:8]}/s.zarr", n=16)
    given = json.dumps({"endpoint_url": endpoint, "key": "testing", "secret": SECRET})
    run = tmp_path / "run"
    options = [a for k, v in TINY_DIT.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    options += ["--batch-size", "8", "--warmup-steps", "0", "--device", "cpu"]
    first = run_cli("train", "--store", url, "--storage-options", given, "--run", run,
                    "--steps", "1", *options, real=False)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (run / "config.json").read_text()
    assert SECRET not in saved and SECRET not in first.stdout + first.stderr
    assert json.loads(json.loads(saved)["storage_options"]) == {
        "endpoint_url": endpoint, "key": "<redacted>", "secret": "<redacted>",
    }  # fmt: skip

    no_credentials = {  # the environment holds none: the driver cannot sign a request
        "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_ENDPOINT_URL": None,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",
    }  # fmt: skip
    before = digests(run)
    refused = run_cli("train", "--run", run, "--steps", "2", env=no_credentials)
    line = error_line(refused)
    assert "credentials" in line.lower() and SECRET not in refused.stderr
    assert "key, secret were saved redacted" in refused.stderr
    assert digests(run) == before

    again = run_cli("train", "--run", run, "--steps", "2", "--storage-options", given, real=False)
    assert again.returncode == 0 and "resumed at step 1" in again.stdout, again.stderr[-3000:]
    assert SECRET not in (run / "config.json").read_text() + again.stderr
    from_env = run_cli("train", "--run", run, "--steps", "3")  # AWS_* of the test server
    assert from_env.returncode == 0 and "resumed at step 2" in from_env.stdout, from_env.stderr

    bad = run_cli("train", "--run", run, "--storage-options", '{"secret": "' + SECRET + '", ')
    assert "--storage-options is not JSON" in error_line(bad) and SECRET not in bad.stderr


def test_locks_on_an_object_store(s3):
    """The store lock at an s3:// URL: a create-only PUT (If-None-Match), refused while held."""
    bucket, _ = s3
    url = f"{bucket}/{uuid.uuid4().hex[:8]}/s.zarr"
    refused = pytest.raises(LockHeldError, match=r"is in use by pid \d+ on .* since")
    with store_lock(url, None), refused:
        Lock(f"{url}.lock", what=f"store {url}").acquire()
    taken = Lock(f"{url}.lock", what="x").acquire()  # released: free again
    assert taken.holder is not None
    taken.release()
    assert f"{url}.lock".removeprefix("s3://") not in s3fs_filesystem().find(url.rsplit("/", 1)[0])


def test_a_failure_after_the_arrays_redoes_the_whole_creation(tmp_path):
    """What `then` writes (a feature projection) belongs to the creation: a failure in it leaves
    no store that passes for made, and the same call then creates it whole."""
    from latent_store import open_store
    from pipeline.store_create import CREATING_SUFFIX, create_store_marked, sidecar
    from testkit.stores import make_spec

    out, spec, keys = tmp_path / "s.zarr", make_spec(8), [f"k{i}" for i in range(8)]

    def full_disk(store):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        create_store_marked(out, spec, keys, None, then=full_disk)
    assert not out.exists() and not Path(sidecar(out, CREATING_SUFFIX)).exists()
    seen = []
    store = create_store_marked(out, spec, keys, None, then=lambda s: seen.append(s.path))
    assert seen == [store.path] and not Path(sidecar(out, CREATING_SUFFIX)).exists()
    assert open_store(out).spec == spec
