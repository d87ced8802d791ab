"""The crash journal's per-step records, in a small memory-mapped ring: `healing-journal.steps`.

A JSON line per optimizer step costs a `write()` system call and the text of three floats, and
right after backward and the optimizer step (every cache cold) that was 30-100 us of the step's
host time. Here a step is one `struct.pack_into` into a shared mapping of a 4 KiB file: no system
call, no text (~15 us cold). The mapping is the kernel's page cache, so the bytes are there the
moment they are copied: a SIGKILL or the OOM killer loses nothing a `write()` would have kept,
and a power cut can lose the last steps in both cases (neither is fsynced).

Layout, little-endian: a 64-byte header (magic, version, slot count, slot size, the journal's run
id), then `SLOTS` slots of 64 bytes: seq, step, time, loss, grad_norm, lr, flags, seq. Record n
goes in slot n % SLOTS. A slot whose two seq fields differ was torn by a kill inside the copy and
is skipped; a ring whose run id is not its journal's (an earlier run's, or a kill between creating
the two files) is ignored. The JSONL journal stays the record of everything else.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes

SUFFIX = ".steps"
MAGIC = b"SHSTEPS1"
VERSION = 1
SLOTS = 64
"""As many steps as the JSONL journal kept (`JournalState.keep_progress`)."""
_HEADER = struct.Struct("<8sIII32s")
HEADER_BYTES = 64
_SLOT = struct.Struct("<qqddddqq")
SLOT_BYTES = _SLOT.size  # 64
SKIPPED, NO_LOSS, NO_GRAD_NORM, NO_LR = 1, 2, 4, 8


def ring_path(journal: str | os.PathLike) -> Path:
    """`healing-journal.steps` beside `healing-journal.jsonl` (`.prev.steps` beside `.prev.jsonl`)."""
    return Path(journal).with_suffix(SUFFIX)


def _float(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return None


class StepRing:
    """The writer: `add()` one record per optimizer step. Created empty for a run id."""

    def __init__(self, path: str | os.PathLike, run_id: str) -> None:
        self.path = Path(path)
        header = _HEADER.pack(MAGIC, VERSION, SLOTS, SLOT_BYTES, run_id.encode("ascii")[:32])
        atomic_write_bytes(self.path, header.ljust(HEADER_BYTES, b"\0") + bytes(SLOTS * SLOT_BYTES))
        fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, HEADER_BYTES + SLOTS * SLOT_BYTES)
        finally:
            os.close(fd)  # the mapping keeps its own reference
        self._seq = 0
        self._pack = _SLOT.pack_into

    def add(self, step: int, time: float, loss: Any, grad_norm: Any, lr: Any, skipped: bool = False) -> None:
        seq = self._seq = self._seq + 1
        if type(step) is int and type(loss) is float and type(grad_norm) is float and type(lr) is float:
            self._pack(self._mm, HEADER_BYTES + (seq % SLOTS) * SLOT_BYTES, seq, step, time, loss, grad_norm, lr,
                       SKIPPED if skipped else 0, seq)
            return
        flags = SKIPPED if skipped else 0
        vals = []
        for x, missing in ((loss, NO_LOSS), (grad_norm, NO_GRAD_NORM), (lr, NO_LR)):
            f = _float(x)
            if f is None:
                flags |= missing
                f = 0.0
            vals.append(f)
        self._pack(self._mm, HEADER_BYTES + (seq % SLOTS) * SLOT_BYTES, seq, int(step), float(time), *vals, flags, seq)

    def last_step(self) -> int | None:
        if self._seq == 0 or self._mm is None:
            return None
        return _SLOT.unpack_from(self._mm, HEADER_BYTES + (self._seq % SLOTS) * SLOT_BYTES)[1]

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except (BufferError, ValueError):
                pass
            self._mm = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a StepRing (a live memory mapping) cannot be copied or pickled")


def _value(f: float, missing: bool) -> Any:
    """As the JSONL journal wrote it: None, a finite float, or "nan"/"inf"/"-inf" (JSON has no NaN)."""
    if missing:
        return None
    if math.isfinite(f):
        return f
    return "nan" if f != f else ("inf" if f > 0 else "-inf")


def read_ring(path: str | os.PathLike, run_id: Any) -> list[dict[str, Any]]:
    """The progress records in the ring at `path`, oldest first, if it belongs to `run_id`; torn
    slots skipped. [] when there is no such file or it is another run's or unreadable."""
    if not isinstance(run_id, str):
        return []
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    if len(data) < HEADER_BYTES:
        return []
    magic, version, slots, size, rid = _HEADER.unpack_from(data)
    if (magic != MAGIC or version != VERSION or size != SLOT_BYTES or not 0 < slots <= 1 << 16
            or len(data) < HEADER_BYTES + slots * size or rid.rstrip(b"\0") != run_id.encode("ascii", "replace")[:32]):
        return []
    found = []
    for i in range(slots):
        seq, step, t, loss, gn, lr, flags, seq2 = _SLOT.unpack_from(data, HEADER_BYTES + i * size)
        if seq <= 0 or seq != seq2 or seq % slots != i:
            continue
        rec = {"kind": "progress", "step": step, "time": round(t, 3) if math.isfinite(t) else None,
               "loss": _value(loss, bool(flags & NO_LOSS)), "grad_norm": _value(gn, bool(flags & NO_GRAD_NORM)),
               "lr": _value(lr, bool(flags & NO_LR))}
        if flags & SKIPPED:
            rec["skipped"] = True
        found.append((seq, rec))
    found.sort(key=lambda sr: sr[0])
    return [rec for _seq, rec in found]
