"""Text and JSON-lines reports of a comparison (rerun or two recordings), and the bench table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .compare import Tally

SHARE_NOTE = ("a rerun needs the share as it was when the recording started "
              "(--prepare-share rebuilds what the recording proves)")


def text(t: Tally, *, first: int = 10, header: str = "") -> Iterator[str]:
    if header:
        yield header
    yield (f"{t.compared} exchanges compared: {t.identical} identical, {t.differing} differing"
           + (f", {t.unanswered} unanswered" if t.unanswered else "")
           + (f", {len(t.only_a)} only in A, {len(t.only_b)} only in B" if t.only_a or t.only_b else ""))
    if t.notes:
        yield f"note: {t.notes[0]}"
        yield from (f"  {line}" for line in t.notes[1:first + 1])
        if len(t.notes) > first + 1:
            yield f"  ... {len(t.notes) - first - 1} more (--format jsonl lists all)"
    if t.by_op:
        yield "differing by opcode: " + ", ".join(f"{op} {n}" for op, n in t.by_op.most_common())
        yield "differing by field:"
        for f, n in t.by_field.most_common():
            yield f"  {n:>7}  {f}"
    for d in t.diffs[:first]:
        nb = f" (B #{d.n_b})" if d.n_b is not None and d.n_b != d.n else ""
        yield f"#{d.n}{nb} {d.opname} {d.request}"
        yield f"    A: {d.a}"
        yield f"    B: {d.b}"
        if d.note:
            yield f"    note: {d.note}"
        for fd in d.fields:
            yield f"    {fd.field}: {_show(fd.a)} -> {_show(fd.b)}"
    if len(t.diffs) > first:
        yield f"... {len(t.diffs) - first} more differing exchanges (--first N shows more, --format jsonl all)"
    for what, items in (("only in A", t.only_a), ("only in B", t.only_b)):
        for line in items[:first]:
            yield f"{what}: {line}"


def _show(v: Any) -> str:
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                                      for x in v)) + "}"
    if isinstance(v, bytes):
        return repr(v[:64])
    return str(v)


def jsonl(t: Tally, extra: dict[str, Any] | None = None) -> Iterator[str]:
    for d in t.diffs:
        yield json.dumps({"type": "diff", **d.to_json()})
    for what, items in (("only_a", t.only_a), ("only_b", t.only_b)):
        for line in items:
            yield json.dumps({"type": what, "exchange": line})
    yield json.dumps({"type": "summary", **t.summary(), **(extra or {})})


def percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns) - 1, max(0, round(q / 100 * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1000


def bench_rows(latency_ns: dict[str, list[int]]) -> list[dict[str, Any]]:
    rows = []
    for op, vals in sorted(latency_ns.items(), key=lambda kv: -len(kv[1])):
        s = sorted(vals)
        rows.append({"op": op, "count": len(s), "p50_us": percentile(s, 50), "p90_us": percentile(s, 90),
                     "p99_us": percentile(s, 99), "max_us": s[-1] / 1000})
    return rows


def bench_text(latency_ns: dict[str, list[int]], answered: int, elapsed: float) -> Iterator[str]:
    yield f"{answered} replies in {elapsed:.3f} s: {answered / elapsed if elapsed else 0:.0f} requests/s"
    yield f"{'opcode':<14}{'count':>8}{'p50 µs':>10}{'p90 µs':>10}{'p99 µs':>10}{'max µs':>10}"
    for r in bench_rows(latency_ns):
        yield (f"{r['op']:<14}{r['count']:>8}{r['p50_us']:>10.1f}{r['p90_us']:>10.1f}{r['p99_us']:>10.1f}"
               f"{r['max_us']:>10.1f}")
