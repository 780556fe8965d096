"""``ActionCheckpointer``: the STMixer/AlphAction checkpointer, plus Caffe2 ``.pkl`` weights.

STMixer and AlphAction start training from Caffe2/Detectron video weights
(``SLOWFAST_8x8_R50.pkl``, ``I3D_...pkl``) through ``ActionCheckpointer``; the
base :class:`~stmixer_dist_ckpt.checkpointer.Checkpointer` reads everything
else. What this subclass adds is format sniffing for single files:

* ``*.pkl`` (any case) is a Caffe2 blob file, converted by PySlowFast's rename
  rules or by the model's own ``c2_weight_mapping()`` (see :class:`C2WeightMap`);
  a ``.pkl`` that is really a ``torch.save`` archive (some PySlowFast model-zoo
  downloads) is loaded as the ``.pth`` it is, with a warning;
* anything else that is a file goes to the base class: upstream ``.pth``
  checkpoints with a pickled AlphAction ``MemoryPool``, bare state dicts,
  VideoMAE ``{"module": ...}`` files.

Every single file is opened by rank 0 alone; other ranks do not even stat it.
Weights reach them through ``set_model_state_dict(broadcast_from_rank0=True)``,
one tensor at a time: DDP ranks end with identical copies, and each FSDP2 rank
keeps only its own shard. On a 64-rank job that is one read of a 200 MB file
from shared storage instead of 64, and no rank but 0 ever holds the unpickled
file (``benchmarks/bench_c2_broadcast.py`` measures both).
"""

from __future__ import annotations

import copy
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import collective
from .c2_conversion import NUM_BATCHES_TRACKED, open_weight_file
from .checkpointer import Checkpointer
from .legacy.c2_pickle import load_c2_state_dict
from .legacy.key_matching import LoadReport
from .legacy.legacy_file import is_torch_zip, load_legacy_checkpoint
from .load_result import LoadResult
from .single_file import apply_single_file_model, read_on_rank0

__all__ = ["ActionCheckpointer", "C2LoadReport", "C2WeightMap"]

# Travels with the non-model entries rank 0 broadcasts, so every rank knows the
# file was a Caffe2 one; popped before anything reaches the caller.
_FORMAT_KEY = "__stmixer_dist_ckpt_format__"
_CAFFE2 = "caffe2"
_PICKLE_SUFFIX = ".pkl"


class C2WeightMap(enum.Enum):
    """How Caffe2 blob names become model keys.

    Attributes:
        AUTO: the model's ``c2_weight_mapping()`` when it has one (AlphAction
            models), else :attr:`RULES` (STMixer models). This reproduces each
            upstream project's own behaviour without configuration.
        RULES: PySlowFast's rename rules plus ``backbone.``, as STMixer did.
        MODEL: the model's ``c2_weight_mapping()`` (looked up through DDP's
            ``.module``), as AlphAction did; an error if the model has none.
    """

    AUTO = "auto"
    RULES = "rules"
    MODEL = "model"


@dataclass(frozen=True, slots=True, kw_only=True)
class C2LoadReport(LoadReport):
    """A :class:`LoadReport` for a Caffe2 file, with the keys such files never hold set aside.

    Caffe2 BatchNorm has no step counter, so every ``num_batches_tracked``
    buffer would be "missing" and make a clean load look broken (and fail a
    strict one). They are listed here instead, not in ``missing``; they keep
    their current values, which is what every upstream C2 loader did too.

    Attributes:
        expected_missing: model keys absent because the format cannot hold them.
    """

    expected_missing: list[str] = field(default_factory=list)

    def format(self, *, verbose: bool = False) -> str:
        # Explicit base call: zero-argument super() breaks in slots dataclasses.
        text = LoadReport.format(self, verbose=verbose)
        if self.expected_missing:
            text += (
                f"\nNot stored in Caffe2 files, kept at their current values ({len(self.expected_missing)}): "
                f"BatchNorm {NUM_BATCHES_TRACKED} counters (expected)."
            )
        return text


def _set_aside_num_batches_tracked(report: LoadReport) -> C2LoadReport:
    expected = [key for key in report.missing if key.rsplit(".", 1)[-1] == NUM_BATCHES_TRACKED]
    skipped = set(expected)
    return C2LoadReport(
        loaded=report.loaded,
        missing=[key for key in report.missing if key not in skipped],
        unexpected=report.unexpected,
        wrong_shape=report.wrong_shape,
        head_skipped=report.head_skipped,
        stripped_prefix=report.stripped_prefix,
        expected_missing=expected,
    )


