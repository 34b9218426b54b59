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
def s3_server() -> Iterator[str]:
    """Run moto's S3 on a free port; yields its endpoint URL, set as AWS_ENDPOINT_URL meanwhile."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    endpoint = f"http://{HOST}:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
