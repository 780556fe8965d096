"""Match a loaded legacy state dict onto a model's keys, and report what happened.

Upstream (maskrcnn-benchmark's ``align_and_update_state_dicts``, kept by
AlphAction and STMixer) scored every model key against every loaded key with a
plain ``str.endswith`` in an N x M tensor. That let ``mask_fcn1.bias`` fill
``sem_mask_fcn1.bias``, let one short key be copied into many layers
(maskrcnn-benchmark #15), removed ``module.`` from the middle of names, crashed
on an empty dict and on any shape mismatch, and kept unmatched model keys at
their initial values without a word.

:func:`match_state_dict` keeps the useful part (a checkpoint saved from a
sub-module, or from a DDP-wrapped model, still lands on the right keys) with
the rules of seed_semantics §10.6, in the manner of detectron2: suffixes match
only on dot boundaries, the longest wins, an ambiguous match is an error, and a
shape mismatch is skipped and reported. It returns the dict to load plus a
:class:`LoadReport`; it never touches a model, so it runs without a process
group and on shapes alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import IncompatibleCheckpointError

__all__ = ["DDP_PREFIX", "LoadReport", "match_state_dict"]

DDP_PREFIX = "module."
"""What ``DistributedDataParallel``/``DataParallel`` put before every key."""

_Shape = tuple[int, ...]


def _natural_key(text: str) -> list[int | str]:
    # "res10" after "res2", as a person reads layer names.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _compact_keys(keys: Iterable[str]) -> list[str]:
    """Fold dotted keys that differ in one component into ``a.{x,y}.b`` lines.

    Every entry is a product of per-component sets, and two entries merge only
    when all other components are equal, so the lines expand back to exactly
    the input keys. Components are folded from the last to the first: first
    ``{bias,weight}``, then ``branch2.{a,b,c}.weight``, and so on.
    """
    entries: set[tuple[tuple[str, ...], ...]] = {tuple((part,) for part in key.split(".")) for key in keys}
    depth = max((len(entry) for entry in entries), default=0)
    for back in range(1, depth + 1):
        folded: dict[tuple[int, tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]], set[str]] = {}
        kept: set[tuple[tuple[str, ...], ...]] = set()
        for entry in entries:
            if len(entry) < back:
                kept.add(entry)
                continue
            i = len(entry) - back
            folded.setdefault((len(entry), entry[:i], entry[i + 1 :]), set()).update(entry[i])
        for (_, head, tail), parts in folded.items():
            kept.add((*head, tuple(sorted(parts, key=_natural_key)), *tail))
        entries = kept
    ordered = sorted(entries, key=lambda entry: [_natural_key(parts[0]) for parts in entry])
    return [
        ".".join(parts[0] if len(parts) == 1 else "{" + ",".join(parts) + "}" for parts in entry)
        for entry in ordered
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    """What :func:`match_state_dict` loaded, skipped and could not place.

    Checkpoint key names are the ones the matcher used, i.e. after a leading
    ``module.`` was stripped (see ``stripped_prefix``).

    Attributes:
        loaded: model key to the checkpoint key it is filled from.
        missing: model keys with no checkpoint key; they keep their current values.
        unexpected: checkpoint keys that fill no model key.
        wrong_shape: model key to ``(checkpoint shape, model shape)`` for matches
            skipped because the shapes differ (e.g. a 400-class head into 80).
        head_skipped: keys left out on purpose by ``skip_head``: the model key
            when one matched, else the checkpoint key.
        stripped_prefix: the prefix removed from every checkpoint key, or ``""``.
    """

    loaded: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: dict[str, tuple[_Shape, _Shape]] = field(default_factory=dict)
    head_skipped: list[str] = field(default_factory=list)
    stripped_prefix: str = ""

    @property
    def is_clean(self) -> bool:
        """True when every model key was filled and every checkpoint key used.

        Head skipping is requested, so it does not make a report unclean.
        """
        return not (self.missing or self.unexpected or self.wrong_shape)

    def format(self, *, verbose: bool = False) -> str:
        """Render the report for a log, with keys folded by module prefix.

        Args:
            verbose: also list every match whose model and checkpoint keys differ
                (suffix matches), one per line.

        Returns:
            A multi-line string.

        Example:
            >>> print(LoadReport(loaded={"a.w": "a.w"}, missing=["b.x.bias", "b.x.weight"]).format())
            Loaded 1 model key from the checkpoint.
            Missing from the checkpoint, left at their current values (2):
              b.x.{bias,weight}
        """
        strip_note = (
            f" (checkpoint keys lost a leading {self.stripped_prefix!r})" if self.stripped_prefix else ""
        )
        plural = "" if len(self.loaded) == 1 else "s"
        lines = [f"Loaded {len(self.loaded)} model key{plural} from the checkpoint{strip_note}."]

        def add_section(title: str, keys: Sequence[str]) -> None:
            if keys:
                lines.append(f"{title} ({len(keys)}):")
                lines.extend(f"  {line}" for line in _compact_keys(keys))

        add_section("Missing from the checkpoint, left at their current values", self.missing)
        add_section("Unexpected in the checkpoint, not loaded", self.unexpected)
        if self.wrong_shape:
            lines.append(f"Wrong shape, not loaded ({len(self.wrong_shape)}; checkpoint vs model):")
            for key in sorted(self.wrong_shape, key=_natural_key):
                ckpt_shape, model_shape = self.wrong_shape[key]
                lines.append(f"  {key}: {ckpt_shape} vs {model_shape}")
        add_section("Skipped as head (skip_head), not loaded", self.head_skipped)
        if verbose:
            renamed = {
                model_key: ckpt_key for model_key, ckpt_key in self.loaded.items() if model_key != ckpt_key
            }
            if renamed:
                lines.append(f"Matched by suffix ({len(renamed)}; model key <- checkpoint key):")
                lines.extend(
                    f"  {model_key} <- {renamed[model_key]}"
                    for model_key in sorted(renamed, key=_natural_key)
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def log(self, logger: logging.Logger) -> None:
        """Log the report: INFO when clean, WARNING otherwise; suffix matches at DEBUG.

        Args:
            logger: where to log, usually the caller's module logger.
        """
        logger.log(logging.INFO if self.is_clean else logging.WARNING, "%s", self.format())
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", self.format(verbose=True))


def _strip_ddp_prefix(loaded: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove a leading ``module.`` when every key has it; otherwise change nothing.

    All-or-nothing, like upstream and fvcore: a mix means the dict was not
    saved from one wrapped model, and stripping only some keys could make
    ``module.x`` and ``x`` collide. Only the prefix goes (``removeprefix``),
    never a ``module.`` in the middle (upstream's ``str.replace`` turned
    ``a.submodule.w`` into ``a.subw``).
    """
    if all(key.startswith(DDP_PREFIX) for key in loaded):
        return {key.removeprefix(DDP_PREFIX): value for key, value in loaded.items()}, DDP_PREFIX
    return dict(loaded), ""


