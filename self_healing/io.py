"""Atomic file writes: a crash at any point leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import glob
import json
import errno
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def create_temp_file(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, path) of a new, empty, uniquely named file in `directory`, open for writing, with the
    mode any normally created file gets there: `tempfile.mkstemp` makes every file 0600, so a file
    renamed from it stays unreadable to the user's group whatever their umask. Here the kernel
    applies the umask (and a default ACL, if the directory has one) to 0666 at creation: nothing
    reads or changes the process-wide umask, so no other thread can see it altered."""
    directory = os.fspath(directory)
    for _ in range(100):
        name = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(name, _NEW_FILE_FLAGS, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


def normal_file_mode(directory: str | os.PathLike) -> int:
    """The permission bits a file normally created in `directory` gets (0644 under umask 022),
    found by creating one: the kernel's own answer (umask and default ACL), with no read-and-
    restore of the process-wide umask that another thread could observe."""
    fd, name = create_temp_file(directory, prefix=".self-healing-mode-probe.")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(name)


def give_normal_modes(root: str | os.PathLike) -> None:
    """chmod every file under `root` to `normal_file_mode`: some writers the plugin calls make
    private files whatever the umask (safetensors' `save_file` writes 0600 through its own temp
    file), and a checkpoint a teammate cannot read is not one they can resume or inspect."""
    root = Path(root)
    mode = normal_file_mode(root)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                if stat.S_IMODE(os.lstat(p).st_mode) != mode and not os.path.islink(p):
                    os.chmod(p, mode)
            except OSError:
                pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (a kill at any moment leaves the old file or the new one),
    as a file with the mode the user's umask gives a normally created one (0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path.parent, prefix=f".{path.name}.")
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


def as_float(x: Any) -> float | None:
    """x as a float, or None for None, a bool or what is not one number (a string, a tensor of
    several elements, an int too large for a float)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None


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