def _mapping_owner(model: nn.Module) -> nn.Module | None:
    """The module that defines ``c2_weight_mapping``: the model, or what a wrapper holds.

    DDP and DataParallel keep the user's model in ``.module`` (AlphAction's
    ``_get_c2_weight_map`` looked there too) and ``torch.compile`` in ``._orig_mod``.
    """
    current: nn.Module = model
    for _ in range(4):  # wrappers nest at most a few levels deep (compile(DDP(model)))
        if callable(getattr(current, "c2_weight_mapping", None)):
            return current
        inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(current, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        current = inner
    return None


def _copy_cfg(cfg: Any) -> Any:
    """A private copy of ``cfg``, so later edits by the caller do not show up in ``self.cfg``."""
    clone = getattr(cfg, "clone", None)
    if callable(clone):  # yacs CfgNode, as upstream required
        return clone()
    try:
        return copy.deepcopy(cfg)
    except Exception:  # a config holding e.g. a lock or a module: keep it as given, nothing reads it
        return cfg


def _weight_map_option(
    option: C2WeightMap | str | Mapping[str, str], model: nn.Module
) -> C2WeightMap | dict[str, str]:
    if isinstance(option, Mapping):
        bad = [(k, v) for k, v in option.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ValueError(
                f"c2_weight_map must map model keys to Caffe2 blob names (str -> str); found {bad[:3]}"
            )
        return dict(option)
    try:
        mode = C2WeightMap(option)
    except ValueError as exc:
        choices = ", ".join(repr(m.value) for m in C2WeightMap)
        raise ValueError(
            f"c2_weight_map={option!r} is not a mode; use one of {choices} or a {{model_key: c2_blob_name}} dict"
        ) from exc
    if mode is C2WeightMap.MODEL and _mapping_owner(model) is None:
        raise ValueError(
            f"c2_weight_map='model' needs a model with a c2_weight_mapping() method (also looked up under "
            f".module), and {type(model).__name__} has none; use c2_weight_map='rules' for PySlowFast-named "
            "models such as STMixer's"
        )
    return mode


class ActionCheckpointer(Checkpointer):
    """The Checkpointer that also loads Caffe2 ``.pkl`` weights, read once and broadcast.

    It has the base class's API (``save``, ``load``, ``resume_or_load``,
    ``has_checkpoint``, ...) and upstream's constructor, ``cfg`` first.

    ``cfg`` is **not read**: no field of it selects anything. Upstream stored
    ``cfg.clone()`` and never looked at it again (a leftover from
    maskrcnn-benchmark, which picked its C2 loader by
    ``cfg.MODEL.BACKBONE.CONV_BODY``); keeping it out of the loading logic means
    a config cannot silently change what a load does. It is accepted in any form
    (a yacs ``CfgNode``, a dict, an attribute object, ``None``) and kept as
    ``self.cfg``: ``cfg.clone()`` when it has one, else a deep copy, else the
    object itself. The C2 naming mode is the keyword ``c2_weight_map``.

    Args:
        cfg: the experiment config; stored as ``self.cfg``, never read.
        model: plain, DDP-wrapped or FSDP2 (``fully_shard``) model.
        optimizer: as in :class:`Checkpointer`.
        scheduler: as in :class:`Checkpointer`.
        save_dir: as in :class:`Checkpointer`.
        save_to_disk: as in :class:`Checkpointer`.
        logger: as in :class:`Checkpointer`.
        c2_weight_map: how ``.pkl`` blob names become model keys: a
            :class:`C2WeightMap` (or its value as a string), or an explicit
            ``{model_key: c2_blob_name}`` mapping.
        **kwargs: keyword options of :class:`Checkpointer` (``storage_options``,
            ``head_prefixes``, ``process_group``, ``allow_unsafe_pickle``, ...).

    Raises:
        ValueError: ``c2_weight_map`` is an unknown mode, or is
            :attr:`C2WeightMap.MODEL` while the model has no ``c2_weight_mapping()``.

    Example:
        >>> from stmixer_dist_ckpt import ActionCheckpointer
        >>> from stmixer_dist_ckpt.demo import build_demo_model
        >>> model = torch.nn.parallel.DistributedDataParallel(build_demo_model())  # doctest: +SKIP
        >>> ckpt = ActionCheckpointer(cfg, model, optimizer, scheduler, cfg.OUTPUT_DIR, get_rank() == 0)  # doctest: +SKIP
        >>> ckpt.load("SLOWFAST_8x8_R50.pkl", model_weight_only=True)  # doctest: +SKIP
        {'iteration': 0, 'person_pool': MemoryPool(movies=0, entries=0)}
    """

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        save_dir: str = "",
        save_to_disk: bool | None = None,
        logger: logging.Logger | None = None,
        *,
        c2_weight_map: C2WeightMap | str | Mapping[str, str] = C2WeightMap.AUTO,
        **kwargs: Any,
    ) -> None:
        # Validated before the base class starts anything (e.g. an async-save worker).
        weight_map = _weight_map_option(c2_weight_map, model)
        super().__init__(model, optimizer, scheduler, save_dir, save_to_disk, logger, **kwargs)
        self.cfg = _copy_cfg(cfg)
        self.c2_weight_map: C2WeightMap | dict[str, str] = weight_map

    # ------------------------------------------------------------------ load
    def _load_file(self, f: str) -> dict[str, Any]:
        """Read a single file on rank 0: ``.pkl`` here, everything else in the base class."""
        if not _is_pickle(f):
            return super()._load_file(f)
        return read_on_rank0(f, self._read_pickle_file, group=self.process_group)

    def _read_pickle_file(self, url: str) -> dict[str, Any]:
        """Runs on rank 0 only: unpickle and convert, or load a mis-suffixed torch archive."""
        with open_weight_file(url, storage_options=self.storage_options) as stream:
            if is_torch_zip(stream):
                self.logger.warning(
                    "%s is a torch.save archive despite its .pkl suffix (as some PySlowFast model-zoo "
                    "downloads are); loading it as a .pth checkpoint",
                    url,
                )
                return load_legacy_checkpoint(
                    stream, source=url, allow_unsafe_pickle=self.allow_unsafe_pickle
                )
            weights = load_c2_state_dict(stream, source=url, weight_map=self._weight_map())
        return {"model": weights, _FORMAT_KEY: _CAFFE2}

    def _weight_map(self) -> dict[str, str] | None:
        """The ``{model_key: blob}`` map to use, or ``None`` for the rename rules."""
        if isinstance(self.c2_weight_map, dict):
            return self.c2_weight_map
        if self.c2_weight_map is C2WeightMap.RULES:
            return None
        owner = _mapping_owner(self.model)
        if owner is None:  # AUTO on a model without a map; MODEL was checked in __init__
            return None
        mapping: Any = getattr(owner, "c2_weight_mapping")()  # noqa: B009 - nn.Module types attributes as Tensor
        if not isinstance(mapping, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise TypeError(
                f"{type(owner).__name__}.c2_weight_mapping() returned a {type(mapping).__name__}; it must "
                "return a dict of model key to Caffe2 blob name (str -> str)"
            )
        self.logger.info(
            "Using %s.c2_weight_mapping() (%d entries) for Caffe2 names", type(owner).__name__, len(mapping)
        )
        return dict(mapping)

    def _apply_single_file(
        self,
        checkpoint: dict[str, Any],
        source: str,
        model_weight_only: bool,
        adjust_scheduler: bool,
        no_head: bool,
        strict: bool,
    ) -> LoadResult:
        if checkpoint.pop(_FORMAT_KEY, None) != _CAFFE2:
            return super()._apply_single_file(
                checkpoint, source, model_weight_only, adjust_scheduler, no_head, strict
            )
        report = apply_single_file_model(
            self.model,
            checkpoint.pop("model"),
            head_prefixes=self.head_prefixes,
            skip_head=no_head,
            strict=strict,
            source=source,
            group=self.process_group,
            report_hook=_set_aside_num_batches_tracked,
        )
        if collective.get_rank(self.process_group) == 0:
            expected = len(getattr(report, "expected_missing", ()))
            self.logger.info(
                "Loaded %d model keys from Caffe2 file %s; %d BatchNorm %s buffers keep their values "
                "(Caffe2 files hold none)",
                len(report.loaded),
                source,
                expected,
                NUM_BATCHES_TRACKED,
            )
        # A Caffe2 file holds weights only: no optimizer, scheduler or extras to restore.
        return self._finish(checkpoint, model_weight_only, report)


def _is_pickle(path: str) -> bool:
    return path.lower().endswith(_PICKLE_SUFFIX)
