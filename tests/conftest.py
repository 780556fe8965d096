"""Shared fixtures."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_dcp_single_process_warning() -> None:
    logging.getLogger("stmixer_dist_ckpt").setLevel(logging.INFO)


# S3: a moto server on 127.0.0.1 (session) and a fresh bucket per test; see tests/s3_server.py.
from .s3_server import s3_bucket, s3_endpoint  # noqa: E402,F401
