"""Atomic file writes: a crash at any point leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import glob
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so the renames and creations in it survive a power loss (best effort)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (before renaming a freshly written checkpoint
    into place: a rename of a directory whose files are still only in the page cache could
    survive a power loss with empty files)."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
        fsync_dir(dirpath)


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temp files a killed `atomic_write_bytes(path, ...)` left next to `path` (the
    writer died between creating its temp file and renaming it). Call only when no other process
    is writing `path`."""
    path = Path(path)
    removed = []
    try:
        for p in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
            try:
                p.unlink()
                removed.append(str(p))
            except OSError:
                pass
    except OSError:
        pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the file stays standard and says what happened."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # tensors / numpy scalars
        try:
            return json_safe(obj.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), str):  # enums
        return obj.value
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
