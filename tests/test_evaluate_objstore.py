"""`latentdit evaluate s3://bucket/store.zarr`: the reconstruction floor of a store on object
storage, read from the local S3 server (moto on 127.0.0.1) like every other command's store URLs."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from conftest import write_store
from typer.testing import CliRunner

from cli import app
from testkit.s3 import make_bucket, s3_server


@pytest.fixture(scope="module")
def bucket():
    with s3_server():
        yield make_bucket("latentdit-evaluate")


def evaluate_cli(*args):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def test_evaluate_reads_a_store_url_as_its_folder_copy(
    bucket, tmp_path, tiny_vae_dir, tiny_inception
):
    url = f"{bucket}/{uuid.uuid4().hex[:8]}/store.zarr"
    for where in (url, tmp_path / "local.zarr"):  # the same samples, written by the real writer
        write_store(where, n=12, size=4)
    common = ["--vae", tiny_vae_dir, "--inception", tiny_inception, "--workers", 0, "--json"]
    remote = evaluate_cli(url, *common, "--ref", tmp_path / "local.zarr")
    assert remote.exit_code == 0, remote.output
    r = json.loads(remote.stdout)
    assert (r["samples"]["kind"], r["samples"]["path"], r["samples"]["count"]) == (
        "store",
        url,  # not mangled to s3:/...
        12,
    )
    assert abs(r["fid"]) < 1e-6  # the same decoded images on both sides
    options = json.dumps({"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    explicit = evaluate_cli(url, *common, "--storage-options", options)
    assert explicit.exit_code == 0, explicit.output
    assert json.loads(explicit.stdout)["inception_score"] == pytest.approx(r["inception_score"])


def test_a_bad_store_url_is_one_line_that_keeps_the_url(bucket, tiny_inception, tmp_path):
    url = f"{bucket}/nothing-here/store.zarr"
    r = evaluate_cli(url, "--inception", tiny_inception)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert url in r.output and "s3:/latentdit" not in r.output.replace("s3://", "")
    local = tmp_path / "s.npz"
    r = evaluate_cli(local, "--storage-options", '{"anon": false}', "--inception", tiny_inception)
    assert r.exit_code == 2 and "--storage-options are for store URLs" in r.output
