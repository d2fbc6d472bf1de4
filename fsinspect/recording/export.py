"""Export chosen exchanges as an fsinspect pcapng recording (Wireshark's "Export Specified Packets").

The new file is written by the recording writer, so it reads back in `fsinspect replay` and opens in
Wireshark/tshark like any recording.  Besides the chosen requests and replies it carries what makes it
self-describing: the section header's metadata (source, back-end, snap length, the INIT that sets the
protocol minor), every vhost-user control message (features, memory table, vrings) and each INIT exchange.
Records keep their timestamps, original lengths, flags, descriptor layouts and comments.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dissectors.spec import fuse as fspec

from .. import privfile
from . import format as fmt
from .reader import Record, RecordingReader
from .writer import RecordingWriter

_OP_INIT = fspec.OPCODE_BY_NAME["INIT"].value
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class Exported:
    path: Path
    records: int  # records written
    chosen: int  # of which chosen (the rest: control plane and INIT)


def _key(rec: Record) -> tuple[int, int]:
    """A request's pairing key: its descriptor head, or its unique where there is none (fusedev)."""
    if rec.head is not None:
        return rec.queue, rec.head
    return rec.queue, _U64.unpack_from(rec.data, 8)[0] if len(rec.data) >= 16 else 0


def recording_records(src: str | os.PathLike[str],
                      offsets: Collection[int]) -> tuple[dict[str, Any], Iterator[tuple[Record, bool]]]:
    """(the source's section metadata, its records to export, each with "was it chosen"): those at
    `offsets` (EPB offsets, the analyzer's req_ref/reply_ref) and the self-describing ones, in file order."""
    reader = RecordingReader(src)
    meta = dict(reader.section.meta)
    meta["comments"] = list(reader.section.comments)

    def records() -> Iterator[tuple[Record, bool]]:
        inits: set[tuple[int, int]] = set()
        with reader:
            for rec in reader.records():
                chosen = rec.offset in offsets
                if not rec.is_fuse:
                    yield rec, chosen
                elif rec.inbound and len(rec.data) >= 8 and _U32.unpack_from(rec.data, 4)[0] == _OP_INIT:
                    inits.add(_key(rec))
                    yield rec, chosen
                elif not rec.inbound and inits and _key(rec) in inits:
                    inits.discard(_key(rec))
                    yield rec, chosen
                elif chosen:
                    yield rec, chosen

    return meta, records()


def write_pcapng(dest: str | os.PathLike[str], records: Iterable[tuple[Record, bool]], *, meta: dict[str, Any],
                 comments: Iterable[str] = (), mode: int = privfile.DEFAULT_MODE) -> Exported:
    """Write `records` (each with "did the user choose it", to count them apart from the context) to `dest`,
    replaced whole when done, never seen half written.

    `meta` is the source's section metadata (source, backend, snaplen, init, comments).
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    snaplen = meta.get("snaplen")
    w = RecordingWriter(tmp, source=str(meta.get("source") or "virtio"), backend=str(meta.get("backend") or ""),
                        comments=[*meta.get("comments", ()), *comments],
                        snaplen=snaplen if isinstance(snaplen, int) and snaplen >= 0 else fmt.DEFAULT_SNAPLEN,
                        init=meta.get("init") if isinstance(meta.get("init"), dict) else None, mode=mode)
    n = picked = 0
    try:
        with w:
            for rec, chosen in records:
                notes = rec.notes
                if rec.flags & fmt.RF_DEBUGGER:  # the writer adds the debugger's comment from the flags
                    notes = [x for x in notes if x != fmt.debugger_comment(rec.flags)]
                if not rec.is_fuse:
                    w.control(rec.data, from_frontend=rec.inbound, ts_ns=rec.ts_ns, notes=notes)
                else:
                    put = w.request if rec.inbound else w.reply
                    put(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch, layout=rec.layout or (),
                        flags=rec.flags, notes=notes, orig_len=rec.orig_len)
                n += 1
                picked += chosen
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Exported(dest, n, picked)


def export_recording(src: str | os.PathLike[str], dest: str | os.PathLike[str], offsets: Collection[int], *,
                     comment: str = "", mode: int = privfile.DEFAULT_MODE) -> Exported:
    """Export the records at `offsets` of recording `src` (with its self-describing context) to `dest`."""
    if Path(dest).exists() and Path(dest).resolve() == Path(src).resolve():
        raise ValueError(f"{dest} is the recording being read; pick another file")
    meta, records = recording_records(src, offsets)
    return write_pcapng(dest, records, meta=meta, comments=[comment] if comment else (), mode=mode)
