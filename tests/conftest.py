"""Shared fixtures."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_dcp_single_process_warning() -> None:
    logging.getLogger("stmixer_dist_ckpt").setLevel(logging.INFO)


@pytest.fixture(autouse=True)
def _isolated_safe_class_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_safe_class() is process-wide: a test that registers a class (some run rank bodies
    in-process) must not make a later test's "unregistered class is refused" check pass by luck."""
    from stmixer_dist_ckpt import safe_pickle

    monkeypatch.setattr(safe_pickle, "_user_allowed", dict(safe_pickle._user_allowed))


# S3: a moto server on 127.0.0.1 (session) and a fresh bucket per test; see tests/s3_server.py.
from .s3_server import s3_bucket, s3_endpoint  # noqa: E402,F401
