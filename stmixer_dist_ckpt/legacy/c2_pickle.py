"""Caffe2/Detectron ``.pkl`` weight files: reading them safely, then to tensors.

The Caffe2 video trainer pickled ``{"blobs": {name: ndarray}}`` from Python 2;
ImageNet-style Detectron files are the flat ``{name: ndarray}`` dict. Both are
read here with the restricted unpickler (numpy arrays and containers only,
``latin1`` so Python 2 byte strings decode) instead of the ``pickle.load`` every
upstream loader used, and never through ``torch._six``, which modern torch no
longer has (maskrcnn-benchmark #1341).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Mapping
from typing import IO, Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, IncompatibleCheckpointError
from ..safe_pickle import safe_pickle_load
from .c2_names import convert_c2_blobs, select_c2_blobs
from .legacy_file import TORCH_ZIP_MAGIC, PathOrStream

__all__ = ["load_c2_state_dict", "read_c2_pickle"]

logger = logging.getLogger(__name__)

_BLOBS = "blobs"


def _open_checked(path_or_stream: PathOrStream, source: str) -> tuple[IO[bytes], bool]:
    """Return a readable stream positioned at the pickle, and whether we own it.

    Checks the zip magic first: PySlowFast's model zoo has ``.pkl`` downloads
    that are really ``torch.save`` files (SlowFast issues #69, #85), and
    unpickling one fails with "unpickling stack underflow", which tells the
    user nothing.
    """
    if isinstance(path_or_stream, (str, os.PathLike)):
        path = os.fspath(path_or_stream)
        try:
            stream: IO[bytes] = open(path, "rb")
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{source}: no such Caffe2 weight file: {path!r}") from e
        owned = True
    elif path_or_stream.seekable():
        stream, owned = path_or_stream, False
    else:
        # Peeking at a pipe or a socket would consume the bytes the unpickler needs.
        stream, owned = io.BytesIO(path_or_stream.read()), True
    position = stream.tell()
    head = stream.read(len(TORCH_ZIP_MAGIC))
    stream.seek(position)
    if head == TORCH_ZIP_MAGIC:
        if owned:
            stream.close()
        raise CheckpointError(
            f"{source}: this is a torch.save zip archive, not a Caffe2 pickle. Rename it to end in "
            ".pth (or load it with load_legacy_checkpoint); the .pkl suffix is what routed it here."
        )
    return stream, owned


def _unpickle(path_or_stream: PathOrStream, source: str) -> Any:
    stream, owned = _open_checked(path_or_stream, source)
    try:
        return safe_pickle_load(stream, source=source, encoding="latin1")
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{source}: not a readable Caffe2 pickle ({type(e).__name__}: {e}). If the file is "
            "truncated, download it again; if it is a torch checkpoint, load it as .pth."
        ) from e
    finally:
        if owned:
            stream.close()


def read_c2_pickle(path_or_stream: PathOrStream, *, source: str) -> dict[str, Any]:
    """Unpickle a Caffe2/Detectron weight file and return its blob dict.

    Uses ``data["blobs"]`` when that key exists, else the dict itself, as every
    upstream loader does. Values are returned untouched (numpy arrays, plus
    whatever training state the file carries, such as ``lr`` and
    ``model_iter``); converting them is :func:`load_c2_state_dict`'s job.

    Args:
        path_or_stream: a local path or an open binary stream.
        source: the file name used in error messages.

    Returns:
        Blob name to value.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle names a global outside the allow list
            (anything but numpy arrays, scalars and containers).
        CheckpointError: the file is a torch zip (rename it ``.pth``), is not a
            pickle, does not hold a dict, or holds no blobs.

    Example:
        >>> import io, pickle
        >>> import numpy as np
        >>> raw = pickle.dumps({"blobs": {"conv1_w": np.ones(2, np.float32)}}, protocol=2)
        >>> list(read_c2_pickle(io.BytesIO(raw), source="toy.pkl"))
        ['conv1_w']
    """
    data = _unpickle(path_or_stream, source)
    if isinstance(data, int) and data == torch.serialization.MAGIC_NUMBER:
        # Pre-1.6 torch.save files start with a pickled magic number.
        raise CheckpointError(
            f"{source}: this is a legacy-format torch.save file, not a Caffe2 pickle. Rename it to end "
            "in .pth (or load it with load_legacy_checkpoint)."
        )
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{source}: a Caffe2 weight file holds a dict of blobs, found {type(data).__name__}."
        )
    if _BLOBS in data:
        blobs = data[_BLOBS]
        if not isinstance(blobs, Mapping):
            raise CheckpointError(
                f"{source}: 'blobs' holds a {type(blobs).__name__}, expected a dict of blob name to array."
            )
    else:
        blobs = data
        if "model" in blobs and isinstance(blobs["model"], Mapping):
            # detectron2/pycls zoo pickles wrap already-converted PyTorch names.
            raise CheckpointError(
                f"{source}: this pickle holds a 'model' dict (detectron2 or pycls format), not Caffe2 "
                "blobs; its keys are PyTorch names already. Save data['model'] with torch.save and "
                "load that .pth instead."
            )
    if not blobs:
        raise CheckpointError(
            f"{source}: the file holds no blobs, so there is nothing to load. The download may be "
            "incomplete, or the file is not a weight file."
        )
    return dict(blobs)


def load_c2_state_dict(
    path_or_stream: PathOrStream,
    *,
    source: str,
    weight_map: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a Caffe2 ``.pkl`` as a PyTorch state dict.

    Without ``weight_map`` this is STMixer's loader: every blob except ``lr``,
    ``model_iter`` and ``*_momentum`` is renamed by
    :func:`~stmixer_dist_ckpt.legacy.c2_names.convert_c2_name` (PySlowFast's
    rules plus ``backbone.``). With a ``{model_key: c2_blob_name}`` map, from
    AlphAction's ``model.c2_weight_mapping()``, only mapped blobs are read,
    keyed by the model's names; mapped names absent from the file are logged at
    INFO, as AlphAction did, and left for the key matcher to report as missing.

    The result still goes through
    :func:`~stmixer_dist_ckpt.legacy.key_matching.match_state_dict`; no shapes
    are checked here.

    Args:
        path_or_stream: a local path or an open binary stream.
        source: the file name used in error messages.
        weight_map: model key to Caffe2 blob name, or None for the rename rules.

    Returns:
        Key to tensor (CPU tensors owning their memory).

    Raises:
        CheckpointNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle names a global outside the allow list.
        CheckpointError: the file is not a Caffe2 blob file, or a value used is
            not a numpy array.
        IncompatibleCheckpointError: two blobs convert to the same key, or the
            map selects no blob at all.

    Example:
        >>> import io, pickle
        >>> import numpy as np
        >>> raw = pickle.dumps({"blobs": {"res_conv1_bn_s": np.ones(4, np.float32), "lr": np.array(0.1)}},
        ...                    protocol=2)
        >>> list(load_c2_state_dict(io.BytesIO(raw), source="toy.pkl"))
        ['backbone.s1.pathway0_stem.bn.weight']
    """
    blobs = read_c2_pickle(path_or_stream, source=source)
    if weight_map is None:
        return convert_c2_blobs(blobs, source=source)
    selected, absent = select_c2_blobs(blobs, weight_map, source=source)
    for blob_name in absent:
        logger.info("%s: %s not found in C2 weights file, skipped.", source, blob_name)
    if weight_map and not selected:
        raise IncompatibleCheckpointError(
            f"{source}: none of the {len(weight_map)} blobs named by the weight map exist in the file "
            f"(first few: {list(weight_map.values())[:3]}); the map belongs to a different model "
            f"than the file, whose blobs include {list(blobs)[:3]}."
        )
    return selected