def _dot_suffixes(key: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``: longest first, cut only at dots."""
    yield key
    dot = key.find(".")
    while dot != -1:
        if dot + 1 < len(key):
            yield key[dot + 1 :]
        dot = key.find(".", dot + 1)


def _check_inputs(loaded: Mapping[str, torch.Tensor]) -> None:
    if not loaded:
        raise IncompatibleCheckpointError(
            "the checkpoint's state dict is empty, so nothing can be loaded into the model. Check that "
            "the file holds weights (e.g. under 'model') and that the right file was given."
        )
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise IncompatibleCheckpointError(
                f"checkpoint key {key!r} is a {type(key).__name__}; state dict keys must be strings."
            )
        if not isinstance(value, torch.Tensor):
            raise IncompatibleCheckpointError(
                f"checkpoint key {key!r} holds a {type(value).__name__}, not a tensor; convert it to a "
                "tensor or remove it from the state dict before loading."
            )


def match_state_dict(
    model_shapes: Mapping[str, torch.Size | tuple[int, ...]],
    loaded: Mapping[str, torch.Tensor],
    *,
    head_prefixes: Sequence[str] = (),
    skip_head: bool = False,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Decide which loaded tensor fills which model key.

    Rules, in order:

    1. A leading ``module.`` is stripped from the checkpoint keys when every
       key has it (a DDP-saved file), and only as a prefix.
    2. A checkpoint key is a candidate for a model key when it is equal to it,
       or when the model key ends with ``"." + checkpoint_key``; so
       ``mask_fcn1.bias`` never fills ``sem_mask_fcn1.bias``. The longest
       candidate wins. Each model key costs one dict lookup per dot in it, not
       a pass over the checkpoint.
    3. With ``skip_head``, a model key or its best checkpoint key starting with
       any of ``head_prefixes`` is not loaded, and checkpoint keys with such a
       prefix are not "unexpected"; all of them are reported as head-skipped.
    4. A checkpoint key that is the best match of two or more model keys is an
       error: copying one tensor into several layers is how a short generic key
       ended up in the wrong layer upstream.
    5. A match whose shapes differ is skipped and reported, never raised.

    Args:
        model_shapes: model key to shape, e.g.
            ``{k: v.shape for k, v in model.state_dict().items()}``.
        loaded: checkpoint key to tensor.
        head_prefixes: prefixes of the task head, ending in ``"."`` (e.g.
            ``("roi_heads.", "stm_head.")``).
        skip_head: leave the head out (fine-tuning on another label set).

    Returns:
        ``(state_dict, report)``: model key to tensor for every match to load
        (tensors as loaded; ``load_state_dict`` casts dtypes on copy), and the
        :class:`LoadReport`.

    Raises:
        IncompatibleCheckpointError: ``loaded`` is empty, holds a non-tensor,
            or a checkpoint key is the best match of several model keys.
        ValueError: ``skip_head`` is set but ``head_prefixes`` is empty, which
            would skip nothing (upstream's ``no_head`` was silently a no-op for
            STMixer models).

    Example:
        >>> import torch
        >>> shapes = {"backbone.conv.weight": torch.Size([2]), "head.fc.weight": torch.Size([3])}
        >>> sd, report = match_state_dict(
        ...     shapes, {"module.conv.weight": torch.zeros(2), "module.head.fc.weight": torch.zeros(4)}
        ... )
        >>> list(sd), report.wrong_shape
        (['backbone.conv.weight'], {'head.fc.weight': ((4,), (3,))})
    """
    if skip_head and not head_prefixes:
        raise ValueError(
            "skip_head=True needs head_prefixes (e.g. ('roi_heads.', 'stm_head.')); with none, no "
            "key would be skipped."
        )
    _check_inputs(loaded)
    ckpt, stripped = _strip_ddp_prefix(loaded)
    prefixes = tuple(head_prefixes) if skip_head else ()

    def is_head(key: str) -> bool:
        return bool(prefixes) and key.startswith(prefixes)

    claims: dict[str, list[str]] = {}
    missing: list[str] = []
    head_skipped: set[str] = set()
    consumed: set[str] = set()
    for model_key in model_shapes:
        best = next((suffix for suffix in _dot_suffixes(model_key) if suffix in ckpt), None)
        if best is not None and (is_head(model_key) or is_head(best)):
            head_skipped.add(model_key)
            consumed.add(best)
        elif best is None and is_head(model_key):
            head_skipped.add(model_key)
        elif best is None:
            missing.append(model_key)
        else:
            claims.setdefault(best, []).append(model_key)

    ambiguous = {ckpt_key: keys for ckpt_key, keys in claims.items() if len(keys) > 1}
    if ambiguous:
        details = "; ".join(
            f"{ckpt_key!r} matches model keys {', '.join(map(repr, sorted(keys)))}"
            for ckpt_key, keys in sorted(ambiguous.items())
        )
        raise IncompatibleCheckpointError(
            f"ambiguous checkpoint keys, each the best match of several model keys: {details}. "
            "Loading would copy one tensor into several layers. Rename the checkpoint keys to the full "
            "model names (or save the checkpoint from the same model class)."
        )

    matched: dict[str, str] = {}
    wrong_shape: dict[str, tuple[_Shape, _Shape]] = {}
    for ckpt_key, (model_key,) in claims.items():
        consumed.add(ckpt_key)
        ckpt_shape = tuple(ckpt[ckpt_key].shape)
        model_shape = tuple(int(dim) for dim in model_shapes[model_key])
        if ckpt_shape != model_shape:
            wrong_shape[model_key] = (ckpt_shape, model_shape)
            continue
        matched[model_key] = ckpt_key
    # Keep the model's key order: it is the order a reader of the log expects.
    loaded_order = {model_key: matched[model_key] for model_key in model_shapes if model_key in matched}
    result = {model_key: ckpt[ckpt_key] for model_key, ckpt_key in loaded_order.items()}

    unexpected: list[str] = []
    for ckpt_key in ckpt:
        if ckpt_key in consumed:
            continue
        if is_head(ckpt_key):
            head_skipped.add(ckpt_key)
        else:
            unexpected.append(ckpt_key)

    report = LoadReport(
        loaded=loaded_order,
        missing=missing,
        unexpected=unexpected,
        wrong_shape=wrong_shape,
        head_skipped=sorted(head_skipped, key=_natural_key),
        stripped_prefix=stripped,
    )
    return result, report
