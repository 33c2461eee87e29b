"""An S3-compatible server for the tests: moto's standalone server, started once per test session
on a loopback port, with a bucket per test. Where moto is not installed the tests that need it
skip; with CI=true they fail instead (CI installs it, and must never go green without it)."""

from __future__ import annotations

import logging
import os
import secrets
import urllib.request

import pytest


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)     # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        # What obstore (and any AWS client) reads; the server and the processes a test starts see them.
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def new_bucket(self) -> str:
        """A fresh bucket; returns its s3:// URL with a prefix, as `--blobs` takes it."""
        name = f"tb-{secrets.token_hex(6)}"
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=10).close()
        return f"s3://{name}/files"

    def stop(self) -> None:
        self._server.stop()


def start_or_skip() -> S3Server:
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the S3-compatible test server cannot be started: {exc}")
        pytest.skip(f"moto (the S3-compatible test server) is not installed: {exc}")
    return S3Server()
