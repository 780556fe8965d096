"""A real S3 HTTP endpoint on 127.0.0.1 for the tests: moto's threaded server on a free port.

One server per pytest process (session fixture); one fresh bucket per test,
so tests never see each other's objects and need no cleanup. Everything a
test needs to reach it, also from spawned ranks and torchrun workers, is in
:attr:`S3Bucket.storage_options` (plain, picklable data).

s3fs caches filesystem instances per argument set (fsspec's ``_Cached``
metaclass) and each instance caches listings; both are cleared after every
test so one test's cached listing can never hide another test's objects.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["S3Bucket", "S3Endpoint", "s3_endpoint", "s3_bucket", "s3_filesystem"]


@dataclass(frozen=True)
class S3Endpoint:
    """Where the local S3 server listens."""

    url: str

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this endpoint; moto accepts any credentials."""
        return {
            "endpoint_url": self.url,
            "key": "testing",
            "secret": "testing",
            **extra,
        }


@dataclass(frozen=True)
class S3Bucket:
    """A bucket that exists only for one test."""

    name: str
    endpoint: S3Endpoint

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.endpoint.storage_options()


def s3_filesystem(storage_options: dict[str, Any]) -> Any:
    """An s3fs filesystem outside the instance cache: it sees storage like another process would."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **storage_options)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1 and a free port (never a fixed one: xdist workers run side by side)."""
    pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install -e '.[test]'")
    moto_server = pytest.importorskip("moto.server", reason="S3 tests need moto[server]: pip install -e '.[test]'")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> Iterator[S3Bucket]:
    """A fresh, empty bucket; s3fs instance and listing caches are cleared afterwards."""
    import s3fs

    bucket = S3Bucket(name=f"test-{uuid.uuid4().hex[:12]}", endpoint=s3_endpoint)
    s3_filesystem(bucket.storage_options).mkdir(bucket.name)
    try:
        yield bucket
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
