"""The demo's final checks: the tag, integrity, a sharded reload, and the consolidated copy."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..checkpointer import Checkpointer
from ..storage import resolve_location
from .model import build_demo_model
from .train import DEMO_MODEL_CONFIG

if TYPE_CHECKING:
    from .run import DemoOptions, DemoReport

__all__ = ["consolidate_and_verify"]


def _differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    problems = sorted(set(actual) ^ set(expected))
    for key in sorted(set(actual) & set(expected)):
        if not torch.equal(actual[key], expected[key]):
            problems.append(key)
    return problems


def consolidate_and_verify(options: DemoOptions, reference_path: str, report: DemoReport) -> None:
    """Check the final checkpoint every way a user would consume it, adding results to ``report``."""
    from ..consolidate import consolidate
    from ..integrity import verify_checkpoint

    reference: dict[str, Any] = torch.load(reference_path, weights_only=True)  # written by our own rank 0
    save_dir = resolve_location(options.save_dir, options.storage_options)
    final = save_dir.join("model_final")

    probe = Checkpointer(build_demo_model(DEMO_MODEL_CONFIG), save_dir=options.save_dir, storage_options=options.storage_options)
    report.check("last_checkpoint names model_final", probe.get_checkpoint_file() == final.url, probe.get_checkpoint_file())

    integrity = verify_checkpoint(final.url, storage_options=options.storage_options)
    report.check("integrity of model_final (size and XXH3-64 checksum of every file)", integrity.ok, f"{integrity.files_checked} files, {integrity.bytes_read / 1e6:.1f} MB read, {len(integrity.problems)} problem(s)")

    fresh = build_demo_model(DEMO_MODEL_CONFIG)
    started = time.perf_counter()
    extras = Checkpointer(fresh, storage_options=options.storage_options).load(final.url)
    reload_s = time.perf_counter() - started
    problems = _differences(fresh.state_dict(), reference)
    report.check(
        "sharded model_final reloads equal to the trained model",
        not problems and extras.get("iteration") == options.max_iter,
        f"{len(reference)} tensors, iteration {extras.get('iteration')}, {reload_s:.2f} s single process"
        + (f"; differing: {problems[:5]}" if problems else ""),
    )

    consolidated = save_dir.join("model_final.pth")
    started = time.perf_counter()
    summary = consolidate(final.url, consolidated.url, storage_options=options.storage_options)
    seconds = time.perf_counter() - started
    size = consolidated.size()
    report.lines.append(
        f"consolidated {final.url} -> {consolidated.url}: {size / 1e6:.1f} MB in {seconds:.2f} s "
        f"({size / max(seconds, 1e-9) / 1e6:.1f} MB/s)"
    )
    del summary
    with consolidated.open("rb") as stream:
        single = torch.load(stream, weights_only=True, map_location="cpu")
    plain = build_demo_model(DEMO_MODEL_CONFIG)
    plain.load_state_dict(single["model"])
    problems = _differences(plain.state_dict(), reference)
    report.check(
        "consolidated file loads with torch.load(weights_only=True) into a fresh model, equal to the trained one",
        not problems,
        f"keys: {sorted(single)}" + (f"; differing: {problems[:5]}" if problems else ""),
    )
    via_checkpointer = build_demo_model(DEMO_MODEL_CONFIG)
    Checkpointer(via_checkpointer, storage_options=options.storage_options).load(consolidated.url)
    problems = _differences(via_checkpointer.state_dict(), reference)
    report.check("consolidated file loads through Checkpointer.load as a legacy single file", not problems)
