"""`fsinspect decode`: pretty-print FUSE or vhost-user messages from hex or a raw file."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.render import message_json, message_lines, record_lines
from dissectors.spec import fuse as fspec
from dissectors.spec import vhost_user as vspec

from ..errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser("decode", help="pretty-print FUSE (or vhost-user) messages",
                       description="Decode one or more concatenated FUSE messages (requests, replies, "
                                   "notifications) from hex or a raw file.  Replies are paired to "
                                   "earlier requests by unique; use --reply-to for a lone reply.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hex", metavar="HEX", help="message bytes as hex (spaces, colons and 0x allowed)")
    src.add_argument("file", nargs="?", metavar="FILE", help="raw message bytes ('-' for stdin)")
    p.add_argument("--reply-to", metavar="OPCODE", help="decode as a reply to this opcode (name or number)")
    p.add_argument("--vhost-user", action="store_true", help="decode a vhost-user message instead")
    p.add_argument("--backend-channel", action="store_true",
                   help="with --vhost-user: a back-end request (BACKEND_REQ channel)")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--strict-names", action="store_true", help="reject names that are not UTF-8")
    p.set_defaults(func=run)


_HEX_JUNK = re.compile(r"0x|[\s:,]")


def parse_hex(text: str) -> bytes:
    cleaned = _HEX_JUNK.sub("", text)
    if len(cleaned) % 2:
        raise UserError(f"hex input has an odd number of digits ({len(cleaned)})")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        bad = next((i for i, c in enumerate(cleaned) if c not in "0123456789abcdefABCDEF"), 0)
        raise UserError(f"not hex: {cleaned[bad]!r} at digit {bad}") from None


def _read_input(args: argparse.Namespace) -> bytes:
    if args.hex is not None:
        return parse_hex(args.hex)
    if args.file == "-":
        return sys.stdin.buffer.read()
    try:
        with open(args.file, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{args.file}: {e.strerror}") from None


def _opcode_arg(text: str) -> int:
    if text.isdigit():
        return int(text)
    op = fspec.OPCODE_BY_NAME.get(text.upper().removeprefix("FUSE_"))
    if op is None:
        raise UserError(f"unknown opcode {text!r}")
    return op.value


def _looks_like_request(buf: bytes, off: int) -> bool:
    """A request's second word is an opcode (positive); a reply's is 0 or a negated errno; a notify has unique 0."""
    word = int.from_bytes(buf[off + 4:off + 8], "little")
    unique = int.from_bytes(buf[off + 8:off + 16], "little")
    return 0 < word < 0x80000000 and unique != 0


def run(args: argparse.Namespace) -> int:
    buf = _read_input(args)
    if not buf:
        raise UserError("no input bytes")
    if args.vhost_user:
        return _run_vhost_user(buf, args)
    ctx = F.FuseContext(strict_names=args.strict_names)
    pending: dict[int, F.Request] = {}
    off = 0
    count = 0
    while off < len(buf):
        if len(buf) - off < 4:
            raise UserError(f"message {count}: {len(buf) - off} stray bytes at offset {off}")
        n = int.from_bytes(buf[off:off + 4], "little")
        if n < F.OUT_HEADER_SIZE or off + n > len(buf):
            if count == 0:
                n = len(buf) - off  # let the decoder name the precise problem
            else:
                raise UserError(f"message {count} at offset {off}: length {n} does not fit the input")
        chunk = buf[off:off + n]
        msg: Any
        try:
            if args.reply_to is not None:
                msg = F.decode_reply(chunk, _opcode_arg(args.reply_to), ctx)
            elif _looks_like_request(buf, off):
                msg = F.decode_request(chunk, ctx)
                pending[msg.unique] = msg
                if msg.op.name == "INIT":
                    ctx = F.FuseContext.from_init(msg.args["init"], None)
            else:
                unique = int.from_bytes(chunk[8:16], "little") if len(chunk) >= 16 else 0
                req = pending.pop(unique, None)
                if req is None and unique != 0:
                    raise UserError(f"message {count} at offset {off} is a reply (unique {unique}) with no "
                                    "request before it; pass --reply-to OPCODE")
                msg = F.decode_reply(chunk, req, ctx)
                if req is not None and req.op.name == "INIT" and isinstance(msg, F.Reply) and not msg.error:
                    ctx = F.FuseContext.from_init(req.args["init"], msg.args["init_out"])
        except DecodeError as e:
            raise UserError(f"message {count} at offset {off}: {e}", 1) from None
        if args.json:
            print(json.dumps(message_json(msg)))
        else:
            if count:
                print()
            print("\n".join(message_lines(msg)))
        off += n
        count += 1
    return 0


def _run_vhost_user(buf: bytes, args: argparse.Namespace) -> int:
    try:
        msg = V.decode_message(buf, backend_channel=args.backend_channel)
    except DecodeError as e:
        raise UserError(str(e), 1) from None
    if args.json:
        print(json.dumps({"request": msg.name, "flags": vspec.HEADER_FLAGS.names(msg.flags),
                          "summary": msg.summary()}))
        return 0
    kind = "reply to" if msg.is_reply else "request"
    print(f"vhost-user {kind} {msg.name} ({msg.request}) flags={vspec.HEADER_FLAGS.render(msg.flags & ~3)} "
          f"version={msg.flags & 3} size={len(buf) - 12}")
    p = msg.payload
    if isinstance(p, list):
        for i, r in enumerate(p):
            print(f"  region[{i}]")
            print("\n".join(record_lines(r, 2, vspec.REGISTRY)))
    elif p is not None and not isinstance(p, bytes):
        print(f"  {p._codec.name}")
        print("\n".join(record_lines(p, 2, vspec.REGISTRY)))
        if msg.vring_index() is not None and p._codec.name == "vhost_user_u64":
            print(f"  vring index = {msg.vring_index()}{' NOFD' if msg.nofd() else ''}")
    elif isinstance(p, bytes):
        print(f"  payload: {p.hex()}")
    return 0
