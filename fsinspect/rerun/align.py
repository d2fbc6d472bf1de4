"""`fsinspect diff A B`: two recordings of one workload, aligned request by request, replies compared.

Two guests running the same workload send nearly the same requests in the same order; where one sends
a request the other does not (a SYNCFS on a submount only one of them announced, a retry), the walk
looks a short way ahead in both for the next request they agree on, and reports what it skipped as
"only in A" / "only in B".  Requests agree when their opcode, the path of their nodeid and their names
agree; B's nodeids and file handles are mapped onto A's as a rerun maps them.  Forgets are compared as
totals per inode, not by place.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from dissectors import fuse as F

from ..analysis.exchange import Exchange
from .compare import FieldDiff, Tally, compare
from .lookups import forgets
from .remap import Remap
from .runner import describe, exchange_diff

LOOKAHEAD = 64


def _keys(exs: Sequence[Exchange]) -> list[tuple[object, ...]]:
    """(opcode, path of the nodeid, names) per exchange: paths, not nodeids, since each recording numbers
    its own inodes (a path is the chain of LOOKUP/CREATE/MKDIR/... names that gave the nodeid)."""
    paths: dict[int, bytes] = {1: b""}
    out: list[tuple[object, ...]] = []
    for ex in exs:
        req, rep = ex.request, ex.reply
        here = paths.get(ex.nodeid, b"#%d" % ex.nodeid)
        out.append((ex.opcode, here, tuple(ex.names()) if req is not None else ()))
        if req is None or not isinstance(rep, F.Reply) or rep.error:
            continue
        name = req.args.get("newname") if ex.opname == "LINK" else req.args.get("name")
        if "entry" in rep.args and isinstance(name, bytes):
            paths[rep.args["entry"].nodeid] = here + b"/" + name
        for rec, nm in rep.args.get("entries", ()) if ex.opname == "READDIRPLUS" else ():
            if rec.entry_out.nodeid and nm not in (b".", b".."):
                paths[rec.entry_out.nodeid] = here + b"/" + nm
    return out


def _line(ex: Exchange) -> str:
    return f"#{ex.n} {ex.opname} nodeid {ex.nodeid} {describe(ex.request) if ex.request is not None else ''}".strip()


def align(a: Sequence[Exchange], b: Sequence[Exchange]) -> list[tuple[int | None, int | None]]:
    """Index pairs (i in a, j in b); None on one side for a request only the other recording has."""
    out: list[tuple[int | None, int | None]] = []
    i = j = 0
    ka, kb = _keys(a), _keys(b)
    while i < len(a) and j < len(b):
        if ka[i] == kb[j]:
            out.append((i, j))
            i += 1
            j += 1
            continue
        best: tuple[int, int, int] | None = None  # (skipped in total, skip in a, skip in b)
        for da in range(LOOKAHEAD):
            if i + da >= len(a):
                break
            for db in range(LOOKAHEAD - da):
                if j + db >= len(b):
                    break
                if ka[i + da] == kb[j + db] and (best is None or da + db < best[0]):
                    best = (da + db, da, db)
                    break
        if best is None:  # nothing agrees within reach: call the pair different and go on
            out.append((i, j))
            i += 1
            j += 1
            continue
        out.extend((i + k, None) for k in range(best[1]))
        out.extend((None, j + k) for k in range(best[2]))
        i += best[1]
        j += best[2]
    out.extend((k, None) for k in range(i, len(a)))
    out.extend((None, k) for k in range(j, len(b)))
    return out


def _forgotten(exs: Sequence[Exchange], nodeid: Callable[[int], int]) -> Counter[int]:
    """nlookup given back per nodeid (in A's numbering): FORGETs go on the hiprio queue when the guest
    evicts an inode, so their place in the sequence is timing; their totals are behaviour."""
    out: Counter[int] = Counter()
    for ex in exs:
        for node, n in forgets(ex.request) if ex.request is not None else ():
            out[nodeid(node)] += n
    return out


def diff_exchanges(a: Sequence[Exchange], b: Sequence[Exchange], *, strict: bool = False) -> Tally:
    t = Tally()
    remap = Remap()
    forgets = ("FORGET", "BATCH_FORGET")
    fa, fb = [e for e in a if e.opname in forgets], [e for e in b if e.opname in forgets]
    a = [e for e in a if e.opname not in forgets]
    b = [e for e in b if e.opname not in forgets]
    _pairs(a, b, t, remap, strict)
    back = {v: k for k, v in remap.nodeid.items()}
    ga, gb = _forgotten(fa, lambda n: n), _forgotten(fb, lambda n: back.get(n, n))
    for node in sorted(set(ga) | set(gb)):
        if ga[node] > gb[node]:
            t.only_a.append(f"FORGET nodeid {node}: nlookup {ga[node]} in all, {gb[node]} in B")
        elif gb[node] > ga[node]:
            t.only_b.append(f"FORGET nodeid {node} (A's numbering): nlookup {gb[node]} in all, {ga[node]} in A")
    return t


def _pairs(a: Sequence[Exchange], b: Sequence[Exchange], t: Tally, remap: Remap, strict: bool) -> None:
    for i, j in align(a, b):
        if j is None:
            assert i is not None
            t.only_a.append(_line(a[i]))
            continue
        if i is None:
            t.only_b.append(_line(b[j]))
            continue
        ea, eb = a[i], b[j]
        fields: list[FieldDiff] = []
        if ea.opcode != eb.opcode:
            fields.append(FieldDiff("opcode", ea.opname, eb.opname))
        else:
            want = remap.nodeid.get(ea.nodeid)
            if want is not None and want != eb.nodeid:
                fields.append(FieldDiff("request.nodeid", f"{ea.nodeid} (B's {want})", eb.nodeid))
            if isinstance(ea.request, F.Request):
                remap.learn(ea.request, ea.reply, eb.reply)
            if ea.expects_reply:
                fields += compare(ea.reply, eb.reply, strict=strict)
        if not ea.expects_reply and not fields:
            continue
        t.add(exchange_diff(ea, ea.reply, eb.reply, fields, eb.n) if fields else None, ea.opname)
