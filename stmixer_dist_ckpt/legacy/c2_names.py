"""Caffe2 blob names to STMixer/PySlowFast parameter names, and blobs to tensors.

Caffe2 video checkpoints (the Kinetics SlowFast/I3D ``.pkl`` files STMixer and
AlphAction start from) name their weights ``res2_0_branch2a_bn_s`` and so on.
STMixer converts them with PySlowFast's regular-expression chain and then puts
the result under ``backbone.``; :func:`convert_c2_name` is that chain, rule for
rule, so a converted file lands on exactly the keys upstream produced.

:func:`convert_c2_blobs` and :func:`select_c2_blobs` turn the unpickled blob
dict into tensors. They differ from upstream on purpose (seed_semantics §10.7):
``*_momentum`` blobs are dropped rather than kept under names nothing matches,
two blobs that convert to one name are an error rather than a silent overwrite,
and a value that is not an array is an error naming the blob, where upstream
died inside ``torch.from_numpy`` with ``TypeError: expected np.ndarray``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, IncompatibleCheckpointError

__all__ = [
    "C2_BACKBONE_PREFIX",
    "C2_SKIPPED_BLOBS",
    "convert_c2_blobs",
    "convert_c2_name",
    "select_c2_blobs",
]

C2_BACKBONE_PREFIX = "backbone."
"""Prepended to every converted name: the PySlowFast network is STMixer's ``backbone``."""

C2_SKIPPED_BLOBS = frozenset({"lr", "model_iter"})
"""Training-state blobs that carry no weights (``model_iter`` is a plain int)."""

_MOMENTUM_SUFFIX = "_momentum"

# PySlowFast's ``get_name_convert_func`` table as STMixer ships it
# (alphaction/utils/c2_model_loading.py), in order. Each rule rewrites the output
# of the previous one, and ``re.sub`` replaces every match, as upstream does; the
# order and the unanchored head rules matter, so do not "tidy" this table.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # Non-local blocks: nonlocal_conv3_1_theta_w -> s3.pathway0_nonlocal1.conv_theta.weight
        (r"^nonlocal_conv([0-9]+)_([0-9]+)_(.*)", r"s\1.pathway0_nonlocal\2_\3"),
        (r"^(.*)_nonlocal([0-9]+)_(theta)(.*)", r"\1_nonlocal\2.conv_\3\4"),
        (r"^(.*)_nonlocal([0-9]+)_(g)(.*)", r"\1_nonlocal\2.conv_\3\4"),
        (r"^(.*)_nonlocal([0-9]+)_(phi)(.*)", r"\1_nonlocal\2.conv_\3\4"),
        (r"^(.*)_nonlocal([0-9]+)_(out)(.*)", r"\1_nonlocal\2.conv_\3\4"),
        (r"^(.*)_nonlocal([0-9]+)_(bn)_(.*)", r"\1_nonlocal\2.\3.\4"),
        # Fast-to-slow lateral fusion.
        (r"^t_pool1_subsample_bn_(.*)", r"s1_fuse.bn.\1"),
        (r"^t_pool1_subsample_(.*)", r"s1_fuse.conv_f2s.\1"),
        (r"^t_res([0-9]+)_([0-9]+)_branch2c_bn_subsample_bn_(.*)", r"s\1_fuse.bn.\3"),
        (r"^t_res([0-9]+)_([0-9]+)_branch2c_bn_subsample_(.*)", r"s\1_fuse.conv_f2s.\3"),
        # Slow pathway (pathway0).
        (r"^res([0-9]+)_([0-9]+)_branch([0-9]+)([a-z])_(.*)", r"s\1.pathway0_res\2.branch\3.\4_\5"),
        (r"^res_conv1_bn_(.*)", r"s1.pathway0_stem.bn.\1"),
        (r"^conv1_xy(.*)", r"s1.pathway0_stem.conv_xy\1"),
        (r"^conv1_(.*)", r"s1.pathway0_stem.conv.\1"),
        (r"^res([0-9]+)_([0-9]+)_branch([0-9]+)_(.*)", r"s\1.pathway0_res\2.branch\3_\4"),
        (r"^res_conv1_(.*)", r"s1.pathway0_stem.conv.\1"),
        # Fast pathway (pathway1): the same rules behind a ``t_`` prefix.
        (r"^t_res([0-9]+)_([0-9]+)_branch([0-9]+)([a-z])_(.*)", r"s\1.pathway1_res\2.branch\3.\4_\5"),
        (r"^t_res_conv1_bn_(.*)", r"s1.pathway1_stem.bn.\1"),
        (r"^t_conv1_(.*)", r"s1.pathway1_stem.conv.\1"),
        (r"^t_res([0-9]+)_([0-9]+)_branch([0-9]+)_(.*)", r"s\1.pathway1_res\2.branch\3_\4"),
        (r"^t_res_conv1_(.*)", r"s1.pathway1_stem.conv.\1"),
        # Heads and X3D extras; unanchored upstream, kept unanchored.
        (r"pred_(.*)", r"head.projection.\1"),
        (r"(.*)b_bn_fc(.*)", r"\1se.fc\2"),
        (r"conv_5(.*)", r"head.conv_5\1"),
        (r"lin_5(.*)", r"head.lin_5\1"),
        # Suffixes, anchored at the end; ``.`` is any one character (``_bn_s``, ``.bn.s``).
        (r"(.*)bn.b\Z", r"\1bn.bias"),
        (r"(.*)bn.s\Z", r"\1bn.weight"),
        (r"(.*)bn.rm\Z", r"\1bn.running_mean"),
        (r"(.*)bn.riv\Z", r"\1bn.running_var"),
        (r"(.*)[\._]b\Z", r"\1.bias"),
        (r"(.*)[\._]w\Z", r"\1.weight"),
    )
)


