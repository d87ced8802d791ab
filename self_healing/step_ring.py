"""The crash journal's per-step records, in a small ring file: `healing-journal.steps`.

A JSON line per optimizer step costs the text of three floats and a `write()` call, and right
after backward and the optimizer step (every cache cold) that was 70-100 us of the step's host
time. Here a step is one 64-byte binary record `pwrite()`-n into its slot of a 4 KiB file
(~30-45 us cold). Like the `write()` it replaces it lands in the kernel's page cache, so a SIGKILL
or the OOM killer loses nothing, and a power cut can lose the last steps (neither is fsynced).

Not a memory mapping, though that would be ~15 us: a store into a mapped page whose file was
truncated, or whose filesystem cannot allocate it (copy-on-write btrfs/ZFS or NFS with a full
disk), is a SIGBUS that kills the training process, where `pwrite()` returns an error the journal
reports and training survives.

Layout, little-endian: a 64-byte header (magic, version, slot count, slot size, the journal's run
id), then `SLOTS` slots of 64 bytes: seq, step, time, loss, grad_norm, lr, flags, seq. Record n
goes in slot n % SLOTS. A slot whose two seq fields differ is skipped; a ring whose run id is not
its journal's (an earlier run's, or a kill between creating the two files) is ignored. A process
forked from the writer (a DataLoader worker) writes nothing. The JSONL journal stays the record of
everything else.
"""

from __future__ import annotations

import math
import os
import struct
import weakref
from pathlib import Path
from typing import Any

from .io import as_float, atomic_write_bytes, json_safe

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


_INT64 = (-(1 << 63), (1 << 63) - 1)
_LIVE: "weakref.WeakSet[StepRing]" = weakref.WeakSet()


def _forget_rings_in_child() -> None:
    """A forked child shares the writer's descriptor: its records would reuse the parent's
    sequence numbers. It writes none (and does not close the parent's file)."""
    for ring in list(_LIVE):
        ring._fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_rings_in_child)


class StepRing:
    """The writer: `add()` one record per optimizer step. Created empty for a run id."""

    def __init__(self, path: str | os.PathLike, run_id: str) -> None:
        self.path = Path(path)
        header = _HEADER.pack(MAGIC, VERSION, SLOTS, SLOT_BYTES, run_id.encode("ascii")[:32])
        atomic_write_bytes(self.path, header.ljust(HEADER_BYTES, b"\0") + bytes(SLOTS * SLOT_BYTES))
        self._fd: int | None = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self._seq = 0
        self._last_step: int | None = None
        _LIVE.add(self)

    def add(self, step: Any, time: float, loss: Any, grad_norm: Any, lr: Any, skipped: bool = False) -> None:
        """One step's record. Raises only what `pwrite()` raises (the disk); odd values are kept
        as well as a record can hold them (None for what is not a number; a step that is not an
        int64 is not recorded)."""
        fd = self._fd
        if fd is None:
            return
        seq = self._seq + 1
        if type(step) is int and type(loss) is float and type(grad_norm) is float and type(lr) is float \
                and _INT64[0] <= step <= _INT64[1]:
            data = _SLOT.pack(seq, step, time, loss, grad_norm, lr, SKIPPED if skipped else 0, seq)
        else:
            odd = self._odd(seq, step, time, loss, grad_norm, lr, skipped)
            if odd is None:
                return
            data, step = odd
        os.pwrite(fd, data, HEADER_BYTES + (seq % SLOTS) * SLOT_BYTES)
        self._seq, self._last_step = seq, step

    @staticmethod
    def _odd(seq: int, step: Any, time: float, loss: Any, grad_norm: Any, lr: Any,
             skipped: bool) -> tuple[bytes, int] | None:
        """The record of a step whose values are not the usual int and floats, and the step as an int."""
        try:
            step = int(step)
        except (TypeError, ValueError, OverflowError):
            return None
        if not _INT64[0] <= step <= _INT64[1]:
            return None
        flags = SKIPPED if skipped else 0
        vals = []
        for x, missing in ((loss, NO_LOSS), (grad_norm, NO_GRAD_NORM), (lr, NO_LR)):
            f = as_float(x)
            if f is None:
                flags |= missing
                f = 0.0
            vals.append(f)
        return _SLOT.pack(seq, step, float(time), *vals, flags, seq), step

    def last_step(self) -> int | None:
        """The step of the last record written."""
        return self._last_step

    def close(self) -> None:
        fd, self._fd = self._fd, None
        _LIVE.discard(self)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a StepRing (an open file of its process) cannot be copied or pickled")


def _value(f: float, missing: bool) -> Any:
    """As the JSONL journal wrote it: None, a finite float, or "nan"/"inf"/"-inf" (JSON has no NaN)."""
    return None if missing else json_safe(f)


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
