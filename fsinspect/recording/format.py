"""The fsinspect recording format: pcapng constants and the fsinspect-specific layout, as tables.

The writer, the reader and recordings/FORMAT.md all derive from these tables (a test checks that
FORMAT.md's tables are the ones `format_tables()` renders), so the document cannot drift from the code.
pcapng itself: draft-ietf-opsawg-pcapng; exported PDU tags: Wireshark's epan/exported_pdu.h.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

# Bump on any incompatible change; readers refuse newer versions with a clear message.
FORMAT_VERSION = 2  # 2: the debugger's record flags HELD, INJECTED, REWRITTEN (and their comment)

# ------------------------------------------------------------------------------------------------
# pcapng (draft-ietf-opsawg-pcapng)
# ------------------------------------------------------------------------------------------------
BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BT_CB = 0x40000BAD  # custom block that must not be copied: the live stream's control messages (PEN + JSON)
BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_MAJOR = 1
PCAPNG_MINOR = 0
LINKTYPE_WIRESHARK_UPPER_PDU = 252

OPT_ENDOFOPT = 0
OPT_COMMENT = 1
OPT_CUSTOM_STR = 2988  # copyable custom option, UTF-8 after the PEN
OPT_CUSTOM_BIN = 2989  # copyable custom option, binary after the PEN
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2

# epb_flags bits 0-1 (direction), as pcapng defines them.
DIR_INBOUND = 1  # to the FUSE server: a request (or a vhost-user front-end message)
DIR_OUTBOUND = 2  # from the FUSE server: a reply or notification (or a back-end message)

# Private Enterprise Number in custom options: 32473 is the documentation PEN of RFC 5612,
# used until fsinspect registers its own.  Readers match on it to find fsinspect's options.
PEN = 32473

# ------------------------------------------------------------------------------------------------
# Exported PDU (link type 252): big-endian TLV tags in front of the PDU bytes
# ------------------------------------------------------------------------------------------------
EXP_PDU_TAG_END_OF_OPT = 0
EXP_PDU_TAG_DISSECTOR_NAME = 12
EXP_PDU_TAG_P2P_DIRECTION = 35  # value: i32, 0 = P2P_DIR_SENT, 1 = P2P_DIR_RECV
P2P_DIR_SENT = 0
P2P_DIR_RECV = 1
DISSECTOR_FUSE = "fuse"
DISSECTOR_VHOST_USER = "fsinspect_vhost_user"
# A proxy records each vhost-user message as received and, with one of these notes, as it forwarded it.
NOTE_TO_BACKEND = "as forwarded to the back-end"
NOTE_TO_FRONTEND = "as sent to QEMU"

# ------------------------------------------------------------------------------------------------
# fsinspect's binary custom options: u32 PEN, u16 kind, u16 reserved, then the body
# ------------------------------------------------------------------------------------------------
META_RECORD = 1  # body: u16 queue, u16 record flags, u32 head (NO_HEAD = none), u32 INIT epoch
META_LAYOUT = 2  # body: per descriptor u32 len, u16 VRING_DESC_F flags, u16 reserved
META_NUMBER = 3  # body: u64 the source's exchange number `n` (the live stream; optional in files)
NO_HEAD = 0xFFFFFFFF
META_RECORD_STRUCT = struct.Struct("<IHHHHII")  # PEN, kind, reserved, queue, flags, head, epoch
META_NUMBER_STRUCT = struct.Struct("<IHHQ")  # PEN, kind, reserved, n
LAYOUT_ITEM = struct.Struct("<IHH")

# Record flags (the u16 in META_RECORD).
RF_DECODE_ERROR = 0x1
RF_NOT_CAPTURED = 0x2
RF_SNAPPED = 0x4
RF_PROXY_REPLY = 0x8
# Since format 2: what the debugger (hold points, --break/--inject, control v2) did to the exchange.
RF_HELD = 0x10
RF_INJECTED = 0x20
RF_REWRITTEN = 0x40
RF_DEBUGGER = RF_HELD | RF_INJECTED | RF_REWRITTEN
# The same flags as an opt_comment, because Wireshark's Lua dissectors see frame.comment but not custom
# options: `fsinspect-debugger: injected` (names joined by ", "); fuse.lua turns it into fuse.debugger.
DEBUGGER_COMMENT = "fsinspect-debugger: "
DEBUGGER_FLAG_NAMES = ((RF_HELD, "held"), (RF_INJECTED, "injected"), (RF_REWRITTEN, "rewritten"))


def out_header_note(raw: bytes) -> str:
    """A fuse_out_header for a note (what a rewritten reply said before): `error -5 (EIO), len 16`."""
    if len(raw) < 16:
        return f"{len(raw)} bytes"
    length, err, _unique = struct.unpack_from("<IiQ", raw)
    name = errno.errorcode.get(-err, "?") if err < 0 else "ok"
    return f"error {err} ({name}), len {length}"


def debugger_comment(flags: int) -> str:
    """The opt_comment mirroring a record's debugger flags (empty when it has none)."""
    names = [n for bit, n in DEBUGGER_FLAG_NAMES if flags & bit]
    return DEBUGGER_COMMENT + ", ".join(names) if names else ""

