"""Sample messages generated from the spec tables, so tests cover every opcode without a hand list."""

from __future__ import annotations

from typing import Any

from dissectors import fuse as F
from dissectors.spec import fuse as fspec
from dissectors.spec.types import SCALAR_SIZE, Part
from dissectors.structs import StructCodec, pyname


def fill(codec: StructCodec, seed: int = 1) -> Any:
    """A record with every field set to a distinct, width-respecting value."""
    vals: dict[str, Any] = {}
    for i, f in enumerate(codec.spec.fields):
        k = seed * 131 + i * 17 + 1
        if f.ctype == "char":
            vals[pyname(f.name)] = bytes((k + j) % 26 + 97 for j in range(f.count))
        elif f.ctype in SCALAR_SIZE:
            bits = SCALAR_SIZE[f.ctype] * 8
            signed = f.ctype.startswith("i")
            def val(x: int, bits: int = bits, signed: bool = signed) -> int:
                v = (x * 0x9E3779B1) & ((1 << bits) - 1)
                if signed and v >= 1 << (bits - 1):
                    v -= 1 << bits
                return v
            vals[pyname(f.name)] = val(k) if f.count == 1 else tuple(val(k + j) for j in range(f.count))
        else:
            vals[pyname(f.name)] = fill(codec._sub_codecs[f.name], k)
    return codec.cls(**vals)


def sample_args(parts: tuple[Part, ...], *, for_reply_of: F.Request | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for n, p in enumerate(parts):
        if p.kind == "struct":
            rec = fill(F.CODECS[p.ref or p.name], n + 1)
            if p.name == "getxattr":
                rec = rec._replace(size=64)
            args[p.name] = rec
        elif p.kind == "str":
            args[p.name] = f"{p.name}-\u00e9-{n}".encode()
        elif p.kind == "text":
            args[p.name] = b"../some/target"
        elif p.kind == "data":
            args[p.name] = bytes(range(n, n + 37))
        elif p.kind == "array":
            count = 3
            if p.ref == "u64":
                args[p.name] = [11, 22, 33]
            else:
                args[p.name] = [fill(F.CODECS[p.ref or ""], j + 5) for j in range(count)]
            if p.count_from:
                owner, fld = p.count_from.split(".")
                args[owner] = args[owner]._replace(**{fld: count})
        elif p.kind in ("dirents", "direntplus"):
            codec = F.CODECS["fuse_direntplus" if p.kind == "direntplus" else "fuse_dirent"]
            args[p.name] = [(fill(codec, j), nm) for j, nm in enumerate([b"a", b"sub", b"eight888", b"\xff\xfe"])]
        elif p.kind == "strs":
            args[p.name] = [b"DEVNAME=x", b"MAJOR=1"]
        elif p.kind == "xattr":
            args["value"] = b"xattr-value"
    return args


def normalise_dirents(args: dict[str, Any], plus: bool) -> dict[str, Any]:
    """Fill namelen the way encoding does, so decoded == encoded input."""
    out = dict(args)
    ents = []
    for rec, nm in args["entries"]:
        if plus:
            rec = rec._replace(dirent=rec.dirent._replace(namelen=len(nm)))
        else:
            rec = rec._replace(namelen=len(nm))
        ents.append((rec, nm))
    out["entries"] = ents
    return out


ALL_OPCODES = fspec.OPCODES
ALL_NOTIFIES = fspec.NOTIFIES
