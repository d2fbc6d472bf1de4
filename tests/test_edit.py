"""dissectors/edit.py: a reply edited field by field (the debugger's `x` and the control protocol's
"fields") re-encodes through the codecs, for every opcode that has a reply."""

from __future__ import annotations

import pytest

from dissectors import edit
from dissectors import fuse as F
from dissectors.spec import fuse as spec

REPLY_OPS = [o for o in spec.OPCODES if o.reply is not None]


@pytest.mark.parametrize("op", REPLY_OPS, ids=lambda o: o.name)
def test_every_field_of_every_reply_edits_and_decodes_back(op: spec.Opcode) -> None:
    fields = edit.editable_fields(op.name)
    for k, f in enumerate(fields):  # a distinct small value in every field, text in every text part
        if f.kind == "int":
            raw = edit.encode_fields(op.name, {f.path: k + 1}, unique=9)
            rep = F.decode_reply(raw, op.name)
            head, *rest = f.path.split(".")
            v = rep.args[head]
            for name in rest:
                v = getattr(v, name)
            assert v == k + 1, f.path
        elif op.name not in ("GETXATTR", "LISTXATTR"):  # their body depends on the request's size
            rep = F.decode_reply(edit.encode_fields(op.name, {f.path: "zz"}, unique=9), op.name)
            assert bytes(rep.args[f.path]) == b"zz", f.path


def test_a_held_reply_keeps_what_is_not_named_and_nested_objects_work() -> None:
    entry = F.make("fuse_entry_out", nodeid=7, generation=3, attr=F.make("fuse_attr", ino=70, mode=0o100644))
    held = F.decode_reply(F.encode_reply("LOOKUP", {"entry": entry}, unique=5), "LOOKUP")
    for fields in ({"entry.attr.ino": 99}, {"entry": {"attr": {"ino": "0x63"}}}):
        rep = F.decode_reply(edit.encode_fields("LOOKUP", fields, unique=5, reply=held), "LOOKUP")
        e = rep.args["entry"]
        assert (e.attr.ino, e.nodeid, e.generation, e.attr.mode) == (99, 7, 3, 0o100644)


@pytest.mark.parametrize("fields,says", [
    ({"entry.nope": 1}, "fuse_entry_out has no field 'nope'"),
    ({"entry": 1}, "is a struct"),
    ({"entry.attr.ino": "x"}, "is not an integer"),
    ({"entry.attr.ino": -1}, "does not fit a u64"),
    ({"entry.attr.mode": 1 << 32}, "does not fit a u32"),
    ({"bogus": 1}, "LOOKUP replies have no 'bogus'"),
    ({"entry.attr.ino": True}, "expected an integer"),
])
def test_bad_fields_are_named(fields: dict[str, object], says: str) -> None:
    with pytest.raises(edit.FieldError, match=says):
        edit.encode_fields("LOOKUP", fields, unique=1)
    with pytest.raises(edit.FieldError, match="FORGET has no reply"):
        edit.editable_fields("FORGET")
