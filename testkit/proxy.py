"""A TCP proxy on 127.0.0.1 that can take an object store down, for the outage tests.

    with s3_server() as endpoint, FaultProxy(endpoint) as proxy:
        proxy.fail_on(rb"PUT /bucket/[^ ]*/latents/c/2/")   # down from the 3rd shard's PUT on
        run encode with AWS_ENDPOINT_URL=proxy.endpoint ...   # ends in a clear one-line error
        proxy.up()                                            # the store answers again

It forwards bytes both ways (plain HTTP to the local S3 server). Once a request matching the
pattern starts, that connection is cut before the request reaches the server, and every later
connection is accepted and closed at once: what clients see of a store that stopped answering.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from urllib.parse import urlparse

HOST = "127.0.0.1"
CHUNK = 64 << 10
KEEP = 512  # bytes of the stream kept to find a pattern split between two reads


class FaultProxy:
    """Forward 127.0.0.1:PORT to a server's endpoint; go down on a request pattern or at once."""

    def __init__(self, endpoint: str) -> None:
        target = urlparse(endpoint)
        self.target = (target.hostname, target.port)
        self.pattern: re.Pattern[bytes] | None = None
        self.down = threading.Event()
        self.listener = socket.create_server((HOST, 0))
        self.endpoint = f"http://{HOST}:{self.listener.getsockname()[1]}"
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()
        self._cut_all()

    def fail_on(self, pattern: bytes) -> None:
        """Go down when a request matching `pattern` (a regex on the raw stream) is sent."""
        self.pattern = re.compile(pattern)

    def go_down(self) -> None:
        self.down.set()
        self._cut_all()

    def up(self) -> None:
        self.pattern = None
        self.down.clear()

    def _cut_all(self) -> None:
        with self.lock:
            for s in list(self.sockets):
                _close(s)
            self.sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if self.down.is_set():
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.sockets.update((client, server))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        tail = b""
        try:
            while data := src.recv(CHUNK):
                if self.down.is_set():
                    break
                if requests and self.pattern is not None and self.pattern.search(tail + data):
                    self.go_down()
                    break
                tail = (tail + data)[-KEEP:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
