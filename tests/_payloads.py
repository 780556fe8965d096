"""Real malicious pickles for the safe-loading tests, and the hand-edits that plant them.

Every payload, when unpickled by plain ``pickle`` or ``torch.load(weights_only=False)``,
creates a marker file; ``test_payloads_are_live`` proves that. The security tests
then plant the same objects in each stored format and check that loading refuses
them and that the marker never appears.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stmixer_dist_ckpt._dcp import METADATA_FILE, file_checksum
from stmixer_dist_ckpt.manifest import MANIFEST_FILE


def plant_marker(path: str) -> None:
    """What a payload "does": create ``path``. Stands in for any code an attacker would run."""
    with open(path, "w") as handle:
        handle.write("payload ran\n")


class Payload:
    """An object whose unpickling calls ``plant_marker(marker)`` (a module-level function)."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (plant_marker, (self.marker,))


class OpenPayload(Payload):
    """Unpickling calls ``builtins.open(marker, "w")``: no function of ours involved."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (builtins.open, (self.marker, "w"))


class ExecPayload(Payload):
    """Unpickling calls ``builtins.exec`` on source text, the classic remote-code-execution pickle."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


#: kind -> (payload class, the global name the safe loader must refuse)
PAYLOAD_KINDS: dict[str, tuple[type[Payload], str]] = {
    "function": (Payload, f"{plant_marker.__module__}.plant_marker"),
    "open": (OpenPayload, "io.open"),
    "exec": (ExecPayload, "builtins.exec"),
}


class Victim:
    """A harmless module-level class that BUILD-tampering pickles try to modify."""


def tamper_prefix(module: str, qualname: str, attribute: str) -> bytes:
    """Opcodes that set ``<module>.<qualname>.<attribute> = builtins.str`` via BUILD, then POP.

    Prepended to a real pickle (protocol 2, without its PROTO opcode) it keeps
    the file loading normally under plain ``pickle`` while mutating a class
    that the allow list only meant to be *instantiated*.
    """
    name = attribute.encode()
    return (
        b"\x80\x02"
        + b"c" + module.encode() + b"\n" + qualname.encode() + b"\n"  # GLOBAL: the class itself
        + b"N}"  # state None, slotstate {...}
        + b"X" + len(name).to_bytes(4, "little") + name
        + b"cbuiltins\nstr\n"
        + b"s\x86b0"  # SETITEM, TUPLE2, BUILD (setattr on the class), POP
    )


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def data_dir_of(checkpoint: Path) -> Path:
    """The DCP directory of a committed checkpoint (``data-<token>``), or the directory itself."""
    if (checkpoint / METADATA_FILE).exists():
        return checkpoint
    (data,) = [p for p in checkpoint.iterdir() if p.name.startswith("data-")]
    return data


def read_metadata_trusted(checkpoint: Path) -> Any:
    """Our own freshly written ``.metadata``, read with plain pickle to edit it (we trust it)."""
    with open(data_dir_of(checkpoint) / METADATA_FILE, "rb") as handle:
        return pickle.load(handle)


def write_metadata(checkpoint: Path, raw: bytes) -> None:
    """Replace ``.metadata`` and, like a careful attacker, re-record it in the manifest.

    Updating the checksum makes ``load(verify=True)`` pass, so the test reaches
    the unpickler instead of stopping at the integrity check: checksums detect
    damage, not tampering.
    """
    (data_dir_of(checkpoint) / METADATA_FILE).write_bytes(raw)
    refresh_manifest(checkpoint)


def refresh_manifest(checkpoint: Path) -> None:
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.exists():
        return
    manifest = json.loads(manifest_path.read_text())
    data = checkpoint / manifest["data_dir"]
    for name in list(manifest["files"]):
        with open(data / name, "rb") as handle:
            size, checksum = file_checksum(handle)
        manifest["files"][name] = {"size": size, "checksum": checksum}
    manifest_path.write_text(json.dumps(manifest))


def edit_manifest(checkpoint: Path, **changes: Any) -> None:
    manifest_path = checkpoint / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest.update(changes)
    manifest_path.write_text(json.dumps(manifest))


def exists(path: Path | str) -> bool:
    return os.path.lexists(path)


def tamper_torch_file(raw: bytes, module: str, qualname: str, attribute: str) -> bytes:
    """A ``torch.save`` zip whose ``data.pkl`` first sets ``<module>.<qualname>.<attribute>`` via BUILD."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = tamper_prefix(module, qualname, attribute) + data[2:]  # drop the PROTO opcode
            target.writestr(info, data)
    return out.getvalue()