# Interface kinds (the "kind" key of an IDB's fsinspect JSON option).
IF_KIND_VIRTQUEUE = "virtqueue"
IF_KIND_FUSEDEV = "fusedev"
IF_KIND_VHOST_USER = "vhost-user"

DEFAULT_SNAPLEN = 256  # READ/WRITE payload bytes kept per record by default; 0 keeps everything


@dataclass(frozen=True)
class Row:
    name: str
    value: str
    meaning: str


def _h(v: int) -> str:
    return f"0x{v:X}" if v > 9 else str(v)


TABLES: dict[str, tuple[Row, ...]] = {
    "blocks": (
        Row("SHB", f"0x{BT_SHB:08X}", "section header; little endian, pcapng 1.0, section length -1"),
        Row("IDB", _h(BT_IDB), f"one per virtqueue, or one for /dev/fuse, plus one for vhost-user control; "
                               f"link type {LINKTYPE_WIRESHARK_UPPER_PDU}, snaplen 0, if_tsresol 9 (ns)"),
        Row("EPB", _h(BT_EPB), "one per message (request, reply, notification, vhost-user message)"),
        Row("CB", f"0x{BT_CB:08X}", f"live stream only (`fsinspect attach`'s binary stream, see the control "
                                    f"protocol): PEN {PEN} + one control-protocol JSON message (a custom block "
                                    "that must not be copied: a headless client drops it, tshark skips it)"),
    ),
    "shb_options": (
        Row("shb_userappl", str(SHB_USERAPPL), "tool and version, e.g. `fsinspect 0.1.0`"),
        Row("shb_os", str(SHB_OS), "host kernel (`uname -srm`)"),
        Row("shb_hardware", str(SHB_HARDWARE), "host name"),
        Row("opt_comment", str(OPT_COMMENT), "free comments (any number)"),
        Row("custom string", str(OPT_CUSTOM_STR),
            f"PEN {PEN} + JSON: `format` (the format version, required), `tool`, `host`, `kernel`, `backend`, "
            "`source` (virtio or fusedev), `snaplen`, `part` (rotation index), `init` (the last INIT "
            "request/reply in hex with its epoch, so rotated files can decode replies)"),
    ),
    "idb_options": (
        Row("if_name", str(IF_NAME), "`vq0`, `vq1`, … for virtqueues, `fusedev`, or `vhost-user`"),
        Row("if_description", str(IF_DESCRIPTION), "human description (e.g. `virtqueue 0 (hiprio)`)"),
        Row("if_tsresol", str(IF_TSRESOL), "9: timestamps are nanoseconds since the epoch"),
        Row("custom string", str(OPT_CUSTOM_STR),
            f"PEN {PEN} + JSON: `kind` ({IF_KIND_VIRTQUEUE}, {IF_KIND_FUSEDEV}, {IF_KIND_VHOST_USER}), `queue`"),
    ),
    "epb_options": (
        Row("epb_flags", str(EPB_FLAGS),
            f"bits 0-1: {DIR_INBOUND} = inbound (request to the FUSE server / front-end message), "
            f"{DIR_OUTBOUND} = outbound (reply or notification / back-end message)"),
        Row("custom binary, kind 1", str(OPT_CUSTOM_BIN),
            f"PEN {PEN}, u16 kind={META_RECORD}, u16 0, u16 queue, u16 record flags, u32 head "
            f"(0x{NO_HEAD:X} = none, e.g. /dev/fuse), u32 INIT epoch"),
        Row("custom binary, kind 2", str(OPT_CUSTOM_BIN),
            f"PEN {PEN}, u16 kind={META_LAYOUT}, u16 0, then per descriptor: u32 len, u16 VRING_DESC_F "
            "flags, u16 0 (the descriptor-chain layout, where known)"),
        Row("custom binary, kind 3", str(OPT_CUSTOM_BIN),
            f"PEN {PEN}, u16 kind={META_NUMBER}, u16 0, u64 the source's exchange number `n` (1-based, request-"
            "capture order; on the live stream, so a reply finds its request and debugger commands name it)"),
        Row("opt_comment", str(OPT_COMMENT), "notes, e.g. `decode error: …`, `not captured`; (format 2) "
            f"`{DEBUGGER_COMMENT}held`, `injected` or `rewritten` mirrors the debugger's record flags for Wireshark"),
    ),
    "record_flags": (
        Row("DECODE_ERROR", _h(RF_DECODE_ERROR), "the capturer could not decode the message"),
        Row("NOT_CAPTURED", _h(RF_NOT_CAPTURED), "bytes are missing (capture could not keep up)"),
        Row("SNAPPED", _h(RF_SNAPPED), "cut by the capture (snap length, or the proxy's 16 KiB per chain); the "
                                       "EPB original length is the message's real length"),
        Row("PROXY_REPLY", _h(RF_PROXY_REPLY), "the reply was made by fsinspect (e.g. EIO after backend loss)"),
        Row("HELD", _h(RF_HELD), "(format 2) a hold point held it when captured: a request not forwarded yet, "
                                 "a reply not delivered yet; what happened next follows"),
        Row("INJECTED", _h(RF_INJECTED), "(format 2) the debugger answered the request (--inject errno=, "
                                         "answer): the back-end never saw it"),
        Row("REWRITTEN", _h(RF_REWRITTEN), "(format 2) the debugger rewrote the back-end's reply (reply-errno=, "
                                           "rewrite); a note says what the back-end had replied. A held reply "
                                           "is recorded once, as the guest got it"),
    ),
    "exported_pdu": (
        Row("DISSECTOR_NAME", str(EXP_PDU_TAG_DISSECTOR_NAME),
            f"`{DISSECTOR_FUSE}` for FUSE messages, `{DISSECTOR_VHOST_USER}` for vhost-user messages"),
        Row("P2P_DIRECTION", str(EXP_PDU_TAG_P2P_DIRECTION),
            f"i32: {P2P_DIR_RECV} = received (inbound), {P2P_DIR_SENT} = sent (outbound); mirrors epb_flags"),
        Row("END_OF_OPT", str(EXP_PDU_TAG_END_OF_OPT), "end of tags; the FUSE message follows"),
    ),
}


def format_tables() -> str:
    """The Markdown tables of FORMAT.md, rendered from TABLES."""
    out: list[str] = []
    for title, rows in TABLES.items():
        out.append(f"<!-- table:{title} -->")
        out.append("| name | value | meaning |")
        out.append("|---|---|---|")
        out.extend(f"| {r.name} | {r.value} | {r.meaning} |" for r in rows)
        out.append("")
    return "\n".join(out)


def update_markdown(text: str) -> str:
    """FORMAT.md with the region between the table markers replaced by format_tables()."""
    begin, end = "<!-- tables:begin -->\n", "<!-- tables:end -->"
    i, j = text.index(begin) + len(begin), text.index(end)
    return text[:i] + format_tables() + text[j:]


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--update":
        from pathlib import Path

        p = Path(sys.argv[2])
        p.write_text(update_markdown(p.read_text()))
    else:
        sys.stdout.write(format_tables())
