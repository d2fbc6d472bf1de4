"""Per-opcode counts, errors by errno, latency percentiles, bytes and ops/s over time."""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .exchange import Exchange


def percentile(sorted_values: list[int], p: float) -> int | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


_NICE_NS = tuple(m * 10 ** e for e in range(3, 10) for m in (1, 2, 5) if m * 10 ** e <= 1_000_000_000)


def rate_series(points: list[tuple[int, int]], buckets: int = 60) -> tuple[int, list[float], list[float]]:
    """(bucket_ns, ops/s, bytes/s) over `points` = (ts_ns, bytes), in the smallest round bucket (1µs, 2µs,
    5µs ... 1 s) that spreads the span over at most `buckets` bars: a sub-second capture is not one bar.

    A span longer than `buckets` seconds keeps only the buckets that hold points (as Stats.ops_per_second):
    one lying timestamp centuries away must not make billions of empty bars."""
    if not points:
        return 1_000_000_000, [], []
    lo = min(t for t, _ in points)
    span = max(t for t, _ in points) - lo
    bucket = next((b for b in _NICE_NS if span < b * buckets), 1_000_000_000)
    n = span // bucket + 1
    slots = list(range(n)) if n <= buckets else sorted({(t - lo) // bucket for t, _ in points})
    at = {s: i for i, s in enumerate(slots)}
    ops, byts = [0.0] * len(slots), [0.0] * len(slots)
    scale = 1_000_000_000 / bucket
    for t, b in points:
        i = at[(t - lo) // bucket]
        ops[i] += scale
        byts[i] += b * scale
    return bucket, ops, byts


RATE_SECONDS = 4_096  # per-second ops/bytes buckets a UI keeps (the newest; its sparkline shows 120)


class SecondRates:
    """Exchanges and bytes per capture second, for the newest `keep` seconds that hold exchanges: a stats
    panel's recent ops/s and bytes/s, in bounded memory for a live session or a recording of weeks.

    Seconds without exchanges are left out, as in Stats.ops_per_second: a lying timestamp far from the rest
    costs one bucket, not a window of empty seconds.  Trimming keeps a quarter more than `keep` so that it
    happens rarely (amortised O(1) per exchange)."""

    def __init__(self, keep: int = RATE_SECONDS) -> None:
        self.keep = keep
        self.ops: Counter[int] = Counter()
        self.bytes: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.ops)

    def add(self, ts_ns: int, nbytes: int, count: int = 1) -> None:
        sec = ts_ns // 1_000_000_000
        if sec not in self.ops and len(self.ops) >= self.keep + self.keep // 4:
            self._trim()
        self.ops[sec] += count
        self.bytes[sec] += nbytes

    def _trim(self) -> None:
        newest = heapq.nlargest(self.keep, self.ops)
        self.ops = Counter({s: self.ops[s] for s in newest})
        self.bytes = Counter({s: self.bytes[s] for s in newest})

    def newest(self, seconds: int) -> tuple[list[float], list[float]]:
        """ops/s and bytes/s of the newest `seconds` seconds that hold exchanges, oldest first."""
        secs = heapq.nlargest(seconds, self.ops)[::-1]
        return [float(self.ops[s]) for s in secs], [float(self.bytes[s]) for s in secs]

    def rows(self) -> list[list[int]]:
        """[second, exchanges, bytes] for the newest `keep` seconds, in time order (a recording's saved
        analysis)."""
        return [[s, self.ops[s], self.bytes[s]] for s in sorted(heapq.nlargest(self.keep, self.ops))]

    def load(self, rows: Any) -> None:
        """What `rows` saved (an older side file may hold every second: the newest are kept)."""
        for sec, ops, byts in rows:
            self.add(int(sec) * 1_000_000_000, int(byts), int(ops))


RATE_BUCKETS = 1 << 17  # ops/s buckets kept; past that they merge in pairs (1 s -> 2 s ...): a session of weeks
EXACT_LATENCIES = 16_384  # per opcode: beyond, latencies go to a log histogram (memory stays flat)
_SIG_BITS = 6  # histogram buckets keep 6 significant bits: each within 1/32 of its value


def _bucket(v: int) -> int:
    """The lower bound of the histogram bucket holding v (v itself below 64)."""
    e = v.bit_length() - _SIG_BITS
    return v if e <= 0 else (v >> e) << e


def _middle(lower: int) -> int:
    e = lower.bit_length() - _SIG_BITS
    return lower if e <= 0 else lower + (1 << e) // 2


@dataclass
class OpStats:
    """Per opcode.  Latency percentiles are exact up to EXACT_LATENCIES exchanges; past that, a recording
    of any size is summarised in at most a few thousand buckets, each percentile within 1.6% (max exact)."""

    count: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[int] = field(default_factory=list)  # exact, until EXACT_LATENCIES of them
    req_bytes: int = 0
    reply_bytes: int = 0
    unreplied: int = 0
    histogram: Counter[int] | None = None  # bucket lower bound -> latencies, once past EXACT_LATENCIES
    replied: int = 0
    max_latency: int | None = None

    def add_latency(self, lat: int) -> None:
        self.replied += 1
        if self.max_latency is None or lat > self.max_latency:
            self.max_latency = lat
        if self.histogram is None:
            self.latencies.append(lat)
            if len(self.latencies) <= EXACT_LATENCIES:
                return
            self.histogram = Counter(_bucket(v) for v in self.latencies)
            self.latencies = []
        else:
            self.histogram[_bucket(lat)] += 1

    def latency(self) -> dict[str, int | None]:
        if self.histogram is None:
            s = sorted(self.latencies)
            return {"p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99),
                    "max": s[-1] if s else None}
        buckets = sorted(self.histogram.items())
        n = self.replied

        def pct(p: float) -> int:
            k = max(1, math.ceil(p / 100 * n))
            seen = 0
            for lower, c in buckets:
                seen += c
                if seen >= k:
                    return min(_middle(lower), self.max_latency or 0)
            return self.max_latency or 0

        return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": self.max_latency}


class Stats:
    """Fed with finished exchanges (a reply arrived, no reply is expected, or the stream ended)."""

    def __init__(self, bucket_ns: int = 1_000_000_000) -> None:
        self.bucket_ns = bucket_ns
        self.ops: dict[str, OpStats] = {}
        self.errors: Counter[str] = Counter()
        self.total = 0
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self._buckets: Counter[int] = Counter()

    def add(self, ex: Exchange) -> None:
        """(Called for every exchange a live UI ingests: fields are read once, properties avoided.)"""
        name = ex.opname
        st = self.ops.get(name)
        if st is None:
            st = self.ops[name] = OpStats()
        st.count += 1
        self.total += 1
        st.req_bytes += ex.req_len
        st.reply_bytes += ex.reply_len
        err = ex.error
        if err:
            ename = ex.errname or str(err)
            st.errors[ename] += 1
            self.errors[ename] += 1
        req_ts, reply_ts = ex.req_ts, ex.reply_ts
        if req_ts is not None and reply_ts is not None:
            lat = reply_ts - req_ts
            lats = st.latencies
            if st.histogram is None and len(lats) < EXACT_LATENCIES:  # add_latency's common case, inline
                lats.append(lat)
                st.replied += 1
                if st.max_latency is None or lat > st.max_latency:
                    st.max_latency = lat
            else:
                st.add_latency(lat)
        elif not ex.replied and ex.expects_reply:
            st.unreplied += 1
        ts = req_ts if req_ts is not None else (reply_ts or 0)
        if ts:
            if self.first_ts is None or ts < self.first_ts:
                self.first_ts = ts
            if self.last_ts is None or ts > self.last_ts:
                self.last_ts = ts
            buckets = self._buckets
            buckets[ts // self.bucket_ns] += 1
            if len(buckets) > RATE_BUCKETS:
                self._coarsen()

    def _coarsen(self) -> None:
        """Twice as wide buckets, half as many (amortised O(1) per exchange): the rate keeps its time base
        (`bucket_ns` says it), memory stays flat however long the session."""
        self.bucket_ns *= 2
        merged: Counter[int] = Counter()
        for b, n in self._buckets.items():
            merged[b >> 1] += n
        self._buckets = merged

    def ops_per_second(self) -> list[tuple[int, float]]:
        """(seconds since the first bucket, ops/s) for each bucket that holds exchanges, in time order.

        Only seconds with data count: the list is as long as the data, not as the time span, so a
        recording whose timestamps lie (one in the year 2500) cannot make it billions of entries long.
        """
        if not self._buckets:
            return []
        lo = min(self._buckets)
        scale = 1_000_000_000 / self.bucket_ns
        return [((b - lo) * self.bucket_ns // 1_000_000_000, n * scale) for b, n in sorted(self._buckets.items())]

    @property
    def active_seconds(self) -> int:
        """How many buckets hold exchanges (the denominator of a mean rate that ignores idle time)."""
        return len(self._buckets)

    @property
    def req_bytes(self) -> int:
        return sum(s.req_bytes for s in self.ops.values())

    @property
    def reply_bytes(self) -> int:
        return sum(s.reply_bytes for s in self.ops.values())

    @property
    def span_ns(self) -> int:
        """From the first exchange's time to the last one's."""
        return (self.last_ts - self.first_ts) if self.first_ts is not None and self.last_ts else 0

    def rate(self) -> dict[str, Any]:
        """The ops/s figures with their time base: the mean over the recording's span, the peak over
        fixed buckets (`bucket_ns`, 1 s by default) aligned on the clock."""
        span = self.span_ns
        peak = max(self._buckets.values(), default=0)
        return {"mean_ops_per_s": self.total / (span / 1e9) if span else None, "span_ns": span,
                "bucket_ns": self.bucket_ns, "peak_ops_per_bucket": peak,
                "peak_ops_per_s": peak * 1_000_000_000 / self.bucket_ns}

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "duration_ns": self.span_ns,
            "rate": self.rate(),
            "bytes": {"request": self.req_bytes, "reply": self.reply_bytes},
            "errors": dict(self.errors.most_common()),
            "ops": {name: {"count": s.count, "errors": dict(s.errors.most_common()), "latency_ns": s.latency(),
                           "request_bytes": s.req_bytes, "reply_bytes": s.reply_bytes, "unreplied": s.unreplied}
                    for name, s in sorted(self.ops.items(), key=lambda kv: (-kv[1].count, kv[0]))},
            "ops_per_second": [[t, r] for t, r in self.ops_per_second()],
            "active_seconds": self.active_seconds,
        }

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this Stats (JSON-able): a replay saves it beside its index."""
        return {"bucket_ns": self.bucket_ns, "total": self.total, "first_ts": self.first_ts, "last_ts": self.last_ts,
                "errors": dict(self.errors), "buckets": [[b, n] for b, n in self._buckets.items()],
                "ops": {name: {"count": s.count, "errors": dict(s.errors), "latencies": s.latencies,
                               "req_bytes": s.req_bytes, "reply_bytes": s.reply_bytes, "unreplied": s.unreplied,
                               "histogram": None if s.histogram is None else [[b, n] for b, n in s.histogram.items()],
                               "replied": s.replied, "max_latency": s.max_latency}
                        for name, s in self.ops.items()}}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Stats:
        """The Stats `state()` saved (raises KeyError/TypeError/ValueError on a malformed one)."""
        st = cls(int(d["bucket_ns"]))
        st.total = int(d["total"])
        st.first_ts, st.last_ts = d["first_ts"], d["last_ts"]
        st.errors = Counter({str(k): int(v) for k, v in d["errors"].items()})
        st._buckets = Counter({int(b): int(n) for b, n in d["buckets"]})
        for name, o in d["ops"].items():
            hist = o["histogram"]
            st.ops[str(name)] = OpStats(int(o["count"]), Counter({str(k): int(v) for k, v in o["errors"].items()}),
                                        [int(x) for x in o["latencies"]], int(o["req_bytes"]), int(o["reply_bytes"]),
                                        int(o["unreplied"]),
                                        None if hist is None else Counter({int(b): int(n) for b, n in hist}),
                                        int(o["replied"]), o["max_latency"])
        return st
