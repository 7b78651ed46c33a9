"""Atomic file writes: a temp file in the same folder, fsync, rename. Readers never see a half-written file.

Files get the mode the user's umask gives a new file (mkstemp alone would make them 0600), and JSON never holds NaN
or Infinity: a non-finite number is written as null. A leaf module: it imports only the error types.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prune_cli.errors import DiskFullError, WriteError


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("No space left" in str(e) or "file write failed" in str(e))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed over `path` when the block succeeds, removed otherwise."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        if _disk_full(e):
            raise DiskFullError(f"no space left on device: {path}") from None
        raise WriteError(f"{path}: cannot be written there ({e.strerror or e})") from None
    try:
        os.chmod(tmp, _file_mode())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e):
            raise DiskFullError(f"no space left on device: {path}") from None
        raise


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None: strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON (non-finite numbers as null); anything else unknown as its string."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=str)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_plain(path: Path, what: str = "checkpoint") -> Any:
    """A torch file read as plain tensors and containers only (weights_only=True): a file that needs code to rebuild
    is refused, in one line naming the object it wanted; torch's warnings stay quiet."""
    import pickle
    import re
    import warnings

    import torch

    from prune_cli.errors import CheckpointError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:  # not a refusal: a damaged or foreign file
            raise CheckpointError(f"{path}: unreadable {what} (not a torch file of tensors)") from None
        raise CheckpointError(f"{path}: refused: the {what} holds a Python object ({found.group(1)}) that only running "
                              "code could rebuild; prune-cli reads plain tensors only") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: unreadable {what} ({type(e).__name__}: {first})") from None


def atomic_savefig(fig: Any, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, written atomically (a killed command leaves no 0-byte plot)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Logs grow line by line; a torn last line is the only possible damage, and readers skip it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a") as f:
            f.write(dumps(row, indent=None) + "\n")
    except OSError as e:
        if _disk_full(e):
            raise DiskFullError(f"no space left on device: {path}") from None
        raise