def convert_c2_name(blob_name: str) -> str:
    """Convert one Caffe2 blob name to the key STMixer's model uses.

    Applies PySlowFast's rename rules in order, then the ``backbone.`` prefix.
    Names no rule knows pass through with only the prefix added; the key
    matcher then reports them as unexpected instead of loading them anywhere.

    Args:
        blob_name: an unscoped Caffe2 blob name (no ``gpu_0/`` prefix).

    Returns:
        The converted key.

    Example:
        >>> convert_c2_name("res2_0_branch2a_bn_rm")
        'backbone.s2.pathway0_res0.branch2.a_bn.running_mean'
        >>> convert_c2_name("t_pool1_subsample_w")
        'backbone.s1_fuse.conv_f2s.weight'
    """
    name = blob_name
    for pattern, replacement in _RULES:
        name = pattern.sub(replacement, name)
    return C2_BACKBONE_PREFIX + name


def _blob_to_tensor(blob_name: str, value: Any, source: str) -> torch.Tensor:
    """Copy a numpy blob into a tensor that owns writable, native-endian memory.

    ``torch.from_numpy`` shares memory with the array and warns on read-only
    arrays; a copy keeps the tensor independent of the unpickled dict (which the
    caller drops) and safe to load in place.
    """
    if not isinstance(value, np.ndarray):
        raise CheckpointError(
            f"{source}: blob {blob_name!r} holds a {type(value).__name__}, not a numpy array, so it "
            "cannot become a tensor. Caffe2 weight files hold arrays only; remove the entry from the "
            "file, or load it with a weight_map that leaves this blob out."
        )
    try:
        # np.ascontiguousarray would turn a 0-d blob into shape (1,); np.array keeps it.
        native = np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)
        return torch.from_numpy(native)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{source}: blob {blob_name!r} (dtype {value.dtype}, shape {value.shape}) cannot be "
            f"converted to a tensor: {e}"
        ) from e


def convert_c2_blobs(blobs: Mapping[str, Any], *, source: str) -> dict[str, torch.Tensor]:
    """Turn a Caffe2 blob dict into a state dict keyed by STMixer names.

    ``lr`` and ``model_iter`` are skipped, and ``*_momentum`` blobs (SGD
    momentum buffers, one per parameter) are dropped: they are optimizer state
    with no place in a model, and upstream's habit of keeping them under names
    like ``...conv.w_momentum`` only padded the "unexpected keys" report.

    Args:
        blobs: blob name to numpy array, as unpickled (``data["blobs"]`` or the
            flat dict).
        source: the file name used in error messages.

    Returns:
        Converted key to tensor, in the blobs' order.

    Raises:
        CheckpointError: a blob name is not a string or a value is not an array.
        IncompatibleCheckpointError: two blobs convert to the same key, so
            loading either would silently discard the other.

    Example:
        >>> import numpy as np
        >>> sd = convert_c2_blobs(
        ...     {"conv1_w": np.zeros((2, 3, 1, 1, 1), np.float32), "conv1_w_momentum": np.zeros(1),
        ...      "model_iter": 7},
        ...     source="toy.pkl",
        ... )
        >>> list(sd)
        ['backbone.s1.pathway0_stem.conv.weight']
    """
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for blob_name, value in blobs.items():
        if not isinstance(blob_name, str):
            raise CheckpointError(
                f"{source}: blob names must be strings, found {blob_name!r} "
                f"({type(blob_name).__name__}); this does not look like a Caffe2 weight file."
            )
        if blob_name in C2_SKIPPED_BLOBS or blob_name.endswith(_MOMENTUM_SUFFIX):
            continue
        key = convert_c2_name(blob_name)
        if key in origin:
            raise IncompatibleCheckpointError(
                f"{source}: blobs {origin[key]!r} and {blob_name!r} both convert to {key!r}; "
                "refusing to pick one silently. Remove one of them from the file, or load it with an "
                "explicit weight_map."
            )
        origin[key] = blob_name
        converted[key] = _blob_to_tensor(blob_name, value, source)
    return converted


def select_c2_blobs(
    blobs: Mapping[str, Any], weight_map: Mapping[str, str], *, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pick blobs through a model-provided ``{model_key: c2_blob_name}`` map.

    This is AlphAction's loading path: the model's ``c2_weight_mapping()`` names
    the blob for every parameter, so no regex runs and only mapped blobs are
    read (momentum, ``lr`` and ``model_iter`` are never touched unless mapped).

    Args:
        blobs: blob name to numpy array, as unpickled.
        weight_map: model key to blob name.
        source: the file name used in error messages.

    Returns:
        ``(state_dict, absent)``: model key to tensor for every mapped blob that
        exists, and the mapped blob names the file lacks, in map order.

    Raises:
        CheckpointError: a mapped blob is not a numpy array.

    Example:
        >>> import numpy as np
        >>> sd, absent = select_c2_blobs(
        ...     {"conv1_w": np.zeros((1,), np.float32)},
        ...     {"backbone.conv1.weight": "conv1_w", "backbone.bn1.weight": "res_conv1_bn_s"},
        ...     source="i3d.pkl",
        ... )
        >>> list(sd), absent
        (['backbone.conv1.weight'], ['res_conv1_bn_s'])
    """
    selected: dict[str, torch.Tensor] = {}
    absent: list[str] = []
    for model_key, blob_name in weight_map.items():
        if blob_name not in blobs:
            absent.append(blob_name)
            continue
        selected[model_key] = _blob_to_tensor(blob_name, blobs[blob_name], source)
    return selected, absent
