"""A local S3-compatible server (moto) on 127.0.0.1, for the object-store tests and benchmark.

    with s3_server() as endpoint:        # sets AWS_ENDPOINT_URL and test credentials meanwhile
        make_bucket("stores")
        encode(..., out="s3://stores/train.zarr")

Nothing leaves the machine: the server is a thread of this process (moto's ThreadedMotoServer)
keeping objects in memory; s3fs reaches it through the standard AWS_* variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

HOST = "127.0.0.1"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(*, own_process: bool = False) -> Iterator[str]:
    """Run moto's S3 on a free port; yields its endpoint URL, set as AWS_ENDPOINT_URL meanwhile.

    own_process: run the server as a separate process (`python -m moto.server`), so that it
    does not share this process's GIL: what a benchmark wants. Default: a thread (quick start).
    """
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    if own_process:
        command = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(port, proc)
        stop = proc.terminate
    else:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
        server.start()
        stop = server.stop
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**ENV, "AWS_ENDPOINT_URL": endpoint})
    _forget_clients()
    try:
        yield endpoint
    finally:
        stop()
        _forget_clients()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _forget_clients() -> None:
    """Drop fsspec's cached S3 file systems: each holds the endpoint it was made with, so one
    made for an earlier server (another test module's) would call a closed port."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto server on port {port} did not start (exit code {proc.poll()})")


def s3fs_filesystem(**options):
    """An s3fs file system for the server (endpoint and credentials from the environment)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def make_bucket(name: str) -> str:
    """Create a bucket (if missing); returns its URL s3://name."""
    fs = s3fs_filesystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"
