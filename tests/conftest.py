"""Shared fixtures."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_dcp_single_process_warning() -> None:
    logging.getLogger("stmixer_dist_ckpt").setLevel(logging.INFO)
